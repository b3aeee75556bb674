#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <chrono>
#include <atomic>
// sum-read `calls` consecutive matrices of sizes[i] bytes laid out back to back from base; each call split in two
// halves across 2 threads (layout 0: matrix-contiguous, thread t reads half t of each) or (layout 1: per-thread
// contiguous: thread t's halves of all matrices back to back in region t). prefetch 8 KB ahead (+ cross: prefetch the
// head of the next call's share at the tail of this one).
static inline __m512i rd(const char* p, int64_t n, int64_t pf, __m512i acc) {
  for (int64_t o = 0; o < n; o += 256) {
    if (pf) for (int i = 0; i < 4; ++i) __builtin_prefetch(p + o + pf + 64 * i, 0, 3);
    acc = _mm512_add_epi32(acc, _mm512_loadu_si512(p + o));
    acc = _mm512_add_epi32(acc, _mm512_loadu_si512(p + o + 64));
    acc = _mm512_add_epi32(acc, _mm512_loadu_si512(p + o + 128));
    acc = _mm512_add_epi32(acc, _mm512_loadu_si512(p + o + 192));
  }
  return acc;
}
double run(torch::Tensor buf, std::vector<int64_t> sizes, int64_t layout, int64_t pf, int64_t cross) {
  const char* base = (const char*)buf.data_ptr();
  int64_t total = 0; for (auto s : sizes) total += s;
  std::vector<int64_t> off(sizes.size());
  int64_t o = 0; for (size_t i = 0; i < sizes.size(); ++i) { off[i] = o; o += sizes[i]; }
  std::vector<int64_t> toff(sizes.size()); o = 0;
  for (size_t i = 0; i < sizes.size(); ++i) { toff[i] = o; o += sizes[i] / 2; }
  volatile int sink = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t h = sizes[i] / 2;
    at::parallel_for(0, 2, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const char* p = layout == 0 ? base + off[i] + t * h : base + t * (total / 2) + toff[i];
        __m512i acc = _mm512_setzero_si512();
        if (cross && i + 1 < sizes.size() && h > 16384) {
          acc = rd(p, h - 8192, pf, acc);
          const char* nxt = layout == 0 ? base + off[i + 1] + t * (sizes[i + 1] / 2) : base + t * (total / 2) + toff[i + 1];
          for (int k = 0; k < 8192; k += 64) __builtin_prefetch(nxt + k, 0, 3);
          acc = rd(p + h - 8192, 8192, 0, acc);
        } else {
          acc = rd(p, h, pf, acc);
        }
        sink += _mm512_reduce_add_epi32(acc);
      }
    });
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
double run_team(torch::Tensor buf, std::vector<int64_t> sizes, int64_t layout, int64_t pf, int64_t barrier) {
  const char* base = (const char*)buf.data_ptr();
  int64_t total = 0; for (auto s : sizes) total += s;
  std::vector<int64_t> off(sizes.size()), toff(sizes.size());
  int64_t o = 0; for (size_t i = 0; i < sizes.size(); ++i) { off[i] = o; o += sizes[i]; }
  o = 0; for (size_t i = 0; i < sizes.size(); ++i) { toff[i] = o; o += sizes[i] / 2; }
  std::atomic<int64_t> arrived{0};
  volatile int sink = 0;
  auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, 2, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      __m512i acc = _mm512_setzero_si512();
      for (size_t i = 0; i < sizes.size(); ++i) {
        const int64_t h = sizes[i] / 2;
        const char* p = layout == 0 ? base + off[i] + t * h : base + t * (total / 2) + toff[i];
        acc = rd(p, h, pf, acc);
        if (barrier) {
          const int64_t target = 2 * (int64_t)(i + 1);
          arrived.fetch_add(1);
          while (arrived.load(std::memory_order_acquire) < target) _mm_pause();
        }
      }
      sink += _mm512_reduce_add_epi32(acc);
    }
  });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); m.def("run_team", &run_team); }
