// bfloat16 linear layers for small batches (decode): y = x W^T at the memory bandwidth.
//
// A batch-1 decode step reads every weight once and does two flops per weight, so its speed is the weights' read
// rate. oneDNN's packed bf16 matmul reaches ~20 GB/s on a Llama layer's shapes on this CPU (per-call set-up and a
// thread split tuned for big matrices); this kernel streams at the machine's ~32 GB/s: rows in groups of 16, pairs of
// K values interleaved so one 64-byte load is the operand of vdpbf16ps (16 rows x 2 products, float32 sums), the
// activation pair broadcast from memory. The engine uses it up to a few tokens per call and oneDNN above
// (kvserve.model.layers.Linear), where compute, not bandwidth, is the limit.
//
//   packed (N/16, K/2, 32) bfloat16: element [g][j][2r + t] = W[16g + r][2j + t]
//   x (M, K) bfloat16 -> y (M, N) bfloat16; float32 sums in the order k = 0..K-1 in four interleaved chains
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "common.h"

namespace {

constexpr int NR = 16;

#ifdef KVSERVE_AVX512_BF16
// MT tokens x 16 rows. Four accumulator chains per token hide vdpbf16ps's latency when MT is small.
template <int MT>
inline void tile(const c10::BFloat16* x, const c10::BFloat16* wp, c10::BFloat16* y, int64_t N, int64_t K) {
  __m512 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  const int64_t KP = K / 2;  // pairs
  const __m512i* w = reinterpret_cast<const __m512i*>(wp);
  int64_t j = 0;
  for (; j + 4 <= KP; j += 4) {
    kvserve::prefetch_ahead<4>(w + j);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + j), w1 = (__m512bh)_mm512_loadu_si512(w + j + 1);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + j + 2), w3 = (__m512bh)_mm512_loadu_si512(w + j + 3);
    for (int m = 0; m < MT; ++m) {
      const int32_t* xp = reinterpret_cast<const int32_t*>(x + m * K) + j;
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_set1_epi32(xp[0]));
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_set1_epi32(xp[1]));
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, (__m512bh)_mm512_set1_epi32(xp[2]));
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, (__m512bh)_mm512_set1_epi32(xp[3]));
    }
  }
  for (; j < KP; ++j) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + j);
    for (int m = 0; m < MT; ++m) {
      const int32_t* xp = reinterpret_cast<const int32_t*>(x + m * K) + j;
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_set1_epi32(xp[0]));
    }
  }
  for (int m = 0; m < MT; ++m) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(s)));
  }
}

using TileFn = void (*)(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t);
#endif

}  // namespace

// Largest M the kernel takes (the engine's threshold for it is kvserve.model.layers.GEMV_MAX_TOKENS).
constexpr int64_t MAX_M = 8;

bool available() {
#ifdef KVSERVE_AVX512_BF16
  return true;
#else
  return false;
#endif
}

// W (N, K) bfloat16 -> packed (N/16, K/2, 32)
torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.dtype() == torch::kBFloat16, "w must be a (N, K) bfloat16 matrix");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % NR == 0 && K % 2 == 0, "gemv needs N % 16 == 0 and K % 2 == 0");
  return w.contiguous().view({N / NR, NR, K / 2, 2}).permute({0, 2, 1, 3}).contiguous().view({N / NR, K / 2, 2 * NR});
}

#ifdef KVSERVE_AVX512_BF16
// On raw buffers (the decode plan keeps y across steps): x (M, K), 1 <= M <= MAX_M -> y (M, N).
void gemv_raw(const c10::BFloat16* x, const c10::BFloat16* wp, c10::BFloat16* y, int64_t M, int64_t N, int64_t K) {
  static const TileFn tiles[MAX_M + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>,
                                          tile<5>, tile<6>, tile<7>, tile<8>};
  const TileFn fn = tiles[M];
  at::parallel_for(0, N / NR, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) fn(x, wp + g * K * NR, y + g * NR, N, K);
  });
}
#endif

// x (M, K) bfloat16, M <= 8 -> y (M, N) bfloat16
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& packed) {
  TORCH_CHECK(available(), "gemv needs AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.dtype() == torch::kBFloat16, "x must be contiguous bf16 (M, K)");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 2 * NR && packed.dtype() == torch::kBFloat16 &&
                  packed.is_contiguous(), "packed must be contiguous bf16 (N/16, K/2, 32)");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * NR;
  TORCH_CHECK(packed.size(1) * 2 == K, "weights have K = ", packed.size(1) * 2, ", x has ", K);
  TORCH_CHECK(M <= MAX_M, "gemv takes at most ", MAX_M, " rows, got ", M);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
#ifdef KVSERVE_AVX512_BF16
  gemv_raw(x.data_ptr<c10::BFloat16>(), packed.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), M, N, K);
#endif
  return y;
}

#ifndef KVSERVE_NO_PYBIND  // decode_step.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the AVX512-BF16 kernel was compiled in");
  m.def("set_prefetch_bytes", &kvserve::set_prefetch_bytes,
        "software prefetch distance in bytes (0: off), for benchmarks");
  m.def("prefetch_bytes", [] { return kvserve::prefetch_bytes(); }, "the software prefetch distance now");
  m.def("pack", &pack, "W (N, K) -> the kernel's (N/16, K/2, 32) layout");
  m.def("gemv", &gemv, "y = x W^T for up to 8 rows of x, bfloat16");
  m.attr("MAX_M") = MAX_M;
}
#endif
