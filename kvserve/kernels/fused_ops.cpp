// Fused elementwise ops of a Llama layer: one pass over memory where eager PyTorch makes five to eight.
//
// In eager mode each layer runs about 25 small elementwise ops (two RMSNorms in float32 and back, RoPE on q and k,
// SiLU * up, residual adds, the KV-cache write); on 2 cores they cost as much as the layer's matmuls. These kernels
// do the same arithmetic with the same roundings as HF transformers' bfloat16 / float32 modules (every intermediate
// that PyTorch rounds to the activation dtype is rounded here too), so outputs match the eager path bit for bit
// except for the order of the RMSNorm sum of squares.
//
// All tensors are row-major and contiguous; float32 or bfloat16 (every tensor of a call has the same dtype).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

using kvserve::to_float;

// float -> bfloat16 bits, round to nearest even (NaN stays NaN); written with plain integer ops so it vectorizes.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7FC0) : uint16_t(rounded);
}

inline void store(float v, float* dst) { *dst = v; }
inline void store(float v, c10::BFloat16* dst) { dst->x = bf16_bits(v); }

// The value PyTorch would hold after rounding an intermediate to T (identity for float32).
template <typename T>
inline float rnd(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    uint32_t bits = static_cast<uint32_t>(bf16_bits(v)) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
}

// exp(x) over the whole float range with plain arithmetic (vectorizes under omp simd): 2^n * p(r), rel. err < 2e-7.
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = std::floor(x * 1.44269504089f + 0.5f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

// out = w * rnd(x * rsqrt(mean(x^2) + eps)); if delta: h = rnd(h + delta) first (the residual add), in place.
template <typename T>
void rms_norm_rows(T* h, const T* delta, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* x = h + r * n;
      if (delta) {
        const T* d = delta + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) store(to_float(x[i]) + to_float(d[i]), x + i);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_float(x[i]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      T* o = out + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(to_float(w[i]) * rnd<T>(to_float(x[i]) * inv), o + i);
    }
  });
}

#ifdef KVSERVE_AVX512_BF16
using kvserve::bf16x16_to_float;
using kvserve::exp512;

// The value after rounding to bfloat16 (round to nearest even, as PyTorch's conversion), back in float32.
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// One bfloat16 row of silu_mul, 16 lanes at a time (the auto-vectorized loop below ran at scalar speed: 3.3x slower
// than eager PyTorch at 64 rows); a scalar tail for widths that are not a multiple of 16.
inline int64_t silu_mul_row16(const c10::BFloat16* g, const c10::BFloat16* u, c10::BFloat16* o, int64_t inter) {
  int64_t i = 0;
  for (; i + 16 <= inter; i += 16) {
    const __m512 x = bf16x16_to_float(g + i);
    const __m512 s = round_bf16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(
        _mm512_setzero_ps(), x)))));
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(s, bf16x16_to_float(u + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), (__m256i)y);
  }
  return i;
}
#endif

// (T, 2I) -> (T, I): rnd(rnd(silu(gate)) * up), as F.silu(gate) * up rounds.
template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, grain(2 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      int64_t start = 0;
#ifdef KVSERVE_AVX512_BF16
      if constexpr (std::is_same_v<T, c10::BFloat16>) start = silu_mul_row16(g, u, o, inter);
#endif
#pragma omp simd
      for (int64_t i = start; i < inter; ++i) {
        const float x = to_float(g[i]);
        const float s = rnd<T>(x / (1.f + exp_approx(-x)));
        store(s * to_float(u[i]), o + i);
      }
    }
  });
}

// Rotate-half RoPE of one head in place: x1' = rnd(rnd(x1 c) + rnd(-x2 s)), x2' = rnd(rnd(x2 c) + rnd(x1 s)).
template <typename T>
inline void rope_head(T* x, const T* cos, const T* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    const float a = rnd<T>(rnd<T>(x1 * to_float(cos[i])) + rnd<T>(-x2 * to_float(sin[i])));
    const float b = rnd<T>(rnd<T>(x2 * to_float(cos[i + half])) + rnd<T>(x1 * to_float(sin[i + half])));
    store(a, x + i);
    store(b, x + i + half);
  }
}

// qkv (T, (H + 2 Hkv) D): rotate q and k in place, then copy k and v rows into their cache slots.
template <typename T>
void rope_qkv_write(T* qkv, const int64_t* pos, const T* cos, const T* sin, T* kc, T* vc, const int64_t* slots,
                    int64_t tokens, int64_t H, int64_t Hkv, int64_t D) {
  const int64_t width = (H + 2 * Hkv) * D, half = D / 2;
  at::parallel_for(0, tokens, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* row = qkv + t * width;
      const T* c = cos + pos[t] * D;
      const T* s = sin + pos[t] * D;
      for (int64_t h = 0; h < H + Hkv; ++h) rope_head(row + h * D, c, s, half);
      std::memcpy(kc + slots[t] * Hkv * D, row + H * D, sizeof(T) * Hkv * D);
      std::memcpy(vc + slots[t] * Hkv * D, row + (H + Hkv) * D, sizeof(T) * Hkv * D);
    }
  });
}

// torch.argmax of one row: the first index of the largest value, a NaN counting as the largest (its first index).
// Greedy decoding takes one per step over a 49k vocabulary, where torch's reduction costs ~29 us and this ~7 us.
inline int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0;
  int64_t bi = 0;
  float bv = x[0];
#ifdef __AVX512F__
  if (n >= 16) {
    __m512 best = _mm512_loadu_ps(x);
    __m512i bidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i idx = bidx;
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    for (i = 16; i + 16 <= n; i += 16) {
      idx = _mm512_add_epi32(idx, step);
      const __m512 v = _mm512_loadu_ps(x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strict: a lane keeps its first maximum
      best = _mm512_mask_mov_ps(best, gt, v);
      bidx = _mm512_mask_mov_epi32(bidx, gt, idx);
    }
    if (nan) {
      i = 0;  // rare: the scalar pass below finds the first NaN
    } else {
      bv = _mm512_reduce_max_ps(best);
      const __mmask16 at = _mm512_cmp_ps_mask(best, _mm512_set1_ps(bv), _CMP_EQ_OQ);
      bi = _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), at, bidx));
    }
  }
#endif
  if (i == 0) {
    if (bv != bv) return 0;
    i = 1;
  }
  for (; i < n; ++i) {  // the tail after the vectors (or the whole row): indices past every lane's, so strict >
    const float v = x[i];
    if (v != v) return i;
    if (v > bv) {
      bv = v;
      bi = i;
    }
  }
  return bi;
}

void check_2d(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              name, " must be float32 or bfloat16");
}

template <typename F>
void dispatch(const torch::Tensor& x, F&& f) {
  if (x.scalar_type() == torch::kFloat32) f(float{});
  else f(c10::BFloat16{});
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_2d(x, "x");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type() && w.is_contiguous(),
              "weight must be (hidden,) of the input's dtype");
  auto out = torch::empty_like(x);
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(x.data_ptr<T>(), nullptr, w.data_ptr<T>(), out.data_ptr<T>(), x.size(0), x.size(1), (float)eps);
  });
  return out;
}

torch::Tensor add_rms_norm_(torch::Tensor h, torch::Tensor delta, torch::Tensor w, double eps) {
  check_2d(h, "h");
  check_2d(delta, "delta");
  TORCH_CHECK(h.sizes() == delta.sizes() && h.scalar_type() == delta.scalar_type(), "h and delta must match");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == h.size(1) && w.scalar_type() == h.scalar_type() && w.is_contiguous(),
              "weight must be (hidden,) of the input's dtype");
  auto out = torch::empty_like(h);
  dispatch(h, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(h.data_ptr<T>(), delta.data_ptr<T>(), w.data_ptr<T>(), out.data_ptr<T>(), h.size(0), h.size(1),
                     (float)eps);
  });
  return out;
}

torch::Tensor silu_mul(torch::Tensor gu) {
  check_2d(gu, "gate_up");
  TORCH_CHECK(gu.size(1) % 2 == 0, "gate_up width must be even");
  auto out = torch::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  dispatch(gu, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(gu.data_ptr<T>(), out.data_ptr<T>(), gu.size(0), gu.size(1) / 2);
  });
  return out;
}

void rope_qkv_write_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, int64_t H, int64_t Hkv) {
  check_2d(qkv, "qkv");
  check_2d(cos, "cos");
  check_2d(sin, "sin");
  const int64_t D = cos.size(1);
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) == (H + 2 * Hkv) * D, "qkv width must be (H + 2 Hkv) * head_dim");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() &&
              k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "dtype mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.size(-1) == D && k_cache.size(-2) == Hkv, "cache layout must be (..., Hkv, head_dim)");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
              positions.is_contiguous() && slots.is_contiguous(), "positions and slots must be contiguous int64");
  const int64_t T_ = qkv.size(0);
  TORCH_CHECK(positions.numel() == T_ && slots.numel() == T_, "one position and one slot per token");
  const int64_t num_slots = k_cache.numel() / (Hkv * D);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot out of range");
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "position out of range");
  }
  dispatch(qkv, [&](auto tag) {
    using T = decltype(tag);
    rope_qkv_write<T>(qkv.data_ptr<T>(), pp, cos.data_ptr<T>(), sin.data_ptr<T>(), k_cache.data_ptr<T>(),
                      v_cache.data_ptr<T>(), sp, T_, H, Hkv, D);
  });
}

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.size(1) > 0,
              "x must be a contiguous, non-empty 2-D float32 tensor");
  const int64_t R = x.size(0), V = x.size(1);
  auto out = torch::empty({R}, torch::kInt64);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * V, V);
  });
  return out;
}

#ifndef KVSERVE_NO_PYBIND  // decode_step.cpp compiles this file into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm with HF's roundings");
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta (in place), then RMSNorm of h");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused (T, 2I) gate_up output");
  m.def("rope_qkv_write_", &rope_qkv_write_, "RoPE on q and k of a fused qkv (in place), k and v into the cache");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=-1) of float32 rows (first maximum; NaN largest)");
}
#endif
