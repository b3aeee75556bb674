// Int8 linear layers (Q8_0 and w8a8): y = x W^T with W held as int8 in blocks of 32 along K, one float scale per (row, block), as
// GGUF's Q8_0. Activations are quantized on the fly to the same blocks (what llama.cpp does for Q8_0 weights), so each
// block's dot product is exact in int32 through AVX512-VNNI (vpdpbusd: 64 int8 multiply-adds per instruction, twice
// the bf16 rate of vdpbf16ps) and only the block sums are scaled and added in float32.
//
// Weight layout (prepared once in Python, kvserve/model/quant.py): rows in groups of 16; per group and block, eight
// 64-byte vectors, vector j holding rows r = 0..15 x k = 4j..4j+3 at byte 4r + (k - 4j): exactly the operand shape of
// vpdpbusd, so a group's block is eight loads and eight instructions per token. vpdpbusd multiplies unsigned by signed
// bytes, so activations are stored +128 and each (row, block) carries -128 * sum(q) as the accumulator's start value.
//
// w8a8 is the same with one scale per row (scales and comp (N/16, 1, 16)) and one per token: the int32 sums then run
// over all of K and are converted once, so nearly every instruction is a vpdpbusd (the route past the bf16 roof for
// batches), at the cost of rounding every activation to its row's largest.
//
//   packed (N/16, K/32, 8, 64) int8, scales (N/16, K/32 or 1, 16) float32, comp (same shape) int32
//   x (M, K) bfloat16 or float32 -> y (M, N) same dtype
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define KVSERVE_VNNI 1
#endif

namespace {

constexpr int QK = 32;  // weights and activations per block
constexpr int NR = 16;  // rows per group (one zmm of int32 / float32 lanes)
constexpr int MC = 64;  // tokens per pass over a thread's weight groups (their activations stay in L1/L2)

using kvserve::to_float;

inline void store(float v, float* dst) { *dst = v; }
inline void store(float v, c10::BFloat16* dst) { *dst = c10::BFloat16(v); }  // round to nearest even

#ifdef KVSERVE_VNNI
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
#endif

// x (M, K) -> xq (M, K) uint8 (q + 128), xs (M, K/bs) float32 with q = round(x / d), d = max|x| / 127 per block of
// bs values (32 for Q8_0, K for w8a8's per-token scale).
template <typename T>
void quantize_rows(const T* x, uint8_t* xq, float* xs, int64_t M, int64_t K, int64_t bs) {
  const int64_t SB = K / bs;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(bs);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < SB; ++b) {
        const T* src = x + m * K + b * bs;
        uint8_t* dst = xq + m * K + b * bs;
#ifdef KVSERVE_VNNI
        if (bs % 16 == 0) {  // the same float32 operations 16 lanes at a time
          __m512 vmax = _mm512_setzero_ps();
          for (int64_t i = 0; i < bs; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(src + i)));
          const float d = _mm512_reduce_max_ps(vmax) / 127.f;
          const float id = d > 0.f ? 1.f / d : 0.f;
          xs[m * SB + b] = d;
          const __m512 vid = _mm512_set1_ps(id), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
          for (int64_t i = 0; i < bs; i += 16) {
            __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(load16(src + i), vid),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_min_ps(hi, _mm512_max_ps(lo, q));
            const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtepi32_epi8(u));
          }
          continue;
        }
#endif
        float amax = 0.f;
        for (int64_t i = 0; i < bs; ++i) {
          buf[i] = to_float(src[i]);
          amax = std::max(amax, std::fabs(buf[i]));
        }
        const float d = amax / 127.f;
        const float id = d > 0.f ? 1.f / d : 0.f;
        xs[m * SB + b] = d;
        for (int64_t i = 0; i < bs; ++i) {
          float q = std::nearbyint(buf[i] * id);  // round half to even, as torch.round
          q = std::min(127.f, std::max(-127.f, q));
          dst[i] = static_cast<uint8_t>(static_cast<int>(q) + 128);
        }
      }
    }
  });
}

// Portable path: the same arithmetic (exact int32 block dots, float32 block sums in the same order) in plain C++.
// Used where AVX512-VNNI is missing (AVX2 laptops: the compiler vectorizes what it can) and forced in tests.
template <typename T>
void gemm_generic(const uint8_t* xq, const float* xs, const int8_t* wp, const float* ws, const int32_t* wc, T* y,
                  int64_t M, int64_t N, int64_t K, int64_t SB) {
  const int64_t KB = K / QK, G = N / NR, per = KB / SB;  // 32-blocks per scale block
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t m = 0; m < M; ++m) {
        float acc[NR] = {0.f};
        for (int64_t sb = 0; sb < SB; ++sb) {
          int32_t s[NR];
          for (int r = 0; r < NR; ++r) s[r] = wc[(g * SB + sb) * NR + r];
          for (int64_t b = sb * per; b < (sb + 1) * per; ++b) {
            const int8_t* wb = wp + (g * KB + b) * QK * NR;
            const uint8_t* a = xq + m * K + b * QK;
            for (int j = 0; j < QK / 4; ++j)
              for (int r = 0; r < NR; ++r)
                for (int t = 0; t < 4; ++t) s[r] += int32_t(a[4 * j + t]) * int32_t(wb[j * 64 + 4 * r + t]);
          }
          const float xd = xs[m * SB + sb];
          for (int r = 0; r < NR; ++r) {
            const float v = float(s[r]) * xd;
            acc[r] = SB == 1 ? v * ws[g * NR + r] : acc[r] + v * ws[(g * SB + sb) * NR + r];
          }
        }
        for (int r = 0; r < NR; ++r) store(acc[r], y + m * N + g * NR + r);
      }
    }
  });
}

#ifdef KVSERVE_VNNI
template <typename T>
inline void store16(__m512 v, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(dst, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// MT tokens x one group of 16 rows over all of K. BLOCK: Q8_0, a float scale per 32-block, so each block's int32
// dot is converted and scaled; otherwise (w8a8: one scale per row and per token) the int32 sums run over all of K and
// are converted once. Activation bytes and scales are broadcast straight from memory (embedded operands, no extra
// instructions). A single token gets two int32 chains so it does not wait on one dependent vpdpbusd after another.
template <int MT, bool BLOCK, typename T>
inline void tile(const uint8_t* xq, const float* xs, const int8_t* wp, const float* ws, const int32_t* wc, T* y,
                 int64_t N, int64_t K, int64_t KB) {
  constexpr bool SPLIT = MT == 1;
  __m512 acc[MT];
  __m512i si[MT], si2[MT];
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm512_setzero_ps();
    if constexpr (!BLOCK) {
      si[m] = _mm512_loadu_si512(wc);
      si2[m] = _mm512_setzero_si512();
    }
  }
  for (int64_t b = 0; b < KB; ++b) {
    const __m512i* wv = reinterpret_cast<const __m512i*>(wp + b * QK * NR);
    const __m512i w0 = _mm512_loadu_si512(wv + 0), w1 = _mm512_loadu_si512(wv + 1);
    const __m512i w2 = _mm512_loadu_si512(wv + 2), w3 = _mm512_loadu_si512(wv + 3);
    const __m512i w4 = _mm512_loadu_si512(wv + 4), w5 = _mm512_loadu_si512(wv + 5);
    const __m512i w6 = _mm512_loadu_si512(wv + 6), w7 = _mm512_loadu_si512(wv + 7);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const int32_t* a = reinterpret_cast<const int32_t*>(xq + m * K + b * QK);
      __m512i s0, s1;
      if constexpr (BLOCK) {
        s0 = _mm512_loadu_si512(wc + b * NR);
        s1 = _mm512_setzero_si512();
      } else {
        s0 = si[m];
        s1 = si2[m];
      }
      __m512i& t0 = s0;
      __m512i& t1 = SPLIT ? s1 : s0;
      t0 = _mm512_dpbusd_epi32(t0, _mm512_set1_epi32(a[0]), w0);
      t1 = _mm512_dpbusd_epi32(t1, _mm512_set1_epi32(a[4]), w4);
      t0 = _mm512_dpbusd_epi32(t0, _mm512_set1_epi32(a[1]), w1);
      t1 = _mm512_dpbusd_epi32(t1, _mm512_set1_epi32(a[5]), w5);
      t0 = _mm512_dpbusd_epi32(t0, _mm512_set1_epi32(a[2]), w2);
      t1 = _mm512_dpbusd_epi32(t1, _mm512_set1_epi32(a[6]), w6);
      t0 = _mm512_dpbusd_epi32(t0, _mm512_set1_epi32(a[3]), w3);
      t1 = _mm512_dpbusd_epi32(t1, _mm512_set1_epi32(a[7]), w7);
      if constexpr (BLOCK) {
        const __m512i s = SPLIT ? _mm512_add_epi32(s0, s1) : s0;
        const __m512 sf = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xs[m * KB + b]));
        acc[m] = _mm512_fmadd_ps(sf, _mm512_loadu_ps(ws + b * NR), acc[m]);
      } else {
        si[m] = s0;
        si2[m] = s1;
      }
    }
  }
  if constexpr (!BLOCK) {
    const __m512 wsv = _mm512_loadu_ps(ws);
    for (int m = 0; m < MT; ++m) {
      const __m512i s = SPLIT ? _mm512_add_epi32(si[m], si2[m]) : si[m];
      acc[m] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xs[m])), wsv);
    }
  }
  for (int m = 0; m < MT; ++m) store16(acc[m], y + m * N);
}

template <typename T>
using TileFn = void (*)(const uint8_t*, const float*, const int8_t*, const float*, const int32_t*, T*, int64_t,
                        int64_t, int64_t);

template <bool BLOCK, typename T>
void gemm_vnni(const uint8_t* xq, const float* xs, const int8_t* wp, const float* ws, const int32_t* wc, T* y,
               int64_t M, int64_t N, int64_t K) {
  // tokens per tile: 8 weight vectors + MT accumulators (+ chains and temporaries) within the 32 zmm registers
  constexpr int MT = 6;
  static const TileFn<T> tails[MT] = {nullptr, tile<1, BLOCK, T>, tile<2, BLOCK, T>, tile<3, BLOCK, T>,
                                      tile<4, BLOCK, T>, tile<5, BLOCK, T>};
  const int64_t KB = K / QK, G = N / NR;
  const int64_t SB = BLOCK ? KB : 1;  // scale blocks per row
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t mend = std::min(M, mc + MC);
      for (int64_t g = g0; g < g1; ++g) {
        const int8_t* wg = wp + g * KB * QK * NR;
        const float* sg = ws + g * SB * NR;
        const int32_t* cg = wc + g * SB * NR;
        int64_t m = mc;
        for (; m + MT <= mend; m += MT)
          tile<MT, BLOCK, T>(xq + m * K, xs + m * SB, wg, sg, cg, y + m * N + g * NR, N, K, KB);
        if (m < mend) tails[mend - m](xq + m * K, xs + m * SB, wg, sg, cg, y + m * N + g * NR, N, K, KB);
      }
    }
  });
}
#endif

// Scale blocks per row: K/32 (Q8_0) or 1 (w8a8), read off the scales' shape.
int64_t check_weights(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& comp, int64_t K) {
  TORCH_CHECK(packed.dtype() == torch::kInt8 && packed.dim() == 4 && packed.size(2) == 8 && packed.size(3) == 64,
              "packed weights must be int8 (N/16, K/32, 8, 64)");
  TORCH_CHECK(packed.size(1) * QK == K, "weights have K = ", packed.size(1) * QK, ", activations ", K);
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && comp.dtype() == torch::kInt32, "scales float32, comp int32");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == packed.size(0) && scales.size(2) == NR &&
                  (scales.size(1) == packed.size(1) || scales.size(1) == 1) && comp.sizes() == scales.sizes(),
              "scales/comp must be (N/16, K/32 or 1, 16)");
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && comp.is_contiguous(), "weights must be contiguous");
  return scales.size(1);
}

}  // namespace

bool has_vnni() {
#ifdef KVSERVE_VNNI
  return true;
#else
  return false;
#endif
}

// x (M, K) -> y (M, N); generic=true forces the portable path (tests compare the two).
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                        const torch::Tensor& comp, bool generic) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32");
  const int64_t SB = check_weights(packed, scales, comp, K);
  const bool block = SB == K / QK && SB > 1;
  const int64_t N = packed.size(0) * NR;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kUInt8));
  auto xs = torch::empty({M, SB}, x.options().dtype(torch::kFloat32));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    quantize_rows<T>(x.data_ptr<T>(), xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), M, K, K / SB);
    const auto* wp = packed.data_ptr<int8_t>();
    const auto* ws = scales.data_ptr<float>();
    const auto* wc = comp.data_ptr<int32_t>();
#ifdef KVSERVE_VNNI
    if (!generic) {
      if (block) {
        gemm_vnni<true, T>(xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), wp, ws, wc, y.data_ptr<T>(), M, N, K);
      } else {
        gemm_vnni<false, T>(xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), wp, ws, wc, y.data_ptr<T>(), M, N, K);
      }
      return;
    }
#endif
    gemm_generic<T>(xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), wp, ws, wc, y.data_ptr<T>(), M, N, K, SB);
  };
  if (x.dtype() == torch::kFloat32) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
  return y;
}

// The activation quantization alone (block of bs values), so tests can check it against the PyTorch reference.
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x, int64_t bs) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && bs > 0 && x.size(1) % bs == 0,
              "x must be contiguous (M, K) with K a multiple of the block size");
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kUInt8));
  auto xs = torch::empty({M, K / bs}, x.options().dtype(torch::kFloat32));
  if (x.dtype() == torch::kFloat32) {
    quantize_rows<float>(x.data_ptr<float>(), xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), M, K, bs);
  } else {
    quantize_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), M, K,
                                 bs);
  }
  return {xq, xs};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_vnni", &has_vnni, "whether the AVX512-VNNI path was compiled in");
  m.def("q8_linear", &q8_linear, "y = x W^T over Q8_0 weights with block-quantized activations");
  m.def("quantize_activations", &quantize_activations, "x -> (q + 128 as uint8, per-block scales)");
}
