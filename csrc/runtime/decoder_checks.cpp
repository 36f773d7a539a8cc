// The decoder stack's checks (decoder_checks.h): what a Decoder is built from, once, and each step's views.
#include "decoder_checks.h"

#include <cmath>
#include <string>
#include <vector>

#include "flashlm/core/error.h"
#include "flashlm/gemm/gguf_matmul.h"
#include "flashlm/gguf/dequantize.h"
#include "flashlm/moe/moe.h"

namespace flashlm::runtime::detail {

namespace {

void check_f32_vector(const TensorView& t, int64_t n, const std::string& name) {
  FLASHLM_CHECK(t.device.is_cpu(), name, " must be on the CPU");
  FLASHLM_CHECK(t.dtype == DType::F32, name, " must be float32, got ", dtype_name(t.dtype));
  FLASHLM_CHECK(t.ndim == 1 && t.shape[0] == n && t.is_contiguous(), name, " must be a contiguous [", n, "], got ",
                t.shape_string());
  FLASHLM_CHECK(n == 0 || t.data, name, " has no data");
}

void check_linear(const QuantLinear& l, int64_t n, int64_t k, const std::string& name) {
  FLASHLM_CHECK(gguf_matmul_supported(l.type), name, ": weight type ", dtype_name(l.type),
                " is not one gguf_matmul reads");
  FLASHLM_CHECK(l.n == n && l.k == k, name, ": expected ", n, " x ", k, ", got ", l.n, " x ", l.k);
  FLASHLM_CHECK(k % dtype_info(l.type).block_size == 0, name, ": K = ", k, " is not a whole number of ",
                dtype_name(l.type), " blocks");
  const TensorView& w = l.weight;
  FLASHLM_CHECK(w.device.is_cpu() && w.dtype == DType::U8 && w.is_contiguous(), name,
                ": weight must be contiguous uint8 on the CPU");
  FLASHLM_CHECK(w.numel() == storage_bytes(l.type, n * k), name, ": weight has ", w.numel(), " bytes, but ", n,
                " x ", k, " of ", dtype_name(l.type), " takes ", storage_bytes(l.type, n * k));
  FLASHLM_CHECK(w.data, name, ": weight has no data");
  if (given(l.bias)) check_f32_vector(l.bias, n, name + ": bias");
}

// A pair of rope tables: f32 [positions, head_dim], the same rows.
void check_rope(const DecoderConfig& c, const TensorView& cos, const TensorView& sin, const char* cos_name,
                const char* sin_name) {
  for (const TensorView* table : {&cos, &sin}) {
    const char* name = table == &cos ? cos_name : sin_name;
    FLASHLM_CHECK(table->device.is_cpu() && table->dtype == DType::F32 && table->ndim == 2 &&
                  table->shape[1] == c.head_dim && table->is_contiguous() && table->data,
                  name, " must be a contiguous float32 [positions, head_dim = ", c.head_dim, "], got ",
                  table->shape_string());
  }
  FLASHLM_CHECK(sin.shape[0] == cos.shape[0], sin_name, " must have ", cos_name, "'s rows");
}

// A factor of the config: finite and >= 0 (0: its default).
void check_factor(double v, const char* name) {
  FLASHLM_CHECK(std::isfinite(v) && v >= 0.0, "decoder config: ", name, " must be finite and >= 0 (0: none), got ", v);
}

// A mixture-of-experts layer's router, experts (checked by moe_expert_ffn itself, on no rows) and shared expert.
void check_moe(const DecoderConfig& c, const DecoderLayer& l, const std::string& at) {
  const DecoderMoe& m = l.moe;
  const int64_t d = c.d_model, e = m.gate.num_experts;
  FLASHLM_CHECK(e >= 1, at, "experts: expected at least one expert, got ", e);
  FLASHLM_CHECK(m.top_k <= e, at, "top_k: must be in [1, ", e, "] (the number of experts), got ", m.top_k);
  if (present(m.router)) {
    check_linear(m.router, e, d, at + "router");
  } else {
    const TensorView& w = m.router_f32;
    FLASHLM_CHECK(w.device.is_cpu() && w.dtype == DType::F32 && w.ndim == 2 && w.shape[0] == e && w.shape[1] == d &&
                      w.is_contiguous() && w.data,
                  at, "router: expected a GGML-block linear or a contiguous float32 [", e, ", ", d,
                  "] on the CPU, got ", w.shape_string());
  }
  for (const ExpertWeights* w : {&m.gate, &m.up, &m.down})
    FLASHLM_CHECK(w->data.device.is_cpu(), at, "experts must be on the CPU");
  try {
    std::vector<float> none;
    const TensorView x = TensorView::contiguous(none.data(), DType::F32, {0, d});
    moe_expert_ffn(x, TensorView::contiguous(none.data(), DType::F32, {0, m.top_k}),
                   TensorView::contiguous(none.data(), DType::I32, {0, m.top_k}), m.gate, m.up, m.down,
                   MoeActivation::SiLU, x);
  } catch (const ValueError& err) {
    FLASHLM_CHECK(false, at, "experts: ", err.what());
  }
  if (!given(m.shared_gate)) {
    FLASHLM_CHECK(!present(l.gate) && !present(l.up) && !present(l.down), at,
                  "gate, up, down: a mixture-of-experts layer without a shared expert gate has no MLP");
    return;
  }
  check_f32_vector(m.shared_gate, d, at + "shared_gate");
  const int64_t ff = l.gate.n;
  FLASHLM_CHECK(present(l.gate) && ff > 0, at, "gate: the shared expert must have at least one row");
  check_linear(l.gate, ff, d, at + "gate");
  check_linear(l.up, ff, d, at + "up");
  check_linear(l.down, d, ff, at + "down");
}

}  // namespace

void check_step(const DecoderConfig& c, const std::vector<DecoderLayer>& layers, const DecoderStep& s) {
  const size_t n_layers = layers.size();
  const TensorView& x = s.x;
  FLASHLM_CHECK(x.device.is_cpu() && x.dtype == DType::F32 && x.ndim == 2 && x.is_contiguous(),
                "x must be a contiguous float32 [T, d_model] on the CPU, got ", x.shape_string());
  FLASHLM_CHECK(x.shape[1] == c.d_model, "x: expected d_model = ", c.d_model, " columns, got ", x.shape[1]);
  const int64_t t = x.shape[0];
  FLASHLM_CHECK(t == 0 || x.data, "x has no data");
  const TensorView& p = s.positions;
  FLASHLM_CHECK(p.device.is_cpu() && p.dtype == DType::I64 && p.ndim == 1 && p.shape[0] == t && p.is_contiguous(),
                "positions must be a contiguous int64 [", t, "] on the CPU, got ", p.shape_string());
  check_rope(c, s.rope_cos, s.rope_sin, "rope_cos", "rope_sin");
  bool local = false;
  for (const DecoderLayer& l : layers) local = local || l.local_rope;
  if (local) {
    check_rope(c, s.rope_local_cos, s.rope_local_sin, "rope_local_cos", "rope_local_sin");
    FLASHLM_CHECK(s.rope_local_cos.shape[0] >= s.rope_cos.shape[0], "rope_local_cos: expected at least rope_cos's ",
                  s.rope_cos.shape[0], " rows, got ", s.rope_local_cos.shape[0]);
  }
  // Every token is a query of some sequence: paged attention leaves the rows outside every sequence 0, which
  // the layers would take for an attention output.
  const TensorView& cu = s.cu_seqlens_q;
  if (cu.data != nullptr) {
    FLASHLM_CHECK(cu.device.is_cpu() && cu.dtype == DType::I32 && cu.ndim == 1 && cu.shape[0] >= 1 && cu.is_contiguous(),
                  "cu_seqlens_q must be a contiguous int32 [num_seqs + 1] on the CPU, got ", cu.shape_string());
    const auto* offsets = static_cast<const int32_t*>(cu.data);
    const int32_t first = offsets[0], last = offsets[cu.shape[0] - 1];
    FLASHLM_CHECK(first == 0 && last == t, "cu_seqlens_q: must run from 0 to the ", t, " tokens, got ", first, " to ",
                  last);
  }
  // Each step writes its new tokens into the cache before attending, so a sequence's context holds them all
  // (paged attention alone accepts fewer keys than queries, as flash-attn does).
  const TensorView& lens = s.seq_lens;
  const int64_t num_seqs = cu.data != nullptr ? cu.shape[0] - 1 : t;
  FLASHLM_CHECK(lens.device.is_cpu() && lens.dtype == DType::I32 && lens.ndim == 1 && lens.shape[0] == num_seqs &&
                    lens.is_contiguous() && (num_seqs == 0 || lens.data),
                "seq_lens must be a contiguous int32 [", num_seqs, "] on the CPU, got ", lens.shape_string());
  const auto* len = static_cast<const int32_t*>(lens.data);
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t fresh = cu.data != nullptr ? static_cast<const int32_t*>(cu.data)[i + 1] -
                                                   static_cast<const int32_t*>(cu.data)[i] : 1;
    FLASHLM_CHECK(len[i] >= fresh, "seq_lens[", i, "] = ", len[i], " is less than the sequence's ", fresh,
                  " new tokens (cu_seqlens_q); the context includes them");
  }
  const auto* pos = static_cast<const int64_t*>(p.data);
  for (int64_t i = 0; i < t; ++i)
    FLASHLM_CHECK(pos[i] >= 0 && pos[i] < s.rope_cos.shape[0], "positions[", i, "] = ", pos[i],
                  " is outside the rope tables' ", s.rope_cos.shape[0], " rows");
  FLASHLM_CHECK(s.k_caches.size() == n_layers && s.v_caches.size() == n_layers, "k_caches and v_caches: expected ",
                n_layers, " layers, got ", s.k_caches.size(), " and ", s.v_caches.size());
  for (size_t l = 0; l < n_layers; ++l)
    for (const TensorView* cache : {&s.k_caches[l], &s.v_caches[l]})
      FLASHLM_CHECK(cache->dtype == s.k_caches[0].dtype && (cache->dtype == DType::F32 || cache->dtype == DType::BF16),
                    "kv cache of layer ", l, " must be float32 or bfloat16, as every layer's, got ",
                    dtype_name(cache->dtype));
}

void check_layers(const DecoderConfig& c, const std::vector<DecoderLayer>& layers) {
  FLASHLM_CHECK(c.d_model > 0 && c.n_head > 0 && c.n_kv_head > 0 && c.head_dim > 0 && c.d_ff > 0,
                "decoder config: sizes must be positive");
  FLASHLM_CHECK(c.n_head % c.n_kv_head == 0, "decoder config: n_head (", c.n_head,
                ") must be a multiple of n_kv_head (", c.n_kv_head, ")");
  FLASHLM_CHECK(c.head_dim % 2 == 0, "decoder config: head_dim must be even for rope, got ", c.head_dim);
  check_factor(c.softmax_scale, "softmax_scale");
  check_factor(c.attn_softcap, "attn_softcap");
  check_factor(c.embedding_scale, "embedding_scale");
  FLASHLM_CHECK(c.activation == MlpActivation::SiLU || c.activation == MlpActivation::GeluTanh,
                "decoder config: activation must be SiLU or GeluTanh, got ", static_cast<int>(c.activation));
  const int64_t d = c.d_model, qd = c.n_head * c.head_dim, kvd = c.n_kv_head * c.head_dim;
  for (size_t i = 0; i < layers.size(); ++i) {
    const DecoderLayer& l = layers[i];
    const std::string at = "layer " + std::to_string(i) + " ";
    check_f32_vector(l.attn_norm, d, at + "attn_norm");
    check_f32_vector(l.mlp_norm, d, at + "mlp_norm");
    check_linear(l.q, qd, d, at + "q");
    check_linear(l.k, kvd, d, at + "k");
    check_linear(l.v, kvd, d, at + "v");
    check_linear(l.o, d, qd, at + "o");
    FLASHLM_CHECK(given(l.q_norm) == given(l.k_norm), at, "q_norm, k_norm: both or neither");
    if (given(l.q_norm)) {
      check_f32_vector(l.q_norm, c.head_dim, at + "q_norm");
      check_f32_vector(l.k_norm, c.head_dim, at + "k_norm");
    }
    FLASHLM_CHECK(l.window >= 0, at, "window: must be >= 0 (0: none), got ", l.window);
    FLASHLM_CHECK(given(l.post_attn_norm) == given(l.post_mlp_norm), at, "post_attn_norm, post_mlp_norm: both or neither");
    if (given(l.post_attn_norm)) {
      check_f32_vector(l.post_attn_norm, d, at + "post_attn_norm");
      check_f32_vector(l.post_mlp_norm, d, at + "post_mlp_norm");
    }
    FLASHLM_CHECK(l.moe.top_k >= 0, at, "top_k: must be >= 0 (0: a dense MLP), got ", l.moe.top_k);
    if (l.moe.top_k > 0) {
      check_moe(c, l, at);
      continue;
    }
    check_linear(l.gate, c.d_ff, d, at + "gate");
    check_linear(l.up, c.d_ff, d, at + "up");
    check_linear(l.down, d, c.d_ff, at + "down");
  }
}

void check_ends(const DecoderConfig& c, const DecoderEnds& e) {
  const TensorView& emb = e.embedding;
  FLASHLM_CHECK(emb.device.is_cpu() && emb.data, "embedding must be on the CPU");
  FLASHLM_CHECK(dequantize_supported(emb.dtype), "embedding: type ", dtype_name(emb.dtype), " cannot be dequantized");
  FLASHLM_CHECK(emb.ndim == 2 && emb.shape[0] > 0 && emb.shape[1] == c.d_model && emb.is_contiguous(),
                "embedding must be a contiguous [vocab, d_model = ", c.d_model, "], got ", emb.shape_string());
  FLASHLM_CHECK(c.d_model % dtype_info(emb.dtype).block_size == 0, "embedding: d_model = ", c.d_model,
                " is not a whole number of ", dtype_name(emb.dtype), " blocks");
  check_f32_vector(e.final_norm, c.d_model, "final_norm");
  if (e.head.weight.data || e.head.weight.ndim) {
    FLASHLM_CHECK(e.head.n > 0, "head: expected at least one row, got ", e.head.n);
    check_linear(e.head, e.head.n, c.d_model, "head");
  }
}

}  // namespace flashlm::runtime::detail
