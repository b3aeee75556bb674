// Decode attention straight over the paged KV cache: no gather copy, one pass per (sequence, kv head) (bf16: per
// run of a sequence's verification rows and kv head).
//
// q:            (B, H, D)            float32 or bfloat16
// k/v_cache:    (NB, BS, Hkv, D)     same dtype as q
// block_tables: (B, MB) int64
// seq_lens:     (B,) int32           context length of each sequence, including the new token
// out:          (B, H, D)            same dtype as q
// scores:       (B, Hkv, S) float32  optional, S >= every seq_len: each row's attention probabilities, summed over
//                                    the query heads of each KV head, are ADDED here (per-key attention mass for KV
//                                    eviction; a caller sums a step's layers into one buffer)
//
// Each worker takes whole (sequence, kv head) pairs, so the G = H / Hkv query heads that share a KV head read every
// key and value row once. Scores for the whole context stay in a per-thread buffer (contexts are at most a few
// thousand tokens), then a numerically safe softmax, then one weighted pass over the values.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <array>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using kvserve::to_float;
#ifdef KVSERVE_AVX512_BF16
using kvserve::exp512;
#endif

inline void from_float(float x, float* dst) { *dst = x; }
inline void from_float(float x, c10::BFloat16* dst) { *dst = c10::BFloat16(x); }

// Every cache line of [p, p + bytes), for reading or (write) for writing, into L1 (LOCALITY 3) or L2 (2); a
// prefetch never faults.
template <int LOCALITY = 3>
inline void prefetch_span(const void* p, int64_t bytes, bool write = false) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write) {
      __builtin_prefetch(c + off, 1, LOCALITY);
    } else {
      __builtin_prefetch(c + off, 0, LOCALITY);
    }
  }
}

// One head's `bytes` in each of a block's `rows` token rows (stride `row` elements) from p.
template <typename T>
inline void prefetch_block(const T* p, int64_t row, int64_t rows, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) prefetch_span(p + r * row, bytes);
}

template <typename T, int D>
void decode_kernel(const T* __restrict q, const T* __restrict k_cache, const T* __restrict v_cache,
                   const int64_t* __restrict tables, const int32_t* __restrict lens, T* __restrict out,
                   int64_t B, int64_t H, int64_t Hkv, int64_t BS, int64_t MB, float scale, float* __restrict sc,
                   int64_t SL) {
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;     // elements per token in a block
  const int64_t blk = BS * row;    // elements per block
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> qf(G * D);
    std::vector<float> acc(G * D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / Hkv, h = idx % Hkv;
      const int64_t L = lens[b];
      if (L <= 0) continue;
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(q[(b * H + h * G + g) * D + d]) * scale;
      const int64_t* table = tables + b * MB;
      // scores = q . k for every context token
      for (int64_t t = 0; t < L; ++t) {
        const T* krow = k_cache + table[t / BS] * blk + (t % BS) * row + h * D;
        float kf[D];
        for (int64_t d = 0; d < D; ++d) kf[d] = to_float(krow[d]);
        for (int64_t g = 0; g < G; ++g) {
          float s = 0.f;
          const float* qg = qf.data() + g * D;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * L + t] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = -INFINITY;
        for (int64_t t = 0; t < L; ++t) m = sg[t] > m ? sg[t] : m;
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
      }
      if (sc != nullptr) {  // this (row, kv head) is one worker's alone: no race
        float* dst = sc + (b * Hkv + h) * SL;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t t = 0; t < L; ++t) dst[t] += scores[g * L + t];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const T* vrow = v_cache + table[t / BS] * blk + (t % BS) * row + h * D;
        float vf[D];
        for (int64_t d = 0; d < D; ++d) vf[d] = to_float(vrow[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * vf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) from_float(acc[g * D + d], out + (b * H + h * G + g) * D + d);
    }
  });
}

#ifdef KVSERVE_AVX512_BF16
// exp(s - max) of one row of scores in place, 16 lanes at a time (softmax_row without the division): (max, sum).
inline std::pair<float, float> exp_row(float* s, int64_t L) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= L; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t));
  float m = _mm512_reduce_max_ps(mv);
  for (; t < L; ++t) m = s[t] > m ? s[t] : m;
  const __m512 mb = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  for (t = 0; t + 16 <= L; t += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), mb));
    _mm512_storeu_ps(s + t, e);
    sv = _mm512_add_ps(sv, e);
  }
  if (t < L) {
    const __mmask16 k = (__mmask16)((1u << (L - t)) - 1);
    __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), mb));
    e = _mm512_maskz_mov_ps(k, e);
    _mm512_mask_storeu_ps(s + t, k, e);
    sv = _mm512_add_ps(sv, e);
  }
  return {m, _mm512_reduce_add_ps(sv)};
}

// Softmax of one row of scores in place, 16 lanes at a time.
inline void softmax_row(float* s, int64_t L) {
  const __m512 inv = _mm512_set1_ps(1.f / exp_row(s, L).second);
  int64_t t = 0;
  for (; t + 16 <= L; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
  for (; t < L; ++t) s[t] *= _mm512_cvtss_f32(inv);
}

inline float hsum512(__m512 s) {
  // fold 16 lanes to 8 before the (slow) horizontal sum
  __m256 lo = _mm512_castps512_ps256(s);
  __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
  __m256 s8 = _mm256_add_ps(lo, hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

// v[t] (16 lanes each) -> one vector whose lane t is the sum of v[t]'s lanes.
inline __m512 reduce16(const __m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 / 8-15 of w[i] hold 8 partial sums of v[2i] / v[2i+1]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane k of x[i] holds 4 partial sums of v[4i + k]
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane k: [v[8i + k] x2 partials, v[8i + 4 + k] x2 partials]
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4k + m now holds the sum of v[k + 4m]
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// q.k of one query (NQ bf16 vectors) with the tn <= 16 key rows of a block at kb (stride row), scaled, into dst: a
// full block as 16 dot products summed across lanes in one transpose tree, a partial one a dot product at a time.
template <int NQ>
inline void block_scores(const __m512bh* qj, const c10::BFloat16* kb, int64_t row, int64_t tn, float scale,
                         float* dst) {
  if (tn == 16) {
    __m512 part[16];
    for (int r = 0; r < 16; ++r) {
      const c10::BFloat16* krow = kb + r * row;
      __m512 acc = _mm512_setzero_ps();
      for (int i = 0; i < NQ; ++i) acc = _mm512_dpbf16_ps(acc, qj[i], (__m512bh)_mm512_loadu_si512(krow + i * 32));
      part[r] = acc;
    }
    _mm512_storeu_ps(dst, _mm512_mul_ps(reduce16(part), _mm512_set1_ps(scale)));
    return;
  }
  for (int64_t r = 0; r < tn; ++r) {
    const c10::BFloat16* krow = kb + r * row;
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < NQ; ++i) acc = _mm512_dpbf16_ps(acc, qj[i], (__m512bh)_mm512_loadu_si512(krow + i * 32));
    dst[r] = hsum512(acc) * scale;
  }
}

// Consecutive rows that verify speculative drafts of one sequence: row b + 1 continues row b's run when it is one
// token longer and its block table agrees over row b's blocks (the runner gives a request's k + 1 rows one table).
// Returns the runs' first rows, and B at the end. A run's rows read exactly the keys and values they would read
// alone (row j: positions < lens[j], through the last row's table, equal to its own there), so grouping changes
// only how often the cache is read: once per run instead of once per row. Below GROUP_MIN_CONTEXT the rows stay
// apart: their KV is still in cache for the next row, and more, smaller work items balance the threads better
// (`python -m kvserve.bench.micro --verify-shapes`: grouping 7-10% slower at 256-512 tokens, 1.3-1.5x faster at
// 2048 for 4-8 rows).
// The AMX kernel below groups at every context (its tiles take a run's queries together).
constexpr int32_t GROUP_MIN_CONTEXT = 1024;

// The split path for a few sequences (decode_split_bf16) on or off, for tests and benchmarks.
inline std::atomic<bool>& split_switch() {
  static std::atomic<bool> on{true};
  return on;
}

inline std::vector<int64_t> row_runs(const int64_t* tables, const int32_t* lens, int64_t B, int64_t MB, int64_t BS,
                                     int32_t min_context = GROUP_MIN_CONTEXT) {
  std::vector<int64_t> starts;
  starts.reserve(B + 1);
  for (int64_t b = 0; b < B; ++b) {
    bool cont = b > 0 && lens[b - 1] >= min_context && lens[b] == lens[b - 1] + 1;
    if (cont) {
      const int64_t nb = std::min<int64_t>((lens[b - 1] + BS - 1) / BS, MB);
      cont = std::memcmp(tables + (b - 1) * MB, tables + b * MB, nb * sizeof(int64_t)) == 0;
    }
    if (!cont) starts.push_back(b);
  }
  starts.push_back(B);
  return starts;
}

// The value pass for M queries of one KV head: out[j] = sum_t p[j][t] v[t], the M x D / 16 float32 accumulators in
// registers (M is a template argument, so they are not spilled to memory between tokens) and each value row
// converted once for all M. p: M rows of L probabilities (0 past a row's own context). PF: each block prefetches
// the value rows AHEAD blocks on (the caller prefetched the first AHEAD).
constexpr int64_t AHEAD = 2;  // blocks of prefetch distance in decode_kernel_bf16_avx512

template <int D, int M, bool PF>
void value_pass(const float* __restrict p, int64_t L, const c10::BFloat16* __restrict v_cache,
                const int64_t* __restrict table, int64_t blk, int64_t row, int64_t BS, int64_t h, __m512* out) {
  constexpr int NV = D / 16;
  __m512 acc[M][NV];
  for (int j = 0; j < M; ++j)
    for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_setzero_ps();
  const int64_t nblocks = (L + BS - 1) / BS;
  if constexpr (!PF) {  // blocks x rows (the split path's form; the loop below measured ~1% slower at one sequence)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
      const int64_t t0 = bi * BS, tn = std::min<int64_t>(BS, L - t0);
      const c10::BFloat16* vb = v_cache + table[bi] * blk + h * D;
      for (int64_t r = 0; r < tn; ++r) {
        const c10::BFloat16* vrow = vb + r * row;
        __m512 vf[NV];
        for (int i = 0; i < NV; ++i) {
          __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + i * 16));
          vf[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        }
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          const __m512 pj = _mm512_set1_ps(p[j * L + t0 + r]);
#pragma GCC unroll 8
          for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_fmadd_ps(pj, vf[i], acc[j][i]);
        }
      }
    }
    for (int j = 0; j < M; ++j)
      for (int i = 0; i < NV; ++i) out[j * NV + i] = acc[j][i];
    return;
  }
  // with the prefetch, one loop over the tokens, not blocks x rows: there GCC stored all M x NV accumulators to the
  // stack on every row of the nested form (1.2x slower); the sums are the same, in the same order
  const c10::BFloat16* vrow = nullptr;
  for (int64_t t = 0, r = 0, bi = 0; t < L; ++t) {
    if (r == 0) {
      vrow = v_cache + table[bi] * blk + h * D;
      if (PF && bi + AHEAD < nblocks) prefetch_block(v_cache + table[bi + AHEAD] * blk + h * D, row, BS, D * 2);
    }
    __m512 vf[NV];
    for (int i = 0; i < NV; ++i) {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + i * 16));
      vf[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
#pragma GCC unroll 8
    for (int j = 0; j < M; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j * L + t]);
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_fmadd_ps(pj, vf[i], acc[j][i]);
    }
    vrow += row;
    if (++r == BS) r = 0, ++bi;
  }
  for (int j = 0; j < M; ++j)
    for (int i = 0; i < NV; ++i) out[j * NV + i] = acc[j][i];
}

// Queries per value-pass tile: M x D / 16 accumulators + D / 16 value vectors within the 32 zmm registers.
template <int D>
constexpr int VT = D / 16 <= 4 ? 6 : (D / 16 <= 8 ? 3 : 1);

template <int D>
using ValuePassFn = void (*)(const float*, int64_t, const c10::BFloat16*, const int64_t*, int64_t, int64_t, int64_t,
                             int64_t, __m512*);

template <int D, bool PF, int... Ms>
constexpr std::array<ValuePassFn<D>, sizeof...(Ms) + 1> value_table(std::integer_sequence<int, Ms...>) {
  return {nullptr, &value_pass<D, Ms + 1, PF>...};
}

// value_pass for 1..VT queries, without / with the look-ahead prefetch
template <int D, bool PF = false>
constexpr auto v_tables = value_table<D, PF>(std::make_integer_sequence<int, VT<D>>{});

// A few sequences (fewer (sequence, KV head) items than two per thread; one sequence: 3 items for 2 threads) leave a
// thread idle and each item reads 128 of every 384 bytes of its tokens' rows from cold memory. Here each sequence's
// context is cut into `P` runs of whole blocks, item (part, sequence, head) in that order, so a thread takes the same
// token range for every head (their rows stay in L2 across the heads) and the parts balance; each part keeps its
// queries' max, exp sum and unnormalised p.v, merged after (flash-decoding's split). Single rows only (no
// verification runs, no eviction scores). The KV is cold (a step's weights streamed through the caches since this
// layer's last step) and the per-head loops below prefetch one block ahead, ~2 KB in flight; so at its first head a
// thread prefetches its part's K and V blocks whole (every head's rows, contiguous) into L2 at once, up to 768 KB
// (a 2,048-token context), and the head passes read them from there. Same arithmetic, same bits; over 30 layers'
// caches 1.37x at 1,024 tokens, 1.11x at 2,048 over 512 KB, ~1.0x at 256 (`kvserve.bench.kernel_ab`; 768 KB and
// 1 MB tied at 4,000; docs/benchmarks.md).
template <int D>
void decode_split_bf16(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict k_cache,
                       const c10::BFloat16* __restrict v_cache, const int64_t* __restrict tables,
                       const int32_t* __restrict lens, c10::BFloat16* __restrict out, int64_t B, int64_t H,
                       int64_t Hkv, int64_t BS, int64_t MB, float scale, int64_t P) {
  constexpr int NQ = D / 32;
  constexpr int NV = D / 16;
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;
  const int64_t blk = BS * row;
  const int64_t items = B * Hkv;  // per part
  // per (part, sequence, head, query): max, exp sum, p.v (D floats)
  std::vector<float> pm(P * items * G), pl(P * items * G), pacc(P * items * G * D);
  at::parallel_for(0, P * items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<__m512bh> qv(G * NQ);
    std::vector<__m512> acc(G * NV);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t part = idx / items, b = (idx % items) / Hkv, h = idx % Hkv;
      const int64_t slot = idx * G;  // this item's first query in the partial buffers
      const int64_t L = lens[b];
      const int64_t nblocks = L > 0 ? (L + BS - 1) / BS : 0;
      const int64_t blo = nblocks * part / P, bhi = nblocks * (part + 1) / P;
      const int64_t t_lo = blo * BS, t_hi = std::min<int64_t>(bhi * BS, L), n = t_hi - t_lo;
      if (n <= 0) {
        for (int64_t j = 0; j < G; ++j) pl[slot + j] = 0.f, pm[slot + j] = -INFINITY;
        continue;
      }
      scores.resize(G * n);
      for (int64_t j = 0; j < G; ++j)
        for (int i = 0; i < NQ; ++i)
          qv[j * NQ + i] = (__m512bh)_mm512_loadu_si512(q + (b * H + h * G + j) * D + i * 32);
      const int64_t* table = tables + b * MB + blo;
      if (h == 0) {  // the part's K and V blocks (every head's rows) into L2 at once: see above
        const int64_t ahead = std::min<int64_t>(bhi - blo, (768 << 10) / (4 * blk));
        for (int64_t bi = 0; bi < ahead; ++bi) {
          prefetch_span<2>(k_cache + table[bi] * blk, blk * 2);
          prefetch_span<2>(v_cache + table[bi] * blk, blk * 2);
        }
      }
      const int64_t span = D * 2;
      for (int64_t bi = 0; bi < bhi - blo; ++bi) {
        const int64_t t0 = bi * BS, tn = std::min<int64_t>(BS, n - t0);
        if (bi + 1 < bhi - blo) {
          const c10::BFloat16* nxt = k_cache + table[bi + 1] * blk + h * D;
          for (int64_t r = 0; r < BS; ++r) prefetch_span(nxt + r * row, span);
        }
        const c10::BFloat16* vb = v_cache + table[bi] * blk + h * D;
        for (int64_t r = 0; r < tn; ++r) prefetch_span(vb + r * row, span);
        const c10::BFloat16* kb = k_cache + table[bi] * blk + h * D;
        for (int64_t j = 0; j < G; ++j)
          block_scores<NQ>(qv.data() + j * NQ, kb, row, tn, scale, scores.data() + j * n + t0);
      }
      for (int64_t j = 0; j < G; ++j) {
        const auto [m, l] = exp_row(scores.data() + j * n, n);
        pm[slot + j] = m;
        pl[slot + j] = l;
      }
      for (int64_t j0 = 0; j0 < G; j0 += VT<D>) {
        const int64_t mq = std::min<int64_t>(VT<D>, G - j0);
        v_tables<D>[mq](scores.data() + j0 * n, n, v_cache, table, blk, row, BS, h, acc.data() + j0 * NV);
      }
      for (int64_t j = 0; j < G * NV; ++j) _mm512_storeu_ps(pacc.data() + (slot * NV + j) * 16, acc[j]);
    }
  });
  for (int64_t i = 0; i < items * G; ++i) {  // merge the parts of each (sequence, head, query)
    float m = -INFINITY;
    for (int64_t part = 0; part < P; ++part)
      if (pl[part * items * G + i] > 0.f) m = std::max(m, pm[part * items * G + i]);
    float den = 0.f;
    __m512 o[NV];
    for (int v = 0; v < NV; ++v) o[v] = _mm512_setzero_ps();
    for (int64_t part = 0; part < P; ++part) {
      const int64_t k = part * items * G + i;
      if (!(pl[k] > 0.f)) continue;
      const float w = std::exp(pm[k] - m);
      den += w * pl[k];
      for (int v = 0; v < NV; ++v)
        o[v] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(pacc.data() + (k * NV + v) * 16), o[v]);
    }
    const int64_t b = i / (Hkv * G), hq = i % (Hkv * G);  // i = (b * Hkv + h) * G + j: query head h * G + j
    c10::BFloat16* dst = out + (b * H + hq) * D;
    const __m512 inv = _mm512_set1_ps(den > 0.f ? 1.f / den : 0.f);
    for (int v = 0; v < NV; ++v) {
      __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(o[v], inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + v * 16), (__m256i)r);
    }
  }
}

// bfloat16 with AVX512-BF16: q.k as bf16 pair dot products (vdpbf16ps) accumulated in float32, p.v in float32.
// A work item is one run of rows (above: one row, or a sequence's k + 1 verification rows) and one KV head: the
// G query heads of each of its rows share every key and value row read. Reading all of a token's heads as one
// contiguous span looked better for DRAM but measured 1.15-1.5x slower at 1 and 2 threads (docs/benchmarks.md,
// "P/D"): the query heads' scores and accumulators of one head stay in registers and L1, and the three heads'
// items still read disjoint cache lines. KV for a decode batch is read from DRAM: keys prefetched AHEAD blocks on
// during the scores, values AHEAD blocks on during the value pass (the first ones during the last key blocks), and
// the next item's first key blocks before this one's softmax, so reads stay queued across the passes and between
// items. It was the next key block and the whole block's values during the scores (the values' lines stalled the
// value pass: their prefetches had been issued all at once while the keys' were in flight): 1.10-1.17x faster with
// the KV in DRAM at 4-64 sequences of 192-1,024 tokens (`kvserve.bench.kernel_ab`; docs/benchmarks.md, "Decode
// attention's prefetch"). One or four blocks ahead measured slower than two.
template <int D>
void decode_kernel_bf16_avx512(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict k_cache,
                               const c10::BFloat16* __restrict v_cache, const int64_t* __restrict tables,
                               const int32_t* __restrict lens, c10::BFloat16* __restrict out, int64_t B, int64_t H,
                               int64_t Hkv, int64_t BS, int64_t MB, float scale, float* __restrict sc, int64_t SL) {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  constexpr int NQ = D / 32;  // 512-bit loads of 32 bf16 per row
  constexpr int NV = D / 16;  // float32 accumulators of 16 lanes per row
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;
  const int64_t blk = BS * row;
  const std::vector<int64_t> runs = row_runs(tables, lens, B, MB, BS);
  const int64_t R = static_cast<int64_t>(runs.size()) - 1;
  const int64_t threads = at::get_num_threads();
  if (sc == nullptr && R == B && threads > 1 && B * Hkv < 2 * threads && split_switch()) {
    return decode_split_bf16<D>(q, k_cache, v_cache, tables, lens, out, B, H, Hkv, BS, MB, scale, threads);
  }
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<__m512bh> qv;
    std::vector<__m512> acc;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t ri = idx / Hkv, h = idx % Hkv;
      const int64_t b0 = runs[ri], n = runs[ri + 1] - b0;
      const int64_t L = lens[b0 + n - 1];  // the run's longest row: its last
      if (L <= 0) continue;
      const int64_t nq = n * G;  // query j = (row j / G of the run, head h * G + j % G)
      scores.resize(nq * L);
      qv.resize(nq * NQ);
      acc.resize(nq * NV);
      for (int64_t j = 0; j < nq; ++j)
        for (int i = 0; i < NQ; ++i)
          qv[j * NQ + i] =
              (__m512bh)_mm512_loadu_si512(q + ((b0 + j / G) * H + h * G + j % G) * D + i * 32);
      const int64_t* table = tables + (b0 + n - 1) * MB;
      const int64_t span = D * 2;  // bytes of this head in one token row
      const int64_t nblocks = (L + BS - 1) / BS;
      // this item's first key blocks; the item before prefetched them, except on a thread's first item
      for (int64_t bi = idx == begin ? 0 : AHEAD; bi < std::min<int64_t>(AHEAD, nblocks); ++bi)
        prefetch_block(k_cache + table[bi] * blk + h * D, row, BS, span);
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t t0 = bi * BS, tn = std::min<int64_t>(BS, L - t0);
        if (bi + AHEAD < nblocks) prefetch_block(k_cache + table[bi + AHEAD] * blk + h * D, row, BS, span);
        if (bi + AHEAD >= nblocks && bi + AHEAD - nblocks < nblocks)  // the value pass's first blocks
          prefetch_block(v_cache + table[bi + AHEAD - nblocks] * blk + h * D, row, BS, span);
        const c10::BFloat16* kb = k_cache + table[bi] * blk + h * D;
        for (int64_t j = 0; j < nq; ++j)  // a row's last block may be partial (the same sums as the row alone)
          block_scores<NQ>(qv.data() + j * NQ, kb, row, std::min<int64_t>(tn, lens[b0 + j / G] - t0), scale,
                           scores.data() + j * L + t0);
      }
      if (idx + 1 < end) {  // the next item's first key blocks, read during this one's softmax and value pass
        const int64_t h2 = (idx + 1) % Hkv, last = runs[(idx + 1) / Hkv + 1] - 1;
        const int64_t nb2 = std::min<int64_t>(AHEAD, (std::max<int32_t>(lens[last], 0) + BS - 1) / BS);
        for (int64_t bi = 0; bi < nb2; ++bi)
          prefetch_block(k_cache + tables[last * MB + bi] * blk + h2 * D, row, BS, span);
      }
      // each row's softmax over its own context; the run's later positions get probability 0 for it, so the value
      // pass below adds exactly nothing for them (p x v = 0: the sums equal a pass over the row's own context)
      for (int64_t j = 0; j < nq; ++j) {
        const int64_t Lj = lens[b0 + j / G];
        softmax_row(scores.data() + j * L, Lj);
        std::fill(scores.begin() + j * L + Lj, scores.begin() + (j + 1) * L, 0.f);
      }
      if (sc != nullptr) {  // the (row, kv head) pairs of this item are its own: no race
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t b = b0 + j / G, Lj = lens[b];
          float* dst = sc + (b * Hkv + h) * SL;
          const float* p = scores.data() + j * L;
          for (int64_t t = 0; t < Lj; ++t) dst[t] += p[t];
        }
      }
      for (int64_t j0 = 0; j0 < nq; j0 += VT<D>) {
        const int64_t m = std::min<int64_t>(VT<D>, nq - j0);
        (j0 == 0 ? v_tables<D, true> : v_tables<D>)[m](scores.data() + j0 * L, L, v_cache, table, blk, row, BS, h,
                                                       acc.data() + j0 * NV);
      }
      for (int64_t j = 0; j < nq; ++j) {
        c10::BFloat16* o = out + ((b0 + j / G) * H + h * G + j % G) * D;
        for (int i = 0; i < NV; ++i) {
          __m256bh r = _mm512_cvtneps_pbh(acc[j * NV + i]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i * 16), (__m256i)r);
        }
      }
    }
  });
}
#endif

#ifdef KVSERVE_AMX
// bfloat16 with AMX (Intel Sapphire Rapids and later; Linux grants the tiles, see common.h): q.k and p.v as tile
// products, so the queries of a run of verification rows (and the G query heads of each) cost one tile operation
// together rather than one pass each. A work item is one run of rows and one KV head, its queries 32 at a time
// (D = 64; 16 for wider heads):
//   scores[t][j] = K[t] . Q[j]: A = 16 key rows of one 32-wide chunk of the head (read in place, stride = token row),
//                   B = the chunk of Q transposed into bf16 pairs (built once per item), C = 16 tokens x 16 queries;
//   out[j][d]    = sum_t p[j][t] V[t][d]: A = the probabilities as bf16 (16 queries x 32 tokens), B = 32 value rows
//                   interleaved in token pairs (vpermt2w), four C tiles for 64 dims.
// The probabilities are rounded to bf16 for p.v (as flash attention does on GPUs); scores, softmax and sums stay
// float32. Every output element is its own chain of tile sums over absolute token positions, and tokens past a
// row's context add exactly zero, so a row gives the same bits in a run as alone. Needs BS % 16 == 0, D % 64 == 0.
template <int D>
void decode_kernel_bf16_amx(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict k_cache,
                            const c10::BFloat16* __restrict v_cache, const int64_t* __restrict tables,
                            const int32_t* __restrict lens, c10::BFloat16* __restrict out, int64_t B, int64_t H,
                            int64_t Hkv, int64_t BS, int64_t MB, float scale, float* __restrict sc, int64_t SL) {
  static_assert(D % 64 == 0, "the AMX kernel takes 64 dims per group of output tiles");
  constexpr int NC = D / 32;  // 32-wide chunks of a head for q.k
  constexpr int QMAX = NC == 2 ? 32 : 16;  // queries per pass: D = 64 leaves tiles for two sets of 16
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;
  const int64_t blk = BS * row;
  const std::vector<int64_t> runs = row_runs(tables, lens, B, MB, BS, 0);
  const int64_t R = static_cast<int64_t>(runs.size()) - 1;
  __m512i lo_idx, hi_idx;  // word indices interleaving two value rows (a: 0..31, b: 32..63) for dims 0-15 / 16-31
  {
    alignas(64) int16_t lo[32], hi[32];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = static_cast<int16_t>(i), lo[2 * i + 1] = static_cast<int16_t>(32 + i);
      hi[2 * i] = static_cast<int16_t>(16 + i), hi[2 * i + 1] = static_cast<int16_t>(48 + i);
    }
    lo_idx = _mm512_load_si512(lo), hi_idx = _mm512_load_si512(hi);
  }
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    kvserve::TileScope tiles;
    alignas(64) uint32_t qt[2][NC][16][16];  // Q transposed, per 16 queries and 32-wide chunk c: [pair k][query]
    alignas(64) float ct[2][16][16];         // q.k tiles: [token][query], per 16 queries
    alignas(64) float ot[4][16][16];         // the p.v tiles of 64 dims: [dims / 16][query][dim % 16]
    std::vector<__m512i> vt;                 // value rows interleaved in token pairs: [32 tokens][16 dims][pair]
    std::vector<float> scores;
    std::vector<c10::BFloat16> pb;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t ri = idx / Hkv, h = idx % Hkv;
      const int64_t b0 = runs[ri], n = runs[ri + 1] - b0;
      const int64_t* table = tables + (b0 + n - 1) * MB;  // the run's last table covers every row's blocks
      for (int64_t j0 = 0; j0 < n * G; j0 += QMAX) {
        const int64_t nq = std::min<int64_t>(QMAX, n * G - j0);
        const int halves = static_cast<int>((nq + 15) / 16);
        const int64_t L = lens[b0 + (j0 + nq - 1) / G];  // the chunk's longest row: its last
        if (L <= 0) continue;
        const int64_t Lp = (L + 31) / 32 * 32;
        std::memset(qt, 0, sizeof(qt));
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t qj = j0 + j;
          const uint32_t* qrow = reinterpret_cast<const uint32_t*>(q + ((b0 + qj / G) * H + h * G + qj % G) * D);
          for (int c = 0; c < NC; ++c)
            for (int k = 0; k < 16; ++k) qt[j / 16][c][k][j % 16] = qrow[c * 16 + k];
        }
        scores.resize(nq * L);
        // 16 tokens per step. D = 64 keeps Q in tiles (2, 3: queries 0-15; 5, 6: 16-31) for the whole chunk; with
        // one half, steps alternate between C tiles 0 and 1 so one step's sums need not wait for the last store
        if constexpr (NC == 2) {
          _tile_loadd(2, qt[0][0], 64);
          _tile_loadd(3, qt[0][1], 64);
          if (halves == 2) {
            _tile_loadd(5, qt[1][0], 64);
            _tile_loadd(6, qt[1][1], 64);
          }
        }
        const int64_t steps = (L + 15) / 16;
        for (int64_t si = 0; si < steps; ++si) {
          const int64_t t0 = si * 16;
          const c10::BFloat16* kb = k_cache + table[t0 / BS] * blk + (t0 % BS) * row + h * D;
          if (si + 1 < steps) {  // the next step's keys, and this step's values for the p.v pass
            const int64_t t1 = t0 + 16;
            const c10::BFloat16* nk = k_cache + table[t1 / BS] * blk + (t1 % BS) * row + h * D;
            for (int r = 0; r < 16; ++r) prefetch_span(nk + r * row, D * 2);
          }
          const c10::BFloat16* vb = v_cache + table[t0 / BS] * blk + (t0 % BS) * row + h * D;
          for (int r = 0; r < 16; ++r) prefetch_span(vb + r * row, D * 2);
          if constexpr (NC == 2) {
            _tile_loadd(4, kb, row * 2);
            _tile_loadd(7, kb + 32, row * 2);
            if (halves == 2) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_dpbf16ps(0, 4, 2);
              _tile_dpbf16ps(0, 7, 3);
              _tile_dpbf16ps(1, 4, 5);
              _tile_dpbf16ps(1, 7, 6);
              _tile_stored(0, ct[0], 64);
              _tile_stored(1, ct[1], 64);
            } else if (si % 2 == 0) {
              _tile_zero(0);
              _tile_dpbf16ps(0, 4, 2);
              _tile_dpbf16ps(0, 7, 3);
              _tile_stored(0, ct[0], 64);
            } else {
              _tile_zero(1);
              _tile_dpbf16ps(1, 4, 2);
              _tile_dpbf16ps(1, 7, 3);
              _tile_stored(1, ct[0], 64);
            }
          } else {
            _tile_zero(0);
            for (int c = 0; c < NC; ++c) {
              _tile_loadd(4, kb + c * 32, row * 2);
              _tile_loadd(5, qt[0][c], 64);
              _tile_dpbf16ps(0, 4, 5);
            }
            _tile_stored(0, ct[0], 64);
          }
          const int64_t tn = std::min<int64_t>(16, L - t0);
          const __mmask16 m = tn == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << tn) - 1);
          for (int half = 0; half < halves; ++half) {  // [token][query] -> each query's 16 scores
            __m512i r[16];
            for (int t = 0; t < 16; ++t) r[t] = _mm512_load_si512(ct[half][t]);
            kvserve::transpose16(r);
            for (int64_t j = half * 16; j < std::min<int64_t>(nq, half * 16 + 16); ++j)
              _mm512_mask_storeu_ps(scores.data() + j * L + t0, m,
                                    _mm512_mul_ps(_mm512_castsi512_ps(r[j % 16]), _mm512_set1_ps(scale)));
          }
        }
        pb.assign(16 * halves * Lp, c10::BFloat16(0.f));
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t b = b0 + (j0 + j) / G, Lj = lens[b];
          float* s = scores.data() + j * L;
          softmax_row(s, Lj);
          if (sc != nullptr) {  // this run's rows and this KV head are this item's alone: no race
            float* dst = sc + (b * Hkv + h) * SL;
            for (int64_t t = 0; t < Lj; ++t) dst[t] += s[t];
          }
          c10::BFloat16* pj = pb.data() + j * Lp;
          int64_t t = 0;
          for (; t + 16 <= Lj; t += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pj + t),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + t)));
          if (t < Lj) {
            const __mmask16 m = static_cast<__mmask16>((1u << (Lj - t)) - 1);
            _mm256_mask_storeu_epi16(pj + t, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + t)));
          }
        }
        vt.resize(Lp / 2 * 4);  // Lp / 32 steps x 4 tiles x 16 rows
        for (int64_t dg = 0; dg < D; dg += 64) {
          for (int half = 0; half < halves; ++half) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t t0 = 0; t0 < L; t0 += 32) {
              __m512i* vs = vt.data() + t0 / 32 * 64;  // this step's four B tiles
              if (half == 0) {  // built once, reused by the second half's queries
                for (int k = 0; k < 16; ++k) {
                  __m512i a[2], b[2];
                  for (int e = 0; e < 2; ++e) {  // tokens t0 + 2k (a) and t0 + 2k + 1 (b): zeros past the context
                    const int64_t t = t0 + 2 * k + e;
                    __m512i* dst = e == 0 ? a : b;
                    if (t < L) {
                      const c10::BFloat16* v = v_cache + table[t / BS] * blk + (t % BS) * row + h * D + dg;
                      dst[0] = _mm512_loadu_si512(v);
                      dst[1] = _mm512_loadu_si512(v + 32);
                    } else {
                      dst[0] = dst[1] = _mm512_setzero_si512();
                    }
                  }
                  vs[k] = _mm512_permutex2var_epi16(a[0], lo_idx, b[0]);
                  vs[16 + k] = _mm512_permutex2var_epi16(a[0], hi_idx, b[0]);
                  vs[32 + k] = _mm512_permutex2var_epi16(a[1], lo_idx, b[1]);
                  vs[48 + k] = _mm512_permutex2var_epi16(a[1], hi_idx, b[1]);
                }
              }
              _tile_loadd(4, pb.data() + half * 16 * Lp + t0, Lp * 2);
              _tile_loadd(5, vs, 64);
              _tile_dpbf16ps(0, 4, 5);
              _tile_loadd(5, vs + 16, 64);
              _tile_dpbf16ps(1, 4, 5);
              _tile_loadd(5, vs + 32, 64);
              _tile_dpbf16ps(2, 4, 5);
              _tile_loadd(5, vs + 48, 64);
              _tile_dpbf16ps(3, 4, 5);
            }
            _tile_stored(0, ot[0], 64);
            _tile_stored(1, ot[1], 64);
            _tile_stored(2, ot[2], 64);
            _tile_stored(3, ot[3], 64);
            for (int64_t j = half * 16; j < std::min<int64_t>(nq, half * 16 + 16); ++j) {
              const int64_t qj = j0 + j;
              c10::BFloat16* o = out + ((b0 + qj / G) * H + h * G + qj % G) * D + dg;
              for (int e = 0; e < 4; ++e)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + e * 16),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(ot[e][j % 16])));
            }
          }
        }
      }
    }
  });
}
#endif

template <typename T>
void dispatch_d(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& bt,
                const torch::Tensor& sl, torch::Tensor& out, double scale, float* sc, int64_t SL) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = kc.size(1), Hkv = kc.size(2), MB = bt.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tp = bt.data_ptr<int64_t>();
  const int32_t* lp = sl.data_ptr<int32_t>();
#ifdef KVSERVE_AVX512_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const float sf = (float)scale;
#ifdef KVSERVE_AMX
    if (BS % 16 == 0 && kvserve::amx_enabled()) {
      if (D == 64) return decode_kernel_bf16_amx<64>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, sf, sc, SL);
      if (D == 128) return decode_kernel_bf16_amx<128>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, sf, sc, SL);
    }
#endif
    if (D == 64) return decode_kernel_bf16_avx512<64>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, sf, sc, SL);
    if (D == 128) return decode_kernel_bf16_avx512<128>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, sf, sc, SL);
  }
#endif
  switch (D) {
    case 64: decode_kernel<T, 64>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, (float)scale, sc, SL); break;
    case 128: decode_kernel<T, 128>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, (float)scale, sc, SL); break;
    case 96: decode_kernel<T, 96>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, (float)scale, sc, SL); break;
    case 80: decode_kernel<T, 80>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, (float)scale, sc, SL); break;
    case 256: decode_kernel<T, 256>(qp, kp, vp, tp, lp, op, B, H, Hkv, BS, MB, (float)scale, sc, SL); break;
    default: TORCH_CHECK(false, "paged decode attention: unsupported head_dim ", D);
  }
}

}  // namespace

// Into a caller's `out` (q's shape and dtype, contiguous): the decode plan keeps it across steps.
void paged_decode_attention_into(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                 torch::Tensor block_tables, torch::Tensor seq_lens, double scale, torch::Tensor& out,
                                 c10::optional<torch::Tensor> scores = c10::nullopt) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt32, "index dtypes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  TORCH_CHECK(seq_lens.size(0) == q.size(0) && block_tables.size(0) == q.size(0), "batch mismatch");
  float* sc = nullptr;
  int64_t SL = 0;
  if (scores.has_value()) {
    const auto& s = *scores;
    TORCH_CHECK(s.scalar_type() == torch::kFloat32 && s.is_contiguous() && s.dim() == 3 && s.size(0) == q.size(0) &&
                s.size(1) == k_cache.size(2), "scores must be a contiguous float32 (B, Hkv, S) tensor");
    TORCH_CHECK(seq_lens.numel() == 0 || seq_lens.max().item<int32_t>() <= s.size(2), "scores shorter than a context");
    sc = s.data_ptr<float>();
    SL = s.size(2);
  }
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(),
              "out must be a contiguous tensor of q's shape and dtype");
  if (q.scalar_type() == torch::kFloat32) {
    dispatch_d<float>(q, k_cache, v_cache, block_tables, seq_lens, out, scale, sc, SL);
  } else if (q.scalar_type() == torch::kBFloat16) {
    dispatch_d<c10::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, out, scale, sc, SL);
  } else {
    TORCH_CHECK(false, "paged decode attention supports float32 and bfloat16");
  }
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                                     c10::optional<torch::Tensor> scores = c10::nullopt) {
  auto out = torch::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  paged_decode_attention_into(q, k_cache, v_cache, block_tables, seq_lens, scale, out, scores);
  return out;
}

bool amx_available() {
#ifdef KVSERVE_AMX
  return kvserve::amx_permitted();
#else
  return false;
#endif
}

bool amx_enabled() {
#ifdef KVSERVE_AMX
  return kvserve::amx_enabled();
#else
  return false;
#endif
}

void set_amx(bool on) {
#ifdef KVSERVE_AMX
  kvserve::amx_switch().store(on);
#else
  (void)on;
#endif
}

#ifndef KVSERVE_NO_PYBIND  // decode_step.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_available", &amx_available, "whether the AMX path is compiled in and the OS grants the tiles");
  m.def("set_amx", &set_amx, "turn the AMX path on or off in this module (tests compare it with AVX-512)");
  m.def("amx_enabled", &amx_enabled, "whether the AMX path runs now (available and not switched off)");
  m.def("set_split", [](bool on) { split_switch().store(on); },
        "split a few sequences' contexts across threads (on by default), for tests and benchmarks");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_tables"),
        pybind11::arg("seq_lens"), pybind11::arg("scale"), pybind11::arg("scores") = pybind11::none());
}
#endif
