// Int8 linear layers (q8_0 and w8a8): y = x W^T with W held as int8 and x quantized to int8 on the fly, so every dot
// product is exact in int32 through AVX512-VNNI (vpdpbusd: 64 byte multiply-adds per instruction, twice the bf16 rate
// of vdpbf16ps) and only the partial sums are scaled in float32.
//
// Both formats keep one fp16 scale per (row, group of K/SB inputs) and quantize each token's activations to the same
// groups, so a group is an exact int32 dot product, converted once. q8_0 (GGUF's Q8_0, what llama.cpp does for Q8_0
// weights): groups of 32, 34 bytes per 32 weights as in the file format. w8a8 (SmoothQuant-smoothed weights): groups
// of 64, half the conversions; a scale per whole row and token (its first form, whose long int32 chains ran batches
// faster) measured 96.5% top-1 agreement with bf16 against 98% for groups of 64 (docs/benchmarks.md).
//
// Weight layout (prepared once in Python, kvserve/model/quant.py): rows in groups of 16; per group and block of 32,
// eight 64-byte vectors, vector j holding rows r = 0..15 x k = 4j..4j+3 at byte 4r + (k - 4j): exactly vpdpbusd's
// operand shape, so a group's block is eight loads and eight instructions per token. vpdpbusd multiplies unsigned by
// signed bytes: weights are stored + 128 (unsigned), activations signed, and each token's block sum starts at
// -128 * sum(its activation codes), computed when the activations are quantized (no per-weight correction stored).
//
//   packed (N/16, K/32, 8, 64) uint8; scales (N/16, SB, 16) float16, SB = K/32 (q8_0) or K/64 (w8a8)
//   x (M, K) bfloat16 or float32 -> y (M, N) same dtype
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define KVSERVE_VNNI 1
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define KVSERVE_AVX2 1
#endif

namespace {

constexpr int QK = 32;  // weights per q8_0 block, and the packing unit along K for both formats
constexpr int NR = 16;  // rows per group (one zmm of int32 / float32 lanes)
constexpr int MC = 64;  // tokens per pass over a thread's weight groups (their activations stay in L1/L2)

using kvserve::to_float;

inline void store(float v, float* dst) { *dst = v; }
inline void store(float v, c10::BFloat16* dst) { *dst = c10::BFloat16(v); }  // round to nearest even

// Quantized activations of one call: codes (M, K) int8; per scale block (M, SB): scale d and start value -128 * sum.
struct QAct {
  const int8_t* q;
  const float* d;
  const int32_t* start;
};

#ifdef KVSERVE_VNNI
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return kvserve::bf16x16_to_float(p);
  }
}
#endif

// x (M, K) -> q (M, K) int8 = round(x / d), d = max|x| / 127 per block of bs values (32 for q8_0, 64 for w8a8),
// start = -128 * sum(q) per block. The same float32 operations as kvserve.model.quant.quantize_blocks.
template <typename T>
void quantize_rows(const T* x, int8_t* xq, float* xs, int32_t* xstart, int64_t M, int64_t K, int64_t bs) {
  const int64_t SB = K / bs;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(bs);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < SB; ++b) {
        const T* src = x + m * K + b * bs;
        int8_t* dst = xq + m * K + b * bs;
#ifdef KVSERVE_VNNI
        if (bs % 16 == 0) {  // 16 lanes at a time
          __m512 vmax = _mm512_setzero_ps();
          for (int64_t i = 0; i < bs; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(src + i)));
          const float d = _mm512_reduce_max_ps(vmax) / 127.f;
          const float id = d > 0.f ? 1.f / d : 0.f;
          const __m512 vid = _mm512_set1_ps(id), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
          __m512i vsum = _mm512_setzero_si512();
          for (int64_t i = 0; i < bs; i += 16) {
            __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(load16(src + i), vid),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, q)));
            vsum = _mm512_add_epi32(vsum, qi);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtepi32_epi8(qi));
          }
          xs[m * SB + b] = d;
          xstart[m * SB + b] = -128 * _mm512_reduce_add_epi32(vsum);
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
        int32_t sum = 0;
        for (int64_t i = 0; i < bs; ++i) {
          float q = std::nearbyint(buf[i] * id);  // round half to even, as torch.round
          q = std::min(127.f, std::max(-127.f, q));
          dst[i] = static_cast<int8_t>(q);
          sum += dst[i];
        }
        xs[m * SB + b] = d;
        xstart[m * SB + b] = -128 * sum;
      }
    }
  });
}

template <typename S>
inline float scale_at(const S* ws, int64_t i) {
  if constexpr (std::is_same_v<S, float>) {
    return ws[i];
  } else {
    return static_cast<float>(ws[i]);
  }
}

// Portable path: the same arithmetic (exact int32 dots, float32 block sums in the same order) in plain C++.
// Used where neither AVX512-VNNI nor AVX2 is there, and forced in tests.
template <typename T, typename S>
void gemm_generic(QAct a, const uint8_t* wp, const S* ws, T* y, int64_t M, int64_t N, int64_t K, int64_t SB) {
  const int64_t KB = K / QK, G = N / NR, per = KB / SB;  // 32-blocks per scale block
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t m = 0; m < M; ++m) {
        float acc[NR] = {0.f};
        for (int64_t sb = 0; sb < SB; ++sb) {
          int32_t s[NR];
          for (int r = 0; r < NR; ++r) s[r] = a.start[m * SB + sb];
          for (int64_t b = sb * per; b < (sb + 1) * per; ++b) {
            const uint8_t* wb = wp + (g * KB + b) * QK * NR;
            const int8_t* xb = a.q + m * K + b * QK;
            for (int j = 0; j < QK / 4; ++j)
              for (int r = 0; r < NR; ++r)
                for (int t = 0; t < 4; ++t) s[r] += int32_t(wb[j * 64 + 4 * r + t]) * int32_t(xb[4 * j + t]);
          }
          const float xd = a.d[m * SB + sb];
          for (int r = 0; r < NR; ++r) {
            const float v = float(s[r]) * xd;
            const float w = scale_at(ws, (g * SB + sb) * NR + r);
            acc[r] = SB == 1 ? v * w : acc[r] + v * w;
          }
        }
        for (int r = 0; r < NR; ++r) store(acc[r], y + m * N + g * NR + r);
      }
    }
  });
}

// The portable Q4 path: the same sums as tile_q4.
template <typename T>
void gemm_q4_generic(QAct a, const uint8_t* wp, const c10::Half* dm, T* y, int64_t M, int64_t N, int64_t K) {
  const int64_t KB = K / QK, G = N / NR;
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t m = 0; m < M; ++m) {
        float acc[NR] = {0.f};
        for (int64_t b = 0; b < KB; ++b) {
          const uint8_t* wb = wp + (g * KB + b) * QK * NR / 2;
          const int8_t* xb = a.q + m * K + b * QK;
          const c10::Half* dmb = dm + (g * KB + b) * 2 * NR;
          const float da = a.d[m * KB + b];
          const float sa = static_cast<float>(-a.start[m * KB + b] / 128) * da;
          for (int r = 0; r < NR; ++r) {
            int32_t s = 0;
            for (int j = 0; j < QK / 4; ++j)
              for (int t = 0; t < 4; ++t) {
                const uint8_t byte = wb[(j % 4) * 64 + 4 * r + t];
                const int32_t q = j < 4 ? (byte & 0x0F) : (byte >> 4);
                s += q * int32_t(xb[4 * j + t]);
              }
            acc[r] = acc[r] + float(s) * da * static_cast<float>(dmb[r]);
            acc[r] = acc[r] + static_cast<float>(dmb[NR + r]) * sa;
          }
        }
        for (int r = 0; r < NR; ++r) store(acc[r], y + m * N + g * NR + r);
      }
    }
  });
}

// Calls tile_at(g, m, n) for every row group g (split across threads) and run of n <= TM tokens from m, MC tokens
// at a time so a thread's weight groups are reused from cache across a chunk's tiles.
template <int TM, typename F>
void for_tiles(int64_t M, int64_t G, F&& tile_at) {
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t mend = std::min(M, mc + MC);
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t m = mc; m < mend; m += TM) tile_at(g, m, std::min<int64_t>(TM, mend - m));
    }
  });
}

// Weight bytes of a chunk of row groups whose MC-token passes run back to back, so the chunk is read from L2 on every
// pass (the host's L2 is 1 MB per core). Picked from noisy one-off sweeps of 64-256 KB, where 96-128 KB did best.
constexpr int64_t CHUNK_BYTES = 128 * 1024;

std::atomic<bool>& dynamic_switch() {  // on; benchmarks compare it with for_tiles' static split
  static std::atomic<bool> on{true};
  return on;
}

// for_tiles for prompts (more than MC tokens): the work is cut into units of (a chunk of row groups of at most
// CHUNK_BYTES of weights, one MC-token pass), chunk-major, and the threads take units from a shared counter. With
// for_tiles' order a thread streamed all its row groups (gate/up: 884 KB a thread at K = 576) once per 64 tokens,
// from L3 or DRAM once a long prompt's activations and outputs had evicted them; and a fixed half of the groups per
// thread left one thread waiting whenever the other core ran slower (libgomp was 11-15% of a w8a8 matmul's profile).
// The same tiles and sums as for_tiles, so the same bits. group_bytes: the weight bytes of one unit of G.
template <int TM, typename F>
void for_tile_chunks(int64_t M, int64_t G, int64_t group_bytes, F&& tile_at) {
  // one pass reuses nothing: a decode batch's weights stream from DRAM best as each thread's contiguous half
  // (shared-counter units measured 0.98x at 64 tokens with 30 layers' weights)
  if (M <= MC || !dynamic_switch().load(std::memory_order_relaxed)) return for_tiles<TM>(M, G, tile_at);
  const int64_t threads = at::get_num_threads();
  // chunks small enough for four per thread, so the last units even out the threads' finishing times
  const int64_t quarter = (G + 4 * threads - 1) / (4 * threads);
  const int64_t chunk = std::max<int64_t>(1, std::min(CHUNK_BYTES / group_bytes, quarter));
  const int64_t passes = (M + MC - 1) / MC, units = (G + chunk - 1) / chunk * passes;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) {
      const int64_t g0 = u / passes * chunk, g1 = std::min(G, g0 + chunk);
      const int64_t mc = u % passes * MC, mend = std::min(M, mc + MC);
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t m = mc; m < mend; m += TM) tile_at(g, m, std::min<int64_t>(TM, mend - m));
    }
  });
}

#ifdef KVSERVE_AVX2
// AVX2 path (CPUs without AVX-512: most laptops). The same packed layout read as two halves, rows 0..7 and 8..15 of
// a group, each a 32-byte vector of 8 rows x 4 k. There is no vpdpbusd: vpmaddubsw multiplies unsigned by signed
// bytes into saturating int16 pairs and vpmaddwd sums the pairs into int32. Int8 weights (stored + 128) would
// overflow int16 (2 x 255 x 127), so they are turned back into signed codes and the sign moved onto them
// (|x| x sign(w, x): pairs of at most 2 x 127 x 127, exact); 4-bit codes are small enough as they are. The int32
// sums are exact and the float32 scaling is the VNNI path's, so results match it to float32 rounding.
constexpr int MT2 = 4;  // tokens per AVX2 tile (16 ymm registers)

template <typename T>
inline void store8(__m256 v, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(dst, v);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int i = 0; i < 8; ++i) store(tmp[i], dst + i);
  }
}

// int32 sums of 8 rows x 4 k against one token's 4 broadcast codes: signed weight codes w, activation bytes xb.
inline __m256i dot4_signed(__m256i w, __m256i xb, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(xb), _mm256_sign_epi8(w, xb)), ones);
}

inline __m256i dot4_unsigned(__m256i w, __m256i xb, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, xb), ones);
}

template <int MT_, typename T>
inline void tile_avx2(QAct a, const uint8_t* wp, const c10::Half* ws, T* y, int64_t N, int64_t K, int64_t KB,
                      int64_t per) {
  const int64_t SB = KB / per;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[MT_][2];
  for (int m = 0; m < MT_; ++m)
    for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < SB; ++sb) {
    for (int h = 0; h < 2; ++h) {
      __m256i s[MT_];
      for (int m = 0; m < MT_; ++m) s[m] = _mm256_setzero_si256();  // signed codes: no -128 start
      for (int64_t b = sb * per; b < (sb + 1) * per; ++b) {
        const uint8_t* wb = wp + b * QK * NR;
        if (h == 0) kvserve::prefetch_ahead<8>(wb);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m256i w = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64 + h * 32)), flip);  // signed codes
          for (int m = 0; m < MT_; ++m) {
            const int32_t* xa = reinterpret_cast<const int32_t*>(a.q + m * K + b * QK);
            s[m] = _mm256_add_epi32(s[m], dot4_signed(w, _mm256_set1_epi32(xa[j]), ones));
          }
        }
      }
      const __m256 wsv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + sb * NR + h * 8)));
      for (int m = 0; m < MT_; ++m) {
        const __m256 sf = _mm256_mul_ps(_mm256_cvtepi32_ps(s[m]), _mm256_set1_ps(a.d[m * SB + sb]));
        acc[m][h] = _mm256_fmadd_ps(sf, wsv, acc[m][h]);
      }
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < MT_; ++m) store8(acc[m][h], y + m * N + h * 8);
}

template <typename T>
void gemm_avx2(QAct a, const uint8_t* wp, const c10::Half* ws, T* y, int64_t M, int64_t N, int64_t K, int64_t SB) {
  using Fn = void (*)(QAct, const uint8_t*, const c10::Half*, T*, int64_t, int64_t, int64_t, int64_t);
  static const Fn tiles[MT2 + 1] = {nullptr, tile_avx2<1, T>, tile_avx2<2, T>, tile_avx2<3, T>, tile_avx2<4, T>};
  const int64_t KB = K / QK, per = KB / SB;
  for_tiles<MT2>(M, N / NR, [&](int64_t g, int64_t m, int64_t n) {
    const QAct am{a.q + m * K, a.d + m * SB, a.start + m * SB};
    tiles[n](am, wp + g * KB * QK * NR, ws + g * SB * NR, y + m * N + g * NR, N, K, KB, per);
  });
}

// Q4 on AVX2: per group and block, four 64-byte vectors (low nibbles: operand vectors 0..3, high: 4..7), each read
// as two halves; the block sum is d d_x sum(q q_x) + m d_x sum(q_x) as in tile_q4.
template <int MT_, typename T>
inline void tile_q4_avx2(QAct a, const uint8_t* wp, const c10::Half* dm, T* y, int64_t N, int64_t K, int64_t KB) {
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  __m256 acc[MT_][2];
  for (int m = 0; m < MT_; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* wb = wp + b * QK * NR / 2;
    kvserve::prefetch_ahead<4>(wb);
    const c10::Half* dmb = dm + b * 2 * NR;
    for (int h = 0; h < 2; ++h) {
      __m256i s[MT_];
      for (int m = 0; m < MT_; ++m) s[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64 + h * 32));
        const __m256i wlo = _mm256_and_si256(v, low), whi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int m = 0; m < MT_; ++m) {
          const int32_t* xa = reinterpret_cast<const int32_t*>(a.q + m * K + b * QK);
          s[m] = _mm256_add_epi32(s[m], dot4_unsigned(wlo, _mm256_set1_epi32(xa[j]), ones));
          s[m] = _mm256_add_epi32(s[m], dot4_unsigned(whi, _mm256_set1_epi32(xa[j + 4]), ones));
        }
      }
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dmb + h * 8)));
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dmb + NR + h * 8)));
      for (int m = 0; m < MT_; ++m) {
        const float da = a.d[m * KB + b];
        const float sa = static_cast<float>(-a.start[m * KB + b] / 128) * da;  // d_x sum(q_x)
        acc[m][h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s[m]), _mm256_set1_ps(da)), dv, acc[m][h]);
        acc[m][h] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sa), acc[m][h]);
      }
    }
  }
  for (int m = 0; m < MT_; ++m)
    for (int h = 0; h < 2; ++h) store8(acc[m][h], y + m * N + h * 8);
}

template <typename T>
void gemm_q4_avx2(QAct a, const uint8_t* wp, const c10::Half* dm, T* y, int64_t M, int64_t N, int64_t K) {
  using Fn = void (*)(QAct, const uint8_t*, const c10::Half*, T*, int64_t, int64_t, int64_t);
  static const Fn tiles[MT2 + 1] = {nullptr, tile_q4_avx2<1, T>, tile_q4_avx2<2, T>, tile_q4_avx2<3, T>,
                                    tile_q4_avx2<4, T>};
  const int64_t KB = K / QK;
  for_tiles<MT2>(M, N / NR, [&](int64_t g, int64_t m, int64_t n) {
    const QAct am{a.q + m * K, a.d + m * KB, a.start + m * KB};
    tiles[n](am, wp + g * KB * QK * NR / 2, dm + g * KB * 2 * NR, y + m * N + g * NR, N, K, KB);
  });
}
#endif

#ifdef KVSERVE_VNNI
template <typename T>
inline void store16(__m512 v, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(dst, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// MT tokens x one group of 16 rows over all of K, in scale groups of `per` 32-blocks (q8_0: 1; w8a8: 2). PER: `per`
// compiled in (1 and 2; 0 = read at run time, for other groupings: about 1.45x slower at 64 tokens in linear_sweep). Each
// group's int32 dot is converted once and scaled by the token's group scale and the rows' fp16 group scales.
// Activation codes, scales and start values are broadcast straight from memory (embedded operands). A single token
// gets two int32 chains so it does not wait on one dependent vpdpbusd after another.
template <int MT, int PER, typename T>
inline void tile(QAct a, const uint8_t* wp, const c10::Half* ws, T* y, int64_t N, int64_t K, int64_t KB,
                 int64_t per_arg) {
  constexpr bool SPLIT = MT == 1;
  const int64_t per = PER > 0 ? PER : per_arg;
  const int64_t SB = KB / per;
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < SB; ++sb) {
    if constexpr (PER == 1) {  // q8_0: named weight vectors (an array of them measured 2-5% slower at 64 tokens)
      const __m512i* wv = reinterpret_cast<const __m512i*>(wp + sb * QK * NR);
      kvserve::prefetch_ahead<8>(wv);
      const __m512i w0 = _mm512_loadu_si512(wv + 0), w1 = _mm512_loadu_si512(wv + 1);
      const __m512i w2 = _mm512_loadu_si512(wv + 2), w3 = _mm512_loadu_si512(wv + 3);
      const __m512i w4 = _mm512_loadu_si512(wv + 4), w5 = _mm512_loadu_si512(wv + 5);
      const __m512i w6 = _mm512_loadu_si512(wv + 6), w7 = _mm512_loadu_si512(wv + 7);
      // the scales: 32 bytes per 512 of codes, a line every other group (1.05x q8_0 batch-1 decode, 12 of 14 pairs)
      if (sb % 2 == 0) kvserve::prefetch_ahead<1, 16>(ws + sb * NR);
      const __m512 wsv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + sb * NR)));
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const int32_t* xa = reinterpret_cast<const int32_t*>(a.q + m * K + sb * QK);
        __m512i s0 = _mm512_set1_epi32(a.start[m * SB + sb]), s1 = _mm512_setzero_si512();
        __m512i& t0 = s0;
        __m512i& t1 = SPLIT ? s1 : s0;
        t0 = _mm512_dpbusd_epi32(t0, w0, _mm512_set1_epi32(xa[0]));
        t1 = _mm512_dpbusd_epi32(t1, w4, _mm512_set1_epi32(xa[4]));
        t0 = _mm512_dpbusd_epi32(t0, w1, _mm512_set1_epi32(xa[1]));
        t1 = _mm512_dpbusd_epi32(t1, w5, _mm512_set1_epi32(xa[5]));
        t0 = _mm512_dpbusd_epi32(t0, w2, _mm512_set1_epi32(xa[2]));
        t1 = _mm512_dpbusd_epi32(t1, w6, _mm512_set1_epi32(xa[6]));
        t0 = _mm512_dpbusd_epi32(t0, w3, _mm512_set1_epi32(xa[3]));
        t1 = _mm512_dpbusd_epi32(t1, w7, _mm512_set1_epi32(xa[7]));
        const __m512i sum = SPLIT ? _mm512_add_epi32(s0, s1) : s0;
        const __m512 sf = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.d[m * SB + sb]));
        acc[m] = _mm512_fmadd_ps(sf, wsv, acc[m]);
      }
    } else if constexpr (PER > 1) {  // w8a8: the group's PER x 8 weight vectors, then one token's chain at a time
      __m512i w[PER * 8];
      for (int bb = 0; bb < PER; ++bb) {
        const __m512i* wv = reinterpret_cast<const __m512i*>(wp + (sb * PER + bb) * QK * NR);
        kvserve::prefetch_ahead<8>(wv);
        for (int j = 0; j < 8; ++j) w[bb * 8 + j] = _mm512_loadu_si512(wv + j);
      }
      const __m512 wsv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + sb * NR)));
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const int32_t* xa = reinterpret_cast<const int32_t*>(a.q + m * K + sb * PER * QK);
        __m512i s0 = _mm512_set1_epi32(a.start[m * SB + sb]), s1 = _mm512_setzero_si512();
        __m512i& t1 = SPLIT ? s1 : s0;
#pragma GCC unroll 16
        for (int j = 0; j < PER * 8; j += 8) {
          for (int i = 0; i < 4; ++i) {
            s0 = _mm512_dpbusd_epi32(s0, w[j + i], _mm512_set1_epi32(xa[j + i]));
            t1 = _mm512_dpbusd_epi32(t1, w[j + i + 4], _mm512_set1_epi32(xa[j + i + 4]));
          }
        }
        const __m512i sum = SPLIT ? _mm512_add_epi32(s0, s1) : s0;
        const __m512 sf = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.d[m * SB + sb]));
        acc[m] = _mm512_fmadd_ps(sf, wsv, acc[m]);
      }
    } else {  // a group of any length: every token's chain kept across its blocks
      const __m512 wsv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + sb * NR)));
      __m512i s0[MT], s1[MT];
      for (int m = 0; m < MT; ++m) {
        s0[m] = _mm512_set1_epi32(a.start[m * SB + sb]);
        s1[m] = _mm512_setzero_si512();
      }
      for (int64_t b = sb * per; b < (sb + 1) * per; ++b) {
        const __m512i* wv = reinterpret_cast<const __m512i*>(wp + b * QK * NR);
        kvserve::prefetch_ahead<8>(wv);
        __m512i w[8];
        for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(wv + j);
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) {
          const int32_t* xa = reinterpret_cast<const int32_t*>(a.q + m * K + b * QK);
          __m512i& t1 = SPLIT ? s1[m] : s0[m];
          for (int j = 0; j < 4; ++j) {
            s0[m] = _mm512_dpbusd_epi32(s0[m], w[j], _mm512_set1_epi32(xa[j]));
            t1 = _mm512_dpbusd_epi32(t1, w[j + 4], _mm512_set1_epi32(xa[j + 4]));
          }
        }
      }
      for (int m = 0; m < MT; ++m) {
        const __m512i sum = SPLIT ? _mm512_add_epi32(s0[m], s1[m]) : s0[m];
        const __m512 sf = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.d[m * SB + sb]));
        acc[m] = _mm512_fmadd_ps(sf, wsv, acc[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) store16(acc[m], y + m * N);
}

// MT tokens x two groups of 16 rows (g and g + 1, their weights KB blocks apart): each broadcast activation word
// feeds both groups' vpdpbusd, so a block takes 16 weight loads and 8 MT broadcasts for 16 MT multiply-adds where
// two calls of `tile` take 16 + 16 MT. Used from PAIR_MIN_TOKENS, tails included; the same sums in the same order as
// `tile` on each group, so the same bits. Its weights are reused over a pass's ~11 tiles (from L1/L2), and a decode
// batch's next pair is prefetched by prefetch_slice, so the 8 KB in-stream prefetch is left to q8_0 alone: without it
// w8a8 ran 1.03-1.10x faster at 48-2,048 tokens over 30 layers' weights, q8_0 0.97-0.98x at 48-64 (and 1.01-1.02x
// above; one-off variant, SmolLM2's four shapes, 12 alternating rounds).
template <int MT, int PER, typename T>
inline void tile2(QAct a, const uint8_t* wp, const c10::Half* ws, T* y, int64_t N, int64_t K, int64_t KB,
                  int64_t per_arg) {
  const int64_t per = PER > 0 ? PER : per_arg;
  const int64_t SB = KB / per;
  const uint8_t* wp2 = wp + KB * QK * NR;
  const c10::Half* ws2 = ws + SB * NR;
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < SB; ++sb) {
    __m512i s0[MT], s1[MT];
    for (int m = 0; m < MT; ++m) s0[m] = s1[m] = _mm512_set1_epi32(a.start[m * SB + sb]);
#pragma GCC unroll 2
    for (int64_t b = sb * per; b < (sb + 1) * per; ++b) {
      const __m512i* va = reinterpret_cast<const __m512i*>(wp + b * QK * NR);
      const __m512i* vb = reinterpret_cast<const __m512i*>(wp2 + b * QK * NR);
      if constexpr (PER < 2) {  // see tile2's comment: w8a8 runs faster without
        kvserve::prefetch_ahead<8>(va);
        kvserve::prefetch_ahead<8>(vb);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512i wa = _mm512_loadu_si512(va + j), wb = _mm512_loadu_si512(vb + j);
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) {
          const __m512i xv = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(a.q + m * K + b * QK)[j]);
          s0[m] = _mm512_dpbusd_epi32(s0[m], wa, xv);
          s1[m] = _mm512_dpbusd_epi32(s1[m], wb, xv);
        }
      }
    }
    const __m512 wsa = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + sb * NR)));
    const __m512 wsb = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws2 + sb * NR)));
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512 d = _mm512_set1_ps(a.d[m * SB + sb]);
      acc0[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s0[m]), d), wsa, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s1[m]), d), wsb, acc1[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    store16(acc0[m], y + m * N);
    store16(acc1[m], y + m * N + NR);
  }
}

template <typename T>
using TileFn = void (*)(QAct, const uint8_t*, const c10::Half*, T*, int64_t, int64_t, int64_t, int64_t);

// Tokens per tile: 8 weight vectors + MT accumulators (+ chains and temporaries) within the 32 zmm registers.
constexpr int MT = 6;

// From how many tokens tile2 pays (SmolLM2's layer matmuls, 2 threads; `python -m kvserve.bench.linear_sweep
// --pair-tiles`). It was 128 (fifth session: 0.74x at 16 tokens, 0.93x at 32, 0.92-1.04x at 64, 1.12-1.25x from 128).
// Re-measured on 2026-12-07 with the threshold lowered so the switch compares both (two runs, q8_0 and w8a8):
// 0.77-0.79x at 8, 0.85-0.91x at 16, 0.99-1.06x at 32, 1.09-1.10x at 48, 1.12-1.17x at 64, 1.11-1.15x at 96.
constexpr int64_t PAIR_MIN_TOKENS = 48;

std::atomic<bool>& pair_switch() {  // on; tests and benchmarks compare it with one group per tile
  static std::atomic<bool> on{true};
  return on;
}
bool pair_tiles() { return pair_switch().load(std::memory_order_relaxed); }

// Slice t of `tiles` of the `bytes` at p, into L2. A decode batch (one pass of at most MC tokens) reads each row-group
// pair's weights from DRAM once, at its first tile: so while a pair's tiles run, the next pair is prefetched a slice
// per tile (1.07-1.11x at 48-64 tokens over 30 layers' weights, w8a8 in a one-off linear_sweep variant; whole w8a8
// decode steps of 64 rows 1.012x and 1.042x, `kvserve.bench.kernel_ab --decode-plan`; in a prompt's passes, whose
// weight chunks sit in L2, it measured 0.93-0.96x, so it is not done there).
inline void prefetch_slice(const uint8_t* p, int64_t bytes, int64_t t, int64_t tiles) {
  const int64_t slice = (bytes / tiles + 63) / 64 * 64, end = std::min(bytes, (t + 1) * slice);
  for (int64_t o = t * slice; o < end; o += 64) __builtin_prefetch(p + o, 0, 2);
}

template <int PER, typename T>
void gemm_vnni_per(QAct a, const uint8_t* wp, const c10::Half* ws, T* y, int64_t M, int64_t N, int64_t K,
                   int64_t SB) {
  static const TileFn<T> tiles[MT + 1] = {nullptr, tile<1, PER, T>, tile<2, PER, T>, tile<3, PER, T>,
                                          tile<4, PER, T>, tile<5, PER, T>, tile<6, PER, T>};
  const int64_t KB = K / QK, per = KB / SB, G = N / NR;
  // row groups in pairs, the tails of each MC-token pass too (64 = 10 x 6 + 4: the 4-token tail through two single
  // group tiles took 5% of a w8a8 prompt's time for 6% of its tokens, 1.26x a pair tile's cost per token)
  static const TileFn<T> pairs[MT + 1] = {nullptr, tile2<1, PER, T>, tile2<2, PER, T>, tile2<3, PER, T>,
                                          tile2<4, PER, T>, tile2<5, PER, T>, tile2<6, PER, T>};
  if (M >= PAIR_MIN_TOKENS && G % 2 == 0 && pair_tiles()) {
    for_tile_chunks<MT>(M, G / 2, 2 * K * NR, [&](int64_t gp, int64_t m, int64_t n) {
      const QAct am{a.q + m * K, a.d + m * SB, a.start + m * SB};
      const int64_t g = 2 * gp;
      const uint8_t* wg = wp + g * KB * QK * NR;
      const c10::Half* sg = ws + g * SB * NR;
      if (M <= MC && g + 2 < G) prefetch_slice(wg + 2 * KB * QK * NR, 2 * KB * QK * NR, m / MT, (M + MT - 1) / MT);
      if (n == MT) {  // full tiles inlined, the tail through the table
        tile2<MT, PER, T>(am, wg, sg, y + m * N + g * NR, N, K, KB, per);
      } else {
        pairs[n](am, wg, sg, y + m * N + g * NR, N, K, KB, per);
      }
    });
    return;
  }
  for_tiles<MT>(M, G, [&](int64_t g, int64_t m, int64_t n) {
    const QAct am{a.q + m * K, a.d + m * SB, a.start + m * SB};
    const uint8_t* wg = wp + g * KB * QK * NR;
    const c10::Half* sg = ws + g * SB * NR;
    if (n == MT) {  // full tiles inlined, the tail through the table
      tile<MT, PER, T>(am, wg, sg, y + m * N + g * NR, N, K, KB, per);
    } else {
      tiles[n](am, wg, sg, y + m * N + g * NR, N, K, KB, per);
    }
  });
}

template <typename T>
void gemm_vnni(QAct a, const uint8_t* wp, const c10::Half* ws, T* y, int64_t M, int64_t N, int64_t K, int64_t SB) {
  const int64_t per = K / QK / SB;
  if (per == 1) {
    gemm_vnni_per<1, T>(a, wp, ws, y, M, N, K, SB);
  } else if (per == 2) {
    gemm_vnni_per<2, T>(a, wp, ws, y, M, N, K, SB);
  } else {
    gemm_vnni_per<0, T>(a, wp, ws, y, M, N, K, SB);
  }
}

// Q4_0 / Q4_1 (GGUF's 4-bit blocks of 32): w = d q + m with q in 0..15 (Q4_0: m = -8 d), one fp16 d and m per
// (row, block), codes packed two per byte. Unsigned nibbles are vpdpbusd's unsigned operand as they are; a block's
// sum is d d_x sum(q q_x) + m d_x sum(q_x), and sum(q_x) is the activation block sum quantize_rows already keeps
// (start = -128 sum). Per group and block: four 64-byte loads, whose low nibbles are operand vectors 0..3 and high
// nibbles 4..7 (the layout of kvserve.model.quant.pack_q4).
template <int MT, typename T>
inline void tile_q4(QAct a, const uint8_t* wp, const c10::Half* dm, T* y, int64_t N, int64_t K, int64_t KB) {
  constexpr bool SPLIT = MT == 1;
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < KB; ++b) {
    const __m512i* wv = reinterpret_cast<const __m512i*>(wp + b * QK * NR / 2);
    kvserve::prefetch_ahead<4>(wv);
    const __m512i v0 = _mm512_loadu_si512(wv + 0), v1 = _mm512_loadu_si512(wv + 1);
    const __m512i v2 = _mm512_loadu_si512(wv + 2), v3 = _mm512_loadu_si512(wv + 3);
    const __m512i w0 = _mm512_and_si512(v0, low), w4 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low);
    const __m512i w1 = _mm512_and_si512(v1, low), w5 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low);
    const __m512i w2 = _mm512_and_si512(v2, low), w6 = _mm512_and_si512(_mm512_srli_epi16(v2, 4), low);
    const __m512i w3 = _mm512_and_si512(v3, low), w7 = _mm512_and_si512(_mm512_srli_epi16(v3, 4), low);
    const c10::Half* dmb = dm + b * 2 * NR;
    kvserve::prefetch_ahead<1, 4>(dmb);  // d and m: 64 bytes per 256 of codes (1.045x q4_1 decode, 10 of 14 pairs)
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dmb)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dmb + NR)));
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const int32_t* xa = reinterpret_cast<const int32_t*>(a.q + m * K + b * QK);
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      __m512i& t0 = s0;
      __m512i& t1 = SPLIT ? s1 : s0;
      t0 = _mm512_dpbusd_epi32(t0, w0, _mm512_set1_epi32(xa[0]));
      t1 = _mm512_dpbusd_epi32(t1, w4, _mm512_set1_epi32(xa[4]));
      t0 = _mm512_dpbusd_epi32(t0, w1, _mm512_set1_epi32(xa[1]));
      t1 = _mm512_dpbusd_epi32(t1, w5, _mm512_set1_epi32(xa[5]));
      t0 = _mm512_dpbusd_epi32(t0, w2, _mm512_set1_epi32(xa[2]));
      t1 = _mm512_dpbusd_epi32(t1, w6, _mm512_set1_epi32(xa[6]));
      t0 = _mm512_dpbusd_epi32(t0, w3, _mm512_set1_epi32(xa[3]));
      t1 = _mm512_dpbusd_epi32(t1, w7, _mm512_set1_epi32(xa[7]));
      const __m512i s = SPLIT ? _mm512_add_epi32(s0, s1) : s0;
      const float da = a.d[m * KB + b];
      const float sa = static_cast<float>(-a.start[m * KB + b] / 128) * da;  // d_x sum(q_x)
      acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(da)), dv, acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sa), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) store16(acc[m], y + m * N);
}

template <typename T>
using TileQ4Fn = void (*)(QAct, const uint8_t*, const c10::Half*, T*, int64_t, int64_t, int64_t);

template <typename T>
void gemm_q4(QAct a, const uint8_t* wp, const c10::Half* dm, T* y, int64_t M, int64_t N, int64_t K) {
  static const TileQ4Fn<T> tiles[MT + 1] = {nullptr, tile_q4<1, T>, tile_q4<2, T>, tile_q4<3, T>, tile_q4<4, T>,
                                            tile_q4<5, T>, tile_q4<6, T>};
  const int64_t KB = K / QK;
  for_tiles<MT>(M, N / NR, [&](int64_t g, int64_t m, int64_t n) {
    const QAct am{a.q + m * K, a.d + m * KB, a.start + m * KB};
    const uint8_t* wg = wp + g * KB * QK * NR / 2;
    if (n == MT) {
      tile_q4<MT, T>(am, wg, dm + g * KB * 2 * NR, y + m * N + g * NR, N, K, KB);
    } else {
      tiles[n](am, wg, dm + g * KB * 2 * NR, y + m * N + g * NR, N, K, KB);
    }
  });
}
#endif

// Scale groups per row (K/32 for q8_0, K/64 for w8a8), read off the scales' shape: fp16, one per (row, group).
int64_t check_weights(const torch::Tensor& packed, const torch::Tensor& scales, int64_t K) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 4 && packed.size(2) == 8 && packed.size(3) == 64,
              "packed weights must be uint8 (N/16, K/32, 8, 64)");
  TORCH_CHECK(packed.size(1) * QK == K, "weights have K = ", packed.size(1) * QK, ", activations ", K);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == packed.size(0) && scales.size(2) == NR &&
                  scales.dtype() == torch::kFloat16 && scales.size(1) >= 1 && packed.size(1) % scales.size(1) == 0,
              "scales must be float16 (N/16, SB, 16) with SB dividing K/32 (scale groups of K/SB inputs)");
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous(), "weights must be contiguous");
  return scales.size(1);
}

template <typename T>
void quantize(const torch::Tensor& x, torch::Tensor& xq, torch::Tensor& xs, torch::Tensor& xstart, int64_t bs) {
  quantize_rows<T>(x.data_ptr<T>(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xstart.data_ptr<int32_t>(),
                   x.size(0), x.size(1), bs);
}

}  // namespace

bool has_avx2() {
#ifdef KVSERVE_AVX2
  return true;
#else
  return false;
#endif
}

bool has_vnni() {
#ifdef KVSERVE_VNNI
  return true;
#else
  return false;
#endif
}

// Which code runs a call: the best compiled in (VNNI, else AVX2, else portable), or one forced (tests compare them).
enum Path : int64_t { kBest = 0, kAvx2 = 1, kPortable = 2 };

Path pick(int64_t path) {
  TORCH_CHECK(path >= kBest && path <= kPortable, "path must be 0 (best), 1 (AVX2) or 2 (portable)");
#ifndef KVSERVE_AVX2
  TORCH_CHECK(path != kAvx2, "the AVX2 path was not compiled in (this CPU lacks AVX2, F16C or FMA)");
#endif
  if (path != kBest) return static_cast<Path>(path);
#if defined(KVSERVE_VNNI)
  return kBest;
#elif defined(KVSERVE_AVX2)
  return kAvx2;
#else
  return kPortable;
#endif
}

// The int8 matmul on the chosen path, with SB scale groups per row.
template <typename T>
void int8_gemm(Path use, QAct a, const uint8_t* wp, const c10::Half* ws, T* y, int64_t M, int64_t N, int64_t K,
               int64_t SB) {
#ifdef KVSERVE_VNNI
  if (use == kBest) return gemm_vnni<T>(a, wp, ws, y, M, N, K, SB);
#endif
#ifdef KVSERVE_AVX2
  if (use == kAvx2) return gemm_avx2<T>(a, wp, ws, y, M, N, K, SB);
#endif
  gemm_generic<T, c10::Half>(a, wp, ws, y, M, N, K, SB);
}

// The two linear kernels on raw buffers: x (M, K) -> y (M, N), x's activations quantized into the caller's xq (M * K
// int8), xs and xstart (M * K / 32 each at most). The tensor entry points below allocate these per call; the decode
// plan (decode_step.cpp) keeps them across steps. SB: scale groups per row (check_weights).
template <typename T>
void int8_linear_raw(const T* x, T* y, int64_t M, int64_t N, int64_t K, const uint8_t* wp, const c10::Half* ws,
                     int64_t SB, Path use, int8_t* xq, float* xs, int32_t* xstart) {
  quantize_rows<T>(x, xq, xs, xstart, M, K, K / SB);
  int8_gemm<T>(use, QAct{xq, xs, xstart}, wp, ws, y, M, N, K, SB);
}

template <typename T>
void q4_linear_raw(const T* x, T* y, int64_t M, int64_t N, int64_t K, const uint8_t* wp, const c10::Half* dm,
                   Path use, int8_t* xq, float* xs, int32_t* xstart) {
  quantize_rows<T>(x, xq, xs, xstart, M, K, QK);
  const QAct a{xq, xs, xstart};
#ifdef KVSERVE_VNNI
  if (use == kBest) {
    gemm_q4<T>(a, wp, dm, y, M, N, K);
    return;
  }
#endif
#ifdef KVSERVE_AVX2
  if (use == kAvx2) {
    gemm_q4_avx2<T>(a, wp, dm, y, M, N, K);
    return;
  }
#endif
  gemm_q4_generic<T>(a, wp, dm, y, M, N, K);
}

// x (M, K) -> y (M, N); `path` forces a path (Path above).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32");
  const int64_t SB = check_weights(packed, scales, K);
  TORCH_CHECK(K / SB <= 65536, "a scale group's int32 sum must not overflow: at most 65536 inputs per group");
  const Path use = pick(path);
  const int64_t N = packed.size(0) * NR;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto xs = torch::empty({M, SB}, x.options().dtype(torch::kFloat32));
  auto xstart = torch::empty({M, SB}, x.options().dtype(torch::kInt32));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    int8_linear_raw<T>(x.data_ptr<T>(), y.data_ptr<T>(), M, N, K, packed.data_ptr<uint8_t>(),
                       scales.data_ptr<c10::Half>(), SB, use, xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                       xstart.data_ptr<int32_t>());
  };
  if (x.dtype() == torch::kFloat32) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
  return y;
}

// The checks of a Q4_0 / Q4_1 weight against activations of width K.
void check_q4_weights(const torch::Tensor& packed, const torch::Tensor& dm, int64_t K) {
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 4 && packed.size(2) == 4 && packed.size(3) == 64 &&
                  packed.is_contiguous(), "packed weights must be contiguous uint8 (N/16, K/32, 4, 64)");
  TORCH_CHECK(packed.size(1) * QK == K, "weights have K = ", packed.size(1) * QK, ", activations ", K);
  TORCH_CHECK(dm.dtype() == torch::kFloat16 && dm.dim() == 4 && dm.size(0) == packed.size(0) &&
                  dm.size(1) == packed.size(1) && dm.size(2) == 2 && dm.size(3) == NR && dm.is_contiguous(),
              "dm must be contiguous float16 (N/16, K/32, 2, 16)");
}

// Q4_0 / Q4_1: x (M, K) -> y (M, N); packed (N/16, K/32, 4, 64) uint8, dm (N/16, K/32, 2, 16) float16 (d, then m).
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& dm, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  check_q4_weights(packed, dm, K);
  const Path use = pick(path);
  const int64_t N = packed.size(0) * NR;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto xs = torch::empty({M, K / QK}, x.options().dtype(torch::kFloat32));
  auto xstart = torch::empty({M, K / QK}, x.options().dtype(torch::kInt32));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    q4_linear_raw<T>(x.data_ptr<T>(), y.data_ptr<T>(), M, N, K, packed.data_ptr<uint8_t>(),
                     dm.data_ptr<c10::Half>(), use, xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                     xstart.data_ptr<int32_t>());
  };
  if (x.dtype() == torch::kFloat32) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
  return y;
}

// 4-bit (Q4_0 / Q4_1) or q8_0 weights as a bfloat16 (K, N) matrix, W^T: for a prefill chunk on a CPU with AMX,
// whose bf16 tile matmuls (oneDNN) outrun the int8 dot products above by far once a step has more than ~100 tokens.
// Built per call, one layer at a time, so no second copy of the model stays in memory. Q4: w = d q + m in float32
// (one fma); q8_0: w = d (c - 128); then rounded to bf16 (relative error <= 2^-9, the size of the int8 activation
// rounding it replaces). Both layouts hold operand vectors j (k = 4j .. 4j + 3 of a block) of 16 rows x 4 bytes.
torch::Tensor dequantize_t(const torch::Tensor& packed, const torch::Tensor& scales) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 4 && packed.size(3) == 64 && packed.is_contiguous(),
              "packed weights must be contiguous uint8 (N/16, K/32, 4 or 8, 64)");
  const bool q4 = packed.size(2) == 4;
  TORCH_CHECK(q4 || packed.size(2) == 8, "packed weights must be (N/16, K/32, 4, 64) (4-bit) or (.., 8, 64) (q8_0)");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == packed.size(0) &&
                  scales.size(1) == packed.size(1) && scales.size(-1) == NR &&
                  (q4 ? scales.dim() == 4 && scales.size(2) == 2 : scales.dim() == 3),
              "scales must be contiguous float16: dm (N/16, K/32, 2, 16) for 4-bit, (N/16, K/32, 16) for q8_0");
  const int64_t G = packed.size(0), KB = packed.size(1), N = G * NR, K = KB * QK;
  const int64_t wbytes = q4 ? QK * NR / 2 : QK * NR;  // per (row group, block)
  const int64_t sstride = q4 ? 2 * NR : NR;
  auto wt = torch::empty({K, N}, packed.options().dtype(torch::kBFloat16));
  c10::BFloat16* dst = wt.data_ptr<c10::BFloat16>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* dp = scales.data_ptr<c10::Half>();
  // one (row group, block) per index: 16 output columns x 32 k
  at::parallel_for(0, G * KB, 64, [&](int64_t i0, int64_t i1) {
#if defined(KVSERVE_VNNI) && defined(__AVX512VBMI__)
    __m512i idx[4];  // operand vector bytes 4r + t (rows r = 0..15) for each t: one k, all 16 columns
    for (int t = 0; t < 4; ++t) {
      alignas(64) uint8_t b[64] = {};
      for (int r = 0; r < NR; ++r) b[r] = static_cast<uint8_t>(4 * r + t);
      idx[t] = _mm512_load_si512(b);
    }
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / KB, b = i % KB;
      const uint8_t* wb = wp + i * wbytes;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dp + i * sstride)));
      const __m512 m = q4 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dp + i * sstride + NR)))
                          : _mm512_mul_ps(d, _mm512_set1_ps(-128.f));  // q8_0: d (c - 128) = d c - 128 d, exact
      for (int j = 0; j < 8; ++j) {
        __m512i vec;
        if (q4) {
          const __m512i raw = _mm512_loadu_si512(wb + (j % 4) * 64);
          vec = j < 4 ? _mm512_and_si512(raw, low) : _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        } else {
          vec = _mm512_loadu_si512(wb + j * 64);
        }
        for (int t = 0; t < 4; ++t) {
          const __m128i codes = _mm512_castsi512_si128(_mm512_permutexvar_epi8(idx[t], vec));
          const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), d, m);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (b * QK + 4 * j + t) * N + g * NR),
                              (__m256i)_mm512_cvtneps_pbh(w));
        }
      }
    }
#else
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / KB, b = i % KB;
      const uint8_t* wb = wp + i * wbytes;
      for (int j = 0; j < 8; ++j)
        for (int r = 0; r < NR; ++r)
          for (int t = 0; t < 4; ++t) {
            const float d = static_cast<float>(dp[i * sstride + r]);
            float w;
            if (q4) {
              const uint8_t byte = wb[(j % 4) * 64 + 4 * r + t];
              const int q = j < 4 ? (byte & 0x0F) : (byte >> 4);
              w = std::fma(static_cast<float>(q), d, static_cast<float>(dp[i * sstride + NR + r]));
            } else {
              w = std::fma(static_cast<float>(wb[j * 64 + 4 * r + t]), d, d * -128.f);
            }
            dst[(b * QK + 4 * j + t) * N + g * NR + r] = c10::BFloat16(w);
          }
    }
#endif
  });
  return wt;
}

bool has_amx() {
#ifdef KVSERVE_AMX
  return kvserve::amx_enabled();  // KVSERVE_AMX=0 turns the bf16 prefill route off too
#else
  return false;
#endif
}

// The activation quantization alone (blocks of bs values): (codes int8, scales, -128 * code sums), for tests.
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x, int64_t bs) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && bs > 0 && x.size(1) % bs == 0,
              "x must be contiguous (M, K) with K a multiple of the block size");
  TORCH_CHECK(x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto xs = torch::empty({M, K / bs}, x.options().dtype(torch::kFloat32));
  auto xstart = torch::empty({M, K / bs}, x.options().dtype(torch::kInt32));
  if (x.dtype() == torch::kFloat32) {
    quantize<float>(x, xq, xs, xstart, bs);
  } else {
    quantize<c10::BFloat16>(x, xq, xs, xstart, bs);
  }
  return {xq, xs, xstart};
}

#ifndef KVSERVE_NO_PYBIND  // decode_step.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_vnni", &has_vnni, "whether the AVX512-VNNI path was compiled in");
  m.def("set_prefetch_bytes", &kvserve::set_prefetch_bytes,
        "software prefetch distance in bytes (0: off), for benchmarks");
  m.def("prefetch_bytes", [] { return kvserve::prefetch_bytes(); }, "the software prefetch distance now");
  m.def("has_avx2", &has_avx2, "whether the AVX2 path was compiled in");
  m.def("set_pair_tiles", [](bool on) { pair_switch().store(on); },
        "int8 tiles over two row groups at once for calls of 48+ tokens (on by default), for tests and benchmarks");
  m.def("set_dynamic_tiles", [](bool on) { dynamic_switch().store(on); },
        "int8 matmuls of 65+ tokens: units of cache-sized weight chunks taken from a shared counter (on) or each "
        "thread's fixed half of the row groups (off), for benchmarks");
  m.def("int8_linear", &int8_linear, "y = x W^T over int8 weights (q8_0 or w8a8) with activations quantized on the fly");
  m.def("q4_linear", &q4_linear, "y = x W^T over Q4_0 / Q4_1 weights with activations quantized to blocks of 32");
  m.def("dequantize_t", &dequantize_t, "4-bit or q8_0 weights as a bfloat16 (K, N) matrix W^T (prefill on AMX)");
  m.def("has_amx", &has_amx, "whether this CPU and OS run AMX tiles (oneDNN's bf16 matmuls use them)");
  m.def("quantize_activations", &quantize_activations, "x -> (int8 codes, per-block scales, -128 * per-block sums)");
}
#endif
