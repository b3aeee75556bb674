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
// (one new token per sequence, or verification rows; unpadded) of a bfloat16 model without biases come here, up to
// max_rows() rows: 8 where a layer is bf16 (the gemv kernel's limit; oneDNN takes more), MAX_ROWS where every layer
// is int8 or 4-bit, whose kernels take any row count (a batch of 64 sequences then skips ~300 Python calls a step
// too); the model checks that before calling.
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

using bf16 = c10::BFloat16;

// One linear layer: kind 0 = bfloat16 gemv (a: gemv.cpp's packed weight), 1 = int8 (a: codes, b: scales), 2 = 4-bit
// (a: nibbles, b: d and m). K and N are read off the packed shapes once, and the raw pointers kept.
struct LinearRef {
  int64_t kind = 0, N = 0, K = 0;
  torch::Tensor a, b;  // held, so the pointers below stay valid
  const void* wp = nullptr;
  const void* ws = nullptr;
  int64_t SB = 0;  // int8: scale groups per row (K/32 for q8_0, K/64 for w8a8)

  LinearRef() = default;
  LinearRef(int64_t kind_, torch::Tensor a_, torch::Tensor b_) : kind(kind_), a(std::move(a_)), b(std::move(b_)) {
    TORCH_CHECK(kind >= 0 && kind <= 2, "linear kind must be 0 (bf16 gemv), 1 (int8) or 2 (4-bit)");
    TORCH_CHECK(a.dim() >= 2, "packed weights must be at least 2-d");
    N = a.size(0) * 16;
    if (kind == 0) {
      TORCH_CHECK(kv_gemv::available(), "the bf16 gemv kernel needs AVX512-BF16");
      K = a.size(1) * 2;
      TORCH_CHECK(a.dim() == 3 && a.size(2) == 32 && a.scalar_type() == torch::kBFloat16 && a.is_contiguous(),
                  "gemv weights must be contiguous bf16 (N/16, K/2, 32)");
    } else {
      K = a.size(1) * 32;
      if (kind == 1) {
        SB = kv_int8::check_weights(a, b, K);
      } else {
        kv_int8::check_q4_weights(a, b, K);
      }
      ws = b.data_ptr();
    }
    wp = a.data_ptr();
  }
};

struct LayerRef {
  torch::Tensor input_norm, post_norm;
  LinearRef qkv, o, gate_up, down;
};

// x (M, K) -> y (M, N) on raw buffers; xq, xs, xstart: the int8 kernels' activation scratch.
void apply(const LinearRef& l, const bf16* x, bf16* y, int64_t M, int8_t* xq, float* xs, int32_t* xstart) {
  if (l.kind == 0) {
#ifdef KVSERVE_AVX512_BF16
    kv_gemv::gemv_raw(x, static_cast<const bf16*>(l.wp), y, M, l.N, l.K);
#endif
  } else if (l.kind == 1) {
    kv_int8::int8_linear_raw<bf16>(x, y, M, l.N, l.K, static_cast<const uint8_t*>(l.wp),
                                   static_cast<const c10::Half*>(l.ws), l.SB, kv_int8::kBest, xq, xs, xstart);
  } else {
    kv_int8::q4_linear_raw<bf16>(x, y, M, l.N, l.K, static_cast<const uint8_t*>(l.wp),
                                 static_cast<const c10::Half*>(l.ws), kv_int8::kBest, xq, xs, xstart);
  }
}

// The buffers of a step of T rows, made on the first such step and reused: every kernel's output and the int8
// activation scratch, so a step allocates nothing. Before, each layer's ~19 allocations and views (torch::empty
// ~0.23 us, a narrow + view ~0.8 us on this host) cost ~6 us, ~0.2 ms a token.
struct Workspace {
  torch::Tensor qkv, q, attn, o, x, gate_up, act, mlp, xq, xs, xstart;
};

constexpr int64_t MAX_ROWS = 256;  // rows per call of a plan without gemv layers (the engine's default batch: 128)

}  // namespace

// The per-model part, built once: every layer's norms and linear weights, checked here once.
class DecodePlan {
 public:
  DecodePlan(const std::vector<torch::Tensor>& norms, const std::vector<int64_t>& kinds,
             const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, int64_t heads,
             int64_t kv_heads, double eps, double scale)
      : H_(heads), Hkv_(kv_heads), eps_(eps), scale_(scale) {
    const size_t L = norms.size() / 2;
    TORCH_CHECK(L >= 1 && norms.size() == 2 * L && kinds.size() == 4 * L && a.size() == 4 * L && b.size() == 4 * L,
                "a plan needs 2 norms and 4 linear layers per layer");
    for (size_t i = 0; i < L; ++i) {
      LinearRef lin[4];
      for (int j = 0; j < 4; ++j) {
        const size_t k = 4 * i + j;
        lin[j] = LinearRef(kinds[k], a[k], b[k]);
      }
      layers_.push_back(LayerRef{norms[2 * i], norms[2 * i + 1], lin[0], lin[1], lin[2], lin[3]});
    }
    for (const LayerRef& l : layers_)
      for (const LinearRef* lin : {&l.qkv, &l.o, &l.gate_up, &l.down}) has_gemv_ = has_gemv_ || lin->kind == 0;
    const LayerRef& l0 = layers_[0];
    hidden_ = l0.qkv.K;
    inter_ = l0.down.K;
    TORCH_CHECK(heads > 0 && kv_heads > 0 && l0.o.K % heads == 0, "o's input width must be heads x head_dim");
    D_ = l0.o.K / heads;
    for (const LayerRef& l : layers_) {
      TORCH_CHECK(l.qkv.K == hidden_ && l.qkv.N == (H_ + 2 * Hkv_) * D_ && l.o.K == H_ * D_ && l.o.N == hidden_ &&
                      l.gate_up.K == hidden_ && l.gate_up.N == 2 * inter_ && l.down.K == inter_ &&
                      l.down.N == hidden_, "the layers' linear shapes do not chain");
      TORCH_CHECK(l.input_norm.scalar_type() == torch::kBFloat16 && l.post_norm.scalar_type() == torch::kBFloat16 &&
                      l.input_norm.is_contiguous() && l.post_norm.is_contiguous() &&
                      l.input_norm.numel() == hidden_ && l.post_norm.numel() == hidden_,
                  "norm weights must be contiguous bf16 (hidden,)");
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
    TORCH_CHECK(h.scalar_type() == torch::kBFloat16 && h.is_contiguous() && h.dim() == 2 && h.size(1) == hidden_,
                "h must be bf16 (T, hidden)");
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.sizes() == h.sizes(),
                "x must be bf16 of h's shape");
    const int64_t T = h.size(0);
    TORCH_CHECK(num_decodes == T && T >= 1 && T <= max_rows(), "1..", max_rows(), " decode rows, unpadded");
    TORCH_CHECK(cos.size(1) == D_ && cos.is_contiguous() && sin.is_contiguous() &&
                    cos.scalar_type() == torch::kBFloat16 && sin.scalar_type() == torch::kBFloat16,
                "rotary tables must be contiguous bf16 with head_dim columns");
    TORCH_CHECK(positions.is_contiguous() && slots.is_contiguous() && positions.numel() == T && slots.numel() == T,
                "one position and one slot per row, contiguous");
    Workspace& w = workspace(T);
    const int64_t qw = H_ * D_, width = (H_ + 2 * Hkv_) * D_;
    bf16* hp = h.data_ptr<bf16>();
    const bf16* xin = x.data_ptr<bf16>();
    bf16* xp = w.x.data_ptr<bf16>();
    bf16* qkvp = w.qkv.data_ptr<bf16>();
    bf16* qp = w.q.data_ptr<bf16>();
    bf16* attnp = w.attn.data_ptr<bf16>();
    bf16* op = w.o.data_ptr<bf16>();
    bf16* gup = w.gate_up.data_ptr<bf16>();
    bf16* actp = w.act.data_ptr<bf16>();
    bf16* mlpp = w.mlp.data_ptr<bf16>();
    int8_t* xq = w.xq.data_ptr<int8_t>();
    float* xs = w.xs.data_ptr<float>();
    int32_t* xst = w.xstart.data_ptr<int32_t>();
    const float eps = static_cast<float>(eps_);
    // profile_: each kernel call's wall time by kind (a steady_clock read per call, ~20 ns; off by default)
    using clock = std::chrono::steady_clock;
    auto t = profile_ ? clock::now() : clock::time_point{};
    auto lap = [&](int kind) {
      if (!profile_) return;
      const auto now = clock::now();
      spent_[kind] += std::chrono::duration<double>(now - t).count();
      t = now;
    };
    const int64_t* posp = positions.data_ptr<int64_t>();
    const int64_t* slotp = slots.data_ptr<int64_t>();
    const char* cosp = static_cast<const char*>(cos.data_ptr());
    const char* sinp = static_cast<const char*>(sin.data_ptr());
    const int64_t kv_row = Hkv_ * D_ * 2;  // bytes of one token's K (or V) in a layer's cache
    for (int64_t i = 0; i < L; ++i) {
      const LayerRef& lw = layers_[i];
      // The layer's small operands, cold after the last layer's weights streamed through the caches, fetched while
      // the qkv matmul streams: the norms' weights, the rotary rows, the K/V cache lines this step writes (the
      // single-threaded ops after the matmuls took 1.3-1.8 us each at one row, mostly waiting on them; 1.048x,
      // 1.015x and 1.022x q4_1 batch-1 decode, 30 of 42 pairs).
      kv_attn::prefetch_span(lw.post_norm.data_ptr(), hidden_ * 2);
      if (i + 1 < L) kv_attn::prefetch_span(layers_[i + 1].input_norm.data_ptr(), hidden_ * 2);
      for (int64_t r = 0; r < T; ++r) {
        kv_attn::prefetch_span(cosp + posp[r] * D_ * 2, D_ * 2);
        kv_attn::prefetch_span(sinp + posp[r] * D_ * 2, D_ * 2);
        kv_attn::prefetch_span(static_cast<const char*>(k_caches[i].data_ptr()) + slotp[r] * kv_row, kv_row, true);
        kv_attn::prefetch_span(static_cast<const char*>(v_caches[i].data_ptr()) + slotp[r] * kv_row, kv_row, true);
      }
      apply(lw.qkv, i == 0 ? xin : xp, qkvp, T, xq, xs, xst);  // (T, (H + 2 Hkv) D)
      lap(kMatmul);
      kv_fused::rope_qkv_write_(w.qkv, positions, cos, sin, k_caches[i], v_caches[i], slots, H_, Hkv_);
      for (int64_t r = 0; r < T; ++r) std::memcpy(qp + r * qw, qkvp + r * width, sizeof(bf16) * qw);  // (T, H, D)
      lap(kElementwise);
      kv_attn::paged_decode_attention_into(w.q, k_caches[i], v_caches[i], block_tables, seq_lens, scale_, w.attn);
      lap(kAttention);
      apply(lw.o, attnp, op, T, xq, xs, xst);  // (T, hidden)
      lap(kMatmul);
      kv_fused::rms_norm_rows<bf16>(hp, op, lw.post_norm.data_ptr<bf16>(), xp, T, hidden_, eps);  // h += o; x = norm
      lap(kElementwise);
      apply(lw.gate_up, xp, gup, T, xq, xs, xst);  // (T, 2I)
      lap(kMatmul);
      kv_fused::silu_mul_rows<bf16>(gup, actp, T, inter_);  // (T, I)
      lap(kElementwise);
      apply(lw.down, actp, mlpp, T, xq, xs, xst);  // (T, hidden)
      lap(kMatmul);
      if (i + 1 < L) {  // h += mlp, then the next layer's input norm
        kv_fused::rms_norm_rows<bf16>(hp, mlpp, layers_[i + 1].input_norm.data_ptr<bf16>(), xp, T, hidden_, eps);
      } else {  // h += mlp, rounded as torch's bf16 add
        for (int64_t e = 0; e < T * hidden_; ++e)
          hp[e] = bf16(kvserve::to_float(hp[e]) + kvserve::to_float(mlpp[e]));
      }
      lap(kElementwise);
    }
    return h;
  }

  // The output side of a step, set once (kvserve.model.llama): the embedding table, the final norm and the lm_head
  // as a linear of kind 0 or 1, so that run_steps can take several greedy steps in one call.
  void set_head(torch::Tensor embed, torch::Tensor norm, int64_t kind, torch::Tensor a, torch::Tensor b) {
    TORCH_CHECK(embed.dim() == 2 && embed.size(1) == hidden_ && embed.scalar_type() == torch::kBFloat16 &&
                    embed.is_contiguous(), "the embedding must be contiguous bf16 (vocab, hidden)");
    TORCH_CHECK(norm.numel() == hidden_ && norm.scalar_type() == torch::kBFloat16 && norm.is_contiguous(),
                "the final norm must be contiguous bf16 (hidden,)");
    LinearRef head(kind, std::move(a), std::move(b));
    TORCH_CHECK(head.K == hidden_ && head.N <= embed.size(0),
                "the lm_head must map hidden to at most the embedding's vocabulary");
    head_ = std::move(head);
    embed_ = std::move(embed);
    final_norm_ = std::move(norm);
  }

  // `steps` greedy decode steps of T rows (one sequence each) in one call: step j embeds ids (j = 0) or step j - 1's
  // tokens at positions + j, writes their K/V to slots[j] and attends to seq_lens + j tokens over block_tables, then
  // the final norm, the lm_head and the argmax (torch's rules) - the kernels and roundings of run() and of the
  // model's Python output side, so the tokens are those of `steps` separate engine steps. Returns (steps, T) int64.
  torch::Tensor run_steps(torch::Tensor ids, const std::vector<torch::Tensor>& k_caches,
                          const std::vector<torch::Tensor>& v_caches, torch::Tensor positions, torch::Tensor slots,
                          torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor cos, torch::Tensor sin) {
    TORCH_CHECK(embed_.defined(), "run_steps needs set_head first");
    TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous(), "ids must be int64 (T,)");
    const int64_t T = ids.size(0), V = head_.N, vocab = embed_.size(0);
    TORCH_CHECK(slots.dim() == 2 && slots.size(1) == T && slots.size(0) >= 1 && slots.is_contiguous() &&
                    slots.scalar_type() == torch::kInt64, "slots must be contiguous int64 (steps, T)");
    TORCH_CHECK(positions.numel() == T && positions.scalar_type() == torch::kInt64 && seq_lens.numel() == T &&
                    seq_lens.scalar_type() == torch::kInt32, "positions (T,) int64 and seq_lens (T,) int32");
    TORCH_CHECK(T <= max_step_rows(), "at most ", max_step_rows(), " rows with this lm_head");
    const int64_t steps = slots.size(0);
    auto pos = positions.contiguous().clone();
    auto lens = seq_lens.contiguous().clone();
    auto tokens = torch::empty({steps, T}, torch::kInt64);
    const auto o = torch::TensorOptions().dtype(torch::kBFloat16);
    auto h = torch::empty({T, hidden_}, o), x = torch::empty({T, hidden_}, o), xf = torch::empty({T, hidden_}, o);
    auto logits = torch::empty({T, V}, o);
    std::vector<float> row(V);
    Workspace& w = workspace(T);
    const float eps = static_cast<float>(eps_);
    const bf16* emb = embed_.data_ptr<bf16>();
    bf16* hp = h.data_ptr<bf16>();
    int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* in = ids.data_ptr<int64_t>();
    using clock = std::chrono::steady_clock;
    for (int64_t j = 0; j < steps; ++j) {
      auto t = profile_ ? clock::now() : clock::time_point{};
      const int64_t* src = j == 0 ? in : tok + (j - 1) * T;
      for (int64_t r = 0; r < T; ++r) {  // F.embedding
        TORCH_CHECK(src[r] >= 0 && src[r] < vocab, "token id ", src[r], " out of the vocabulary");
        std::memcpy(hp + r * hidden_, emb + src[r] * hidden_, sizeof(bf16) * hidden_);
      }
      kv_fused::rms_norm_rows<bf16>(hp, nullptr, layers_[0].input_norm.data_ptr<bf16>(), x.data_ptr<bf16>(), T,
                                    hidden_, eps);
      if (profile_) spent_[kOutput] += std::chrono::duration<double>(clock::now() - t).count();
      run(h, x, k_caches, v_caches, pos, slots.select(0, j), block_tables, lens, T, cos, sin);
      if (profile_) t = clock::now();
      kv_fused::rms_norm_rows<bf16>(hp, nullptr, final_norm_.data_ptr<bf16>(), xf.data_ptr<bf16>(), T, hidden_, eps);
      apply(head_, xf.data_ptr<bf16>(), logits.data_ptr<bf16>(), T, w.xq.data_ptr<int8_t>(), w.xs.data_ptr<float>(),
            w.xstart.data_ptr<int32_t>());  // (T, V)
      const bf16* lp = logits.data_ptr<bf16>();
      for (int64_t r = 0; r < T; ++r) {  // .float() then argmax_rows
        const bf16* lr = lp + r * V;
        int64_t v = 0;
#ifdef KVSERVE_AVX512_BF16
        for (; v + 16 <= V; v += 16) _mm512_storeu_ps(row.data() + v, kvserve::bf16x16_to_float(lr + v));
#endif
        for (; v < V; ++v) row[v] = kvserve::to_float(lr[v]);
        tok[j * T + r] = kv_fused::argmax_row(row.data(), V);
      }
      int64_t* pp = pos.data_ptr<int64_t>();
      int32_t* lp32 = lens.data_ptr<int32_t>();
      for (int64_t r = 0; r < T; ++r) {
        ++pp[r];
        ++lp32[r];
      }
      if (profile_) spent_[kOutput] += std::chrono::duration<double>(clock::now() - t).count();
    }
    return tokens;
  }

  void set_profile(bool on) { profile_ = on; }

  // The most rows run() takes: 8 with a bf16 gemv layer, else MAX_ROWS.
  int64_t max_rows() const { return has_gemv_ ? kv_gemv::MAX_M : MAX_ROWS; }
  // ... and run_steps: 8 with a bf16 gemv lm_head too
  int64_t max_step_rows() const { return head_.kind == 0 ? std::min(max_rows(), kv_gemv::MAX_M) : max_rows(); }

  // seconds spent per kind of kernel since the last call (matmul, attention, elementwise; and run_steps' own part:
  // embedding, the first and final norms, lm_head, argmax), then reset
  std::vector<double> take_profile() {
    std::vector<double> out(spent_.begin(), spent_.end());
    spent_.fill(0.0);
    return out;
  }

 private:
  // The buffers of a step of T rows: one set per T up to 8 (decode batches change size often there); above, one set
  // at a power-of-two capacity, grown when needed, and views of its first T rows.
  Workspace& workspace(int64_t T) {
    if (T <= kv_gemv::MAX_M) {
      Workspace& w = ws_[T];
      if (!w.qkv.defined()) w = make_workspace(T);
      return w;
    }
    if (T > big_rows_) {
      big_rows_ = std::min<int64_t>(MAX_ROWS, int64_t{1} << (64 - __builtin_clzll(static_cast<uint64_t>(T - 1))));
      big_ = make_workspace(big_rows_);
      view_rows_ = 0;
    }
    if (T != view_rows_) {  // the scratch (xq, xs, xstart) is read through raw pointers: kept whole
      view_ = big_;
      for (torch::Tensor* t : {&view_.qkv, &view_.q, &view_.attn, &view_.o, &view_.x, &view_.gate_up, &view_.act,
                               &view_.mlp})
        *t = t->narrow(0, 0, T);
      view_rows_ = T;
    }
    return view_;
  }

  Workspace make_workspace(int64_t T) const {
    Workspace w;
    const auto o = torch::TensorOptions().dtype(torch::kBFloat16);
    const int64_t max_k = std::max({hidden_, H_ * D_, inter_});
    w.qkv = torch::empty({T, (H_ + 2 * Hkv_) * D_}, o);
    w.q = torch::empty({T, H_, D_}, o);
    w.attn = torch::empty({T, H_, D_}, o);
    w.o = torch::empty({T, hidden_}, o);
    w.x = torch::empty({T, hidden_}, o);
    w.gate_up = torch::empty({T, 2 * inter_}, o);
    w.act = torch::empty({T, inter_}, o);
    w.mlp = torch::empty({T, hidden_}, o);
    w.xq = torch::empty({T * max_k}, o.dtype(torch::kInt8));
    w.xs = torch::empty({T * max_k / 32}, o.dtype(torch::kFloat32));
    w.xstart = torch::empty({T * max_k / 32}, o.dtype(torch::kInt32));
    return w;
  }

  enum { kMatmul = 0, kAttention = 1, kElementwise = 2, kOutput = 3 };
  bool profile_ = false;
  std::array<double, 4> spent_{};
  std::vector<LayerRef> layers_;
  LinearRef head_;  // set_head: the lm_head, the embedding table and the final norm
  torch::Tensor embed_, final_norm_;
  std::array<Workspace, kv_gemv::MAX_M + 1> ws_;
  Workspace big_, view_;  // more than 8 rows: big_rows_ of them, and view_rows_ of those
  int64_t big_rows_ = 0, view_rows_ = 0;
  bool has_gemv_ = false;  // a bf16 gemv layer: at most 8 rows a call
  int64_t H_, Hkv_, D_ = 0, hidden_ = 0, inter_ = 0;
  double eps_, scale_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodePlan>(m, "DecodePlan")
      .def(pybind11::init<const std::vector<torch::Tensor>&, const std::vector<int64_t>&,
                          const std::vector<torch::Tensor>&, const std::vector<torch::Tensor>&, int64_t, int64_t,
                          double, double>())
      .def("run", &DecodePlan::run, "every layer of a small decode batch; returns the residual stream")
      .def("set_head", &DecodePlan::set_head, "the embedding, final norm and lm_head, for run_steps")
      .def("run_steps", &DecodePlan::run_steps,
           "several greedy decode steps in one call, each step's argmax the next one's input; (steps, T) tokens")
      .def("max_rows", &DecodePlan::max_rows, "the most decode rows run() takes")
      .def("max_step_rows", &DecodePlan::max_step_rows, "the most rows run_steps() takes")
      .def("set_profile", &DecodePlan::set_profile, "time each kernel call by kind (see take_profile)")
      .def("take_profile", &DecodePlan::take_profile,
           "seconds in matmuls, attention, elementwise ops and run_steps' output side since the last call, then reset");
  m.def("set_amx", &kv_attn::set_amx, "turn the AMX attention path on or off in this module");
  m.def("set_dynamic_tiles", [](bool on) { kv_int8::dynamic_switch().store(on); },
        "int8 matmuls of 65+ rows: units from a shared counter (on by default) or a fixed split, in this module");
  m.def("set_split", [](bool on) { kv_attn::split_switch().store(on); },
        "split a few sequences' decode attention contexts across threads in this module (on by default)");
  m.def("set_prefetch_bytes", &kvserve::set_prefetch_bytes,
        "software prefetch distance in bytes (0: off) of this module's kernels, for benchmarks");
  m.def("prefetch_bytes", [] { return kvserve::prefetch_bytes(); }, "the software prefetch distance now");
}
