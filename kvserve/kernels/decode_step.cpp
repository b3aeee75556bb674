// A small-batch decode step's layers in one call: the loop of kvserve.model.llama.LlamaModel.forward in C++.
//
// At batch 1 a SmolLM2 decode step is ~300 small calls from Python (four matmuls, four fused elementwise ops and an
// attention call per layer, plus the views between them); once the matmuls stream at the memory bandwidth, the
// Python, pybind and dispatch cost around them is a quarter of the step. This runs the same kernels, in the same
// order, with the same roundings, from one Python call: every layer's kernels are compiled into this module (the
// four kernel files are included below inside their own namespaces, their pybind modules switched off).
//
// Linear layers come as (kind, a, b): kind 0 = bfloat16 gemv (a: gemv.cpp's packed weight), kind 1 = int8 (a: packed
// codes, b: scales), kind 2 = Q4_0/Q4_1 (a: packed nibbles, b: d and m; both quant_gemm.cpp). Only decode batches
// (one new token per sequence, or verification rows; <= 8 rows, unpadded) of a bfloat16 model without biases come
// here; the model checks that before calling.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

#define KVSERVE_NO_PYBIND 1
namespace kv_fused {
#include "fused_ops.cpp"
}
namespace kv_attn {
#include "paged_attention.cpp"
}
namespace kv_gemv {
#include "gemv.cpp"
}
namespace kv_int8 {
#include "quant_gemm.cpp"
}

namespace {

struct LinearRef {
  int64_t kind;
  torch::Tensor a, b;
};

struct LayerRef {
  torch::Tensor input_norm, post_norm;
  LinearRef qkv, o, gate_up, down;
};

torch::Tensor apply(const LinearRef& l, const torch::Tensor& x) {
  if (l.kind == 0) return kv_gemv::gemv(x, l.a);
  if (l.kind == 1) return kv_int8::int8_linear(x, l.a, l.b, 0);
  return kv_int8::q4_linear(x, l.a, l.b, 0);
}

}  // namespace

// The per-model part, built once: every layer's norms and linear weights.
class DecodePlan {
 public:
  DecodePlan(const std::vector<torch::Tensor>& norms, const std::vector<int64_t>& kinds,
             const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, int64_t heads,
             int64_t kv_heads, double eps, double scale)
      : H_(heads), Hkv_(kv_heads), eps_(eps), scale_(scale) {
    const size_t L = norms.size() / 2;
    TORCH_CHECK(norms.size() == 2 * L && kinds.size() == 4 * L && a.size() == 4 * L && b.size() == 4 * L,
                "a plan needs 2 norms and 4 linear layers per layer");
    for (size_t i = 0; i < L; ++i) {
      LinearRef lin[4];
      for (int j = 0; j < 4; ++j) {
        const size_t k = 4 * i + j;
        TORCH_CHECK(kinds[k] >= 0 && kinds[k] <= 2, "linear kind must be 0 (bf16 gemv), 1 (int8) or 2 (4-bit)");
        lin[j] = LinearRef{kinds[k], a[k], b[k]};
      }
      layers_.push_back(LayerRef{norms[2 * i], norms[2 * i + 1], lin[0], lin[1], lin[2], lin[3]});
    }
  }

  // h: (T, hidden) residual stream after the embedding (updated in place); x: layer 0's normed input. Returns h after
  // the last layer's residual add. Every row is a decode row (the runner pads no decode-only step of <= 8 rows).
  torch::Tensor run(torch::Tensor h, torch::Tensor x, const std::vector<torch::Tensor>& k_caches,
                    const std::vector<torch::Tensor>& v_caches, torch::Tensor positions, torch::Tensor slots,
                    torch::Tensor block_tables, torch::Tensor seq_lens, int64_t num_decodes, torch::Tensor cos,
                    torch::Tensor sin) {
    const int64_t L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L && static_cast<int64_t>(v_caches.size()) == L,
                "one K and one V cache per layer");
    TORCH_CHECK(h.scalar_type() == torch::kBFloat16 && h.is_contiguous() && h.dim() == 2, "h must be bf16 (T, hidden)");
    const int64_t T = h.size(0);
    TORCH_CHECK(num_decodes == T && T >= 1 && T <= kv_gemv::MAX_M, "1..8 decode rows, unpadded");
    const int64_t D = cos.size(1);
    const int64_t qw = H_ * D;
    // profile_: each kernel call's wall time by kind (a steady_clock read per call, ~20 ns; off by default)
    using clock = std::chrono::steady_clock;
    auto t = profile_ ? clock::now() : clock::time_point{};
    auto lap = [&](int kind) {
      if (!profile_) return;
      const auto now = clock::now();
      spent_[kind] += std::chrono::duration<double>(now - t).count();
      t = now;
    };
    for (int64_t i = 0; i < L; ++i) {
      const LayerRef& lw = layers_[i];
      torch::Tensor qkv = apply(lw.qkv, x);  // (T, (H + 2 Hkv) D)
      lap(kMatmul);
      kv_fused::rope_qkv_write_(qkv, positions, cos, sin, k_caches[i], v_caches[i], slots, H_, Hkv_);
      lap(kElementwise);
      torch::Tensor q = qkv.narrow(1, 0, qw).view({T, H_, D});
      torch::Tensor attn = kv_attn::paged_decode_attention(q, k_caches[i], v_caches[i], block_tables, seq_lens, scale_);
      lap(kAttention);
      torch::Tensor o = apply(lw.o, attn.view({T, qw}));
      lap(kMatmul);
      x = kv_fused::add_rms_norm_(h, o, lw.post_norm, eps_);
      lap(kElementwise);
      torch::Tensor gate_up = apply(lw.gate_up, x);
      lap(kMatmul);
      torch::Tensor act = kv_fused::silu_mul(gate_up);
      lap(kElementwise);
      torch::Tensor mlp = apply(lw.down, act);
      lap(kMatmul);
      if (i + 1 < L) {
        x = kv_fused::add_rms_norm_(h, mlp, layers_[i + 1].input_norm, eps_);
      } else {
        h.add_(mlp);
      }
      lap(kElementwise);
    }
    return h;
  }

  void set_profile(bool on) { profile_ = on; }

  // seconds spent per kind of kernel since the last call (matmul, attention, elementwise), then reset
  std::vector<double> take_profile() {
    std::vector<double> out(spent_.begin(), spent_.end());
    spent_.fill(0.0);
    return out;
  }

 private:
  enum { kMatmul = 0, kAttention = 1, kElementwise = 2 };
  bool profile_ = false;
  std::array<double, 3> spent_{};
  std::vector<LayerRef> layers_;
  int64_t H_, Hkv_;
  double eps_, scale_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodePlan>(m, "DecodePlan")
      .def(pybind11::init<const std::vector<torch::Tensor>&, const std::vector<int64_t>&,
                          const std::vector<torch::Tensor>&, const std::vector<torch::Tensor>&, int64_t, int64_t,
                          double, double>())
      .def("run", &DecodePlan::run, "every layer of a small decode batch; returns the residual stream")
      .def("set_profile", &DecodePlan::set_profile, "time each kernel call by kind (see take_profile)")
      .def("take_profile", &DecodePlan::take_profile,
           "seconds in matmuls, attention and elementwise ops since the last call, then reset");
  m.def("set_amx", &kv_attn::set_amx, "turn the AMX attention path on or off in this module");
}
