// Pieces shared by kvserve's native kernels: bfloat16 <-> float32 and a vectorized exp for softmax.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define KVSERVE_AVX512_BF16 1
#endif

#if defined(KVSERVE_AVX512_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#define KVSERVE_AMX 1
#endif

namespace kvserve {

// Software prefetch for the kernels that stream weights once per call (batch-1 decode): LINES cache lines this many
// bytes past p. On this AMD CPU the hardware prefetcher alone leaves two threads' weight streams under the machine's
// read rate: of 0 / 2 / 4 / 8 / 16 KB, 8 KB measured best at 8 tokens (1.3-1.6x over none) and ~10% faster for a
// q4_1 batch-1 decode, no slower elsewhere (docs/benchmarks.md; `kvserve.bench.linear_sweep --prefetch-bytes`,
// `kvserve.bench.decode1 --no-prefetch`). Past the end of a thread's rows it touches its neighbour's or nothing: a
// prefetch never faults. Each kernel module's set_prefetch_bytes changes it (0: off), for those benchmarks.
inline int64_t& prefetch_bytes() {
  static int64_t bytes = 8192;
  return bytes;
}

inline void set_prefetch_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= 65536 && bytes % 64 == 0, "prefetch distance must be 0..65536, a multiple of 64");
  prefetch_bytes() = bytes;
}

// DIV: a stream read DIV times slower than the weights' codes (their scales) is prefetched at 1/DIV the distance,
// the same time ahead.
template <int LINES, int DIV = 1>
inline void prefetch_ahead(const void* p) {
  const int64_t d = prefetch_bytes();
  if (d == 0) return;
  const char* c = static_cast<const char*>(p) + d / DIV;
  for (int i = 0; i < LINES; ++i) __builtin_prefetch(c + 64 * i, 0, 3);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#ifdef KVSERVE_AVX512_BF16
// 16 bfloat16 values widened to float32 (exact).
inline __m512 bf16x16_to_float(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for x >= -87 (softmax after subtracting the max; SiLU's exp(-x)): 2^n * p(r), |rel err| < 2e-7, inf past
// the float range.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
// 16 rows of 16 dwords -> their transpose (in place).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // now each 128-bit lane k of r[i] holds 4 dwords of column (i%4 order) for rows 4k..4k+3 of a 4-row group
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}
#endif

#ifdef KVSERVE_AMX
// Linux hands the 8 KB AMX tile state only to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM, once per
// process); a kernel or CPU without AMX refuses, and the callers keep their AVX-512 paths. KVSERVE_AMX=0 turns the
// AMX kernels off for the process; tests switch them per module with set_amx.
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

inline std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("KVSERVE_AMX");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }()};
  return on;
}

inline bool amx_enabled() { return amx_switch().load(std::memory_order_relaxed) && amx_permitted(); }

// Every tile 16 rows x 64 bytes (palette 1). Tile configuration is per thread: each worker loads it and releases the
// tiles when done, so no tile state outlives a kernel call.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int i = 0; i < 8; ++i) {
      colsb[i] = 64;
      rows[i] = 16;
    }
  }
};
static_assert(sizeof(TileConfig) == 64, "the AMX tile configuration is 64 bytes");

struct TileScope {
  TileScope() {
    static const TileConfig cfg;
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
};
#endif

}  // namespace kvserve
