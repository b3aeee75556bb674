// Prefill (chunk) attention straight over the paged KV cache, bfloat16, AVX512-BF16: flash attention on CPU.
//
// Every prefill chunk of a step in one call. A chunk of n query tokens at positions [c0, c0 + n) attends causally to
// the keys [0, c0 + i] already written into its blocks (this step's K/V included), so a fresh prompt (c0 = 0) and a
// later chunk over a cached prefix take the same path: no gather of the prefix into a contiguous copy and no (n, ctx)
// mask tensor, which is what made a chunk over a long prefix cost as much as the chunk's matmuls.
//
// A work item is (chunk, kv head, tile of QT query tokens); its G * QT query rows share every K/V block. Per 16-key
// block, K is transposed into the bf16-pair ("VNNI") layout so that q.k for 16 keys is 32 vdpbf16ps into one float32
// vector (no horizontal sums), an online softmax keeps a running max and sum per row, and p.v is 32 more vdpbf16ps
// per row with V interleaved by key pairs. Probabilities are rounded to bfloat16 for p.v, as PyTorch's CPU flash
// attention does for bfloat16 inputs; scores, softmax and the output accumulate in float32.
//
// q:            (T, H, D) bfloat16, D = 64 or 128; heads and dims contiguous, any token stride (a view of qkv)
// k/v_cache:    (NB, BS, Hkv, D) bfloat16, BS = 16
// token_starts: (S,) int64  row in q / out of each chunk's first query token
// num_tokens:   (S,) int64  query tokens of each chunk
// ctx_starts:   (S,) int64  tokens of each chunk's request already cached before the chunk
// block_tables: (S, MB) int64
// out:          (T, H, D) bfloat16, rows of the chunks written, others untouched
// q_positions:  (T,) int64 or empty. Given, query row t sees the keys [0, q_positions[t]] instead of its place in
//               the chunk: CacheBlend's recomputed tokens, scattered through the prompt (ascending within a chunk)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#ifdef KVSERVE_AVX512_BF16
namespace {

constexpr int BS = 16;  // keys per block (the cache's block size)
constexpr int QT = 32;  // query tokens per work item
constexpr int RG = 16;  // query rows per register group

using kvserve::exp512;

using kvserve::transpose16;

template <int D>
struct Item {
  static constexpr int NJ = D / 2;   // bf16 pairs (dwords) per row
  static constexpr int NC = D / 16;  // 16-lane float chunks per output row
};

template <int D>
void prefill_kernel(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict kc,
                    const c10::BFloat16* __restrict vc, const int64_t* __restrict token_starts,
                    const int64_t* __restrict num_tokens, const int64_t* __restrict ctx_starts,
                    const int64_t* __restrict tables, c10::BFloat16* __restrict out, int64_t S, int64_t H,
                    int64_t Hkv, int64_t MB, int64_t q_stride, float scale, const int64_t* __restrict qpos_of) {
  constexpr int NJ = Item<D>::NJ, NC = Item<D>::NC;
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;  // elements per token in a block
  const int64_t blk = BS * row;
  // items: (chunk, tile, kv head), the most expensive (last) tiles first so dynamic scheduling balances them
  std::vector<int64_t> items;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t tiles = (num_tokens[s] + QT - 1) / QT;
    for (int64_t ti = 0; ti < tiles; ++ti)
      for (int64_t h = 0; h < Hkv; ++h) items.push_back((s << 32) | (ti << 8) | h);
  }
  std::stable_sort(items.begin(), items.end(), [&](int64_t a, int64_t b) {
    const int64_t ka = ctx_starts[a >> 32] + (((a >> 8) & 0xFFFFFF) + 1) * QT;
    const int64_t kb = ctx_starts[b >> 32] + (((b >> 8) & 0xFFFFFF) + 1) * QT;
    return ka > kb;
  });
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n_items)));
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t max_rows = QT * G;
    std::vector<float> acc(max_rows * D), m(max_rows), l(max_rows);
    alignas(64) int32_t kt[NJ][16];       // K block, transposed: kt[j][t] = dword j of key t
    alignas(64) int32_t vt[BS / 2][NC][16];  // V block by key pairs: vt[p][c] = dims 16c.. of keys 2p, 2p+1
    alignas(64) uint16_t pb[16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t s = items[it] >> 32, ti = (items[it] >> 8) & 0xFFFFFF, h = items[it] & 0xFF;
      const int64_t n = num_tokens[s], c0 = ctx_starts[s];
      const int64_t i0 = ti * QT, i1 = std::min<int64_t>(n, i0 + QT);
      const int64_t rows = (i1 - i0) * G;  // row r: query token i0 + r / G, head h * G + r % G
      // keys this tile sees: up to its last row's position (rows are in position order)
      const int64_t kend = qpos_of ? qpos_of[token_starts[s] + i1 - 1] + 1 : c0 + i1;
      const int64_t* table = tables + s * MB;
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      std::fill(m.begin(), m.begin() + rows, -INFINITY);
      std::fill(l.begin(), l.begin() + rows, 0.f);
      auto qrow = [&](int64_t r) {
        return q + (token_starts[s] + i0 + r / G) * q_stride + (h * G + r % G) * D;
      };
      const int64_t nblocks = (kend + BS - 1) / BS;
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t k0 = bi * BS;
        const int kn = static_cast<int>(std::min<int64_t>(BS, kend - k0));
        const c10::BFloat16* kb = kc + table[bi] * blk + h * D;
        const c10::BFloat16* vb = vc + table[bi] * blk + h * D;
        if (bi + 1 < nblocks) {
          const char* nk = reinterpret_cast<const char*>(kc + table[bi + 1] * blk + h * D);
          const char* nv = reinterpret_cast<const char*>(vc + table[bi + 1] * blk + h * D);
          for (int t = 0; t < BS; ++t)
            for (int off = 0; off < D * 2; off += 64) {
              _mm_prefetch(nk + t * row * 2 + off, _MM_HINT_T0);
              _mm_prefetch(nv + t * row * 2 + off, _MM_HINT_T0);
            }
        }
        // K transposed into kt (keys past kn are zero and masked below)
        for (int half = 0; half < NJ / 16; ++half) {
          __m512i r[16];
          for (int t = 0; t < 16; ++t)
            r[t] = t < kn ? _mm512_loadu_si512(kb + t * row + half * 32) : _mm512_setzero_si512();
          transpose16(r);
          for (int j = 0; j < 16; ++j) _mm512_store_si512(kt[half * 16 + j], r[j]);
        }
        // V interleaved by key pairs: for chunk c, lanes 2i / 2i+1 = dim 16c+i of keys 2p / 2p+1
        {
          alignas(64) static const uint16_t idx_lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                         8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
          alignas(64) static const uint16_t idx_hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53,
                                                         22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59,
                                                         28, 60, 29, 61, 30, 62, 31, 63};
          const __m512i lo = _mm512_load_si512(idx_lo), hi = _mm512_load_si512(idx_hi);
          for (int p = 0; p < BS / 2; ++p) {
            const int ta = 2 * p, tb = 2 * p + 1;
            for (int half = 0; half < D / 32; ++half) {
              const __m512i a = ta < kn ? _mm512_loadu_si512(vb + ta * row + half * 32) : _mm512_setzero_si512();
              const __m512i b = tb < kn ? _mm512_loadu_si512(vb + tb * row + half * 32) : _mm512_setzero_si512();
              _mm512_store_si512(vt[p][half * 2], _mm512_permutex2var_epi16(a, lo, b));
              _mm512_store_si512(vt[p][half * 2 + 1], _mm512_permutex2var_epi16(a, hi, b));
            }
          }
        }
        for (int64_t g0 = 0; g0 < rows; g0 += RG) {
          const int nr = static_cast<int>(std::min<int64_t>(RG, rows - g0));
          const c10::BFloat16* qp[RG];
          for (int r = 0; r < RG; ++r) qp[r] = qrow(g0 + (r < nr ? r : 0));
          __m512 sc[RG];
          for (int r = 0; r < RG; ++r) sc[r] = _mm512_setzero_ps();
          for (int j = 0; j < NJ; ++j) {
            const __m512bh kv = (__m512bh)_mm512_load_si512(kt[j]);
            for (int r = 0; r < RG; ++r) {
              int32_t qd;
              std::memcpy(&qd, qp[r] + 2 * j, 4);
              sc[r] = _mm512_dpbf16_ps(sc[r], (__m512bh)_mm512_set1_epi32(qd), kv);
            }
          }
          for (int r = 0; r < nr; ++r) {
            const int64_t gr = g0 + r;
            // keys at positions <= qpos are visible
            const int64_t qpos = qpos_of ? qpos_of[token_starts[s] + i0 + gr / G] : c0 + i0 + gr / G;
            const int64_t vis = std::min<int64_t>(kn, qpos - k0 + 1);
            if (vis <= 0) continue;
            const __mmask16 km = vis >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << vis) - 1);
            const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), km, _mm512_mul_ps(sc[r], _mm512_set1_ps(scale)));
            const float bm = _mm512_reduce_max_ps(x);
            const float mn = std::max(m[gr], bm);
            const float alpha = std::exp(m[gr] - mn);  // 0 on the first block (m = -inf)
            const __m512 p = _mm512_maskz_mov_ps(km, exp512(_mm512_sub_ps(x, _mm512_set1_ps(mn))));
            l[gr] = l[gr] * alpha + _mm512_reduce_add_ps(p);
            m[gr] = mn;
            _mm256_store_si256(reinterpret_cast<__m256i*>(pb), (__m256i)_mm512_cvtneps_pbh(p));
            float* a = acc.data() + gr * D;
            __m512 av[NC];
            const __m512 al = _mm512_set1_ps(alpha);
            for (int c = 0; c < NC; ++c) av[c] = _mm512_mul_ps(_mm512_loadu_ps(a + c * 16), al);
            const int npairs = (static_cast<int>(vis) + 1) / 2;
            for (int pp = 0; pp < npairs; ++pp) {
              int32_t pd;
              std::memcpy(&pd, pb + 2 * pp, 4);
              const __m512bh pv = (__m512bh)_mm512_set1_epi32(pd);
              for (int c = 0; c < NC; ++c) av[c] = _mm512_dpbf16_ps(av[c], pv, (__m512bh)_mm512_load_si512(vt[pp][c]));
            }
            for (int c = 0; c < NC; ++c) _mm512_storeu_ps(a + c * 16, av[c]);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        c10::BFloat16* o = out + ((token_starts[s] + i0 + r / G) * H + h * G + r % G) * D;
        const __m512 inv = _mm512_set1_ps(1.f / l[r]);
        for (int c = 0; c < NC; ++c) {
          const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * D + c * 16), inv));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c * 16), (__m256i)v);
        }
      }
    }
  }
}

}  // namespace
#endif

bool supported(int64_t head_dim, int64_t block_size) {
#ifdef KVSERVE_AVX512_BF16
  return (head_dim == 64 || head_dim == 128) && block_size == 16;
#else
  return false;
#endif
}

void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor token_starts,
                       torch::Tensor num_tokens, torch::Tensor ctx_starts, torch::Tensor block_tables,
                       torch::Tensor out, double scale, torch::Tensor q_positions) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && out.sizes() == q.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k_cache.scalar_type() == torch::kBFloat16 &&
              v_cache.scalar_type() == torch::kBFloat16 && out.scalar_type() == torch::kBFloat16,
              "prefill attention kernel is bfloat16 only");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.is_contiguous() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "tensors must be contiguous (q: per token)");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), NB = k_cache.size(0), Hkv = k_cache.size(2);
  TORCH_CHECK(supported(D, k_cache.size(1)), "unsupported head_dim / block size (or no AVX512-BF16)");
  TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0 && H / Hkv <= 16 && Hkv < 256, "head layout");
  for (auto* t : {&token_starts, &num_tokens, &ctx_starts, &block_tables})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "index tensors must be contiguous int64");
  const int64_t S = token_starts.numel(), MB = block_tables.size(1);
  TORCH_CHECK(num_tokens.numel() == S && ctx_starts.numel() == S && block_tables.dim() == 2 &&
              block_tables.size(0) == S, "one entry per chunk");
  const int64_t* ts = token_starts.data_ptr<int64_t>();
  const int64_t* nt = num_tokens.data_ptr<int64_t>();
  const int64_t* cs = ctx_starts.data_ptr<int64_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* qp_of = nullptr;
  if (q_positions.numel()) {
    TORCH_CHECK(q_positions.scalar_type() == torch::kInt64 && q_positions.is_contiguous() && q_positions.numel() == T,
                "q_positions: one contiguous int64 per query row");
    qp_of = q_positions.data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = ts[s]; i < ts[s] + nt[s]; ++i)  // ascending and inside the chunk's block table
        TORCH_CHECK(qp_of[i] >= 0 && qp_of[i] < cs[s] + nt[s] && (i == ts[s] || qp_of[i] > qp_of[i - 1]),
                    "q_positions must ascend within a chunk and stay below its context");
  }
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(nt[s] > 0 && ts[s] >= 0 && ts[s] + nt[s] <= T && cs[s] >= 0, "chunk rows out of range");
    TORCH_CHECK((cs[s] + nt[s] + 15) / 16 <= MB && (nt[s] + 31) / 32 < (1 << 24), "block table too short");
    for (int64_t b = 0; b < (cs[s] + nt[s] + 15) / 16; ++b)
      TORCH_CHECK(bt[s * MB + b] >= 0 && bt[s * MB + b] < NB, "block id out of range");
  }
#ifdef KVSERVE_AVX512_BF16
  auto* qp = reinterpret_cast<const c10::BFloat16*>(q.data_ptr());
  auto* kp = reinterpret_cast<const c10::BFloat16*>(k_cache.data_ptr());
  auto* vp = reinterpret_cast<const c10::BFloat16*>(v_cache.data_ptr());
  auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
  if (D == 64) prefill_kernel<64>(qp, kp, vp, ts, nt, cs, bt, op, S, H, Hkv, MB, q.stride(0), (float)scale, qp_of);
  else prefill_kernel<128>(qp, kp, vp, ts, nt, cs, bt, op, S, H, Hkv, MB, q.stride(0), (float)scale, qp_of);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this build has the kernel for a head_dim and block size");
  m.def("prefill_attention", &prefill_attention, "causal chunk attention over a paged KV cache (bf16)");
}
