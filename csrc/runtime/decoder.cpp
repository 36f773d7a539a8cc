// The CPU decoder stack (flashlm/runtime/decoder.h): the library's kernels chained layer by layer, with one
// scratch allocation per step; the weights are checked (and regrouped) when the Decoder is built, not per
// step. q/k/v and gate/up (with the MLP's activation) each go to the thread pool as one job (one quantization of
// their shared input); everything else is the public kernels, which check their own arguments (a
// mixture-of-experts layer's routing and experts are moe_route and moe_expert_ffn, the module path's calls).
// Every step rounds as the module path (flashlm.models.Transformer.forward_paged) does, so both give the same
// logits.
#include "flashlm/runtime/decoder.h"

#include "decoder_checks.h"
#include "rope_kernels.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../gemm/shared_gguf_matmul.h"
#include "flashlm/activation/gelu_tanh.h"
#include "flashlm/activation/silu_mul.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "flashlm/gemm/gguf_matmul.h"
#include "flashlm/gguf/dequantize.h"
#include "flashlm/kvcache/paged_attention.h"
#include "flashlm/moe/moe.h"
#include "flashlm/norm/rms_norm.h"

namespace flashlm::runtime {

namespace {

using detail::present;
using gemm::detail::MatmulPart;

MatmulPart part(const QuantLinear& l, float* y, const uint8_t* packed) {
  return {l.type, static_cast<const uint8_t*>(l.weight.data), l.n,
          l.bias.data ? static_cast<const float*>(l.bias.data) : nullptr, y, packed};
}


// y = x W^T for x [T, k] and every part, at most kChunkRows rows of x at a time: the kernel passes all of its
// rows over each small tile of weight rows, so a prefill's thousands of rows (their quantized copies, megabytes)
// would stream from memory once per tile; a chunk's stay in L2. Rows are independent: the same results.
constexpr int64_t kChunkRows = 64;
constexpr int kMaxParts = 3;
// The gated MLP's activation runs on ranges of a row that start at multiples of this: the activation kernels'
// widest vector (AVX-512's 16 floats), so a range splits into the same vectors as the whole row does and the
// results are the same bits (a row whose width is not a multiple goes the unfused way).
constexpr int64_t kActivationRows = 16;

void matmul(const float* x, int64_t t, int64_t k, const MatmulPart* parts, int count) {
  FLASHLM_CHECK(count >= 1 && count <= kMaxParts, "matmul: 1 to ", kMaxParts, " parts, got ", count);
  for (int64_t r0 = 0; r0 < t; r0 += kChunkRows) {
    const int64_t r1 = std::min(t, r0 + kChunkRows);
    MatmulPart chunk[kMaxParts];
    for (int i = 0; i < count; ++i) {
      chunk[i] = parts[i];
      chunk[i].y = parts[i].y + r0 * parts[i].n;
    }
    gemm::detail::gguf_matmul_parts_f32(x + r0 * k, r1 - r0, k, chunk, count);
  }
}


// A layer's linears: attention's four, the MLP's three (absent in a mixture-of-experts layer without a shared
// expert) and the router.
std::vector<const QuantLinear*> linears(const DecoderLayer& l) {
  std::vector<const QuantLinear*> all = {&l.q, &l.k, &l.v, &l.o};
  for (const QuantLinear* m : {&l.gate, &l.up, &l.down, &l.moe.router})
    if (present(*m)) all.push_back(m);
  return all;
}

// The widest MLP (or shared expert) of the layers: the width of the step's gate/up scratch.
int64_t widest_mlp(const std::vector<DecoderLayer>& layers) {
  int64_t ff = 0;
  for (const DecoderLayer& l : layers) ff = std::max(ff, present(l.gate) ? l.gate.n : 0);
  return ff;
}

TensorView rows(float* data, int64_t t, int64_t d) { return TensorView::contiguous(data, DType::F32, {t, d}); }

// y[i, j] = f(sum_c x[i, c] w[j, c]) for x [T, d] and w [n, d]: the products (exact in f64) summed in f64,
// f applied in f64, rounded to f32 once.
template <class F>
void f64_rows(const float* x, int64_t t, int64_t d, const float* w, int64_t n, float* y, F f) {
  parallel_for(t * n, std::max<int64_t>(1, (1 << 14) / d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* xr = x + (i / n) * d;
      const float* wr = w + (i % n) * d;
      double dot = 0.0;
      for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(xr[c]) * static_cast<double>(wr[c]);
      y[i] = static_cast<float>(f(dot));
    }
  });
}

// n values from one dtype to another (F32 <-> BF16: round to nearest even, as torch's .to() does).
void convert(const void* src, DType from, void* dst, DType to, int64_t n) {
  dequantize(TensorView::contiguous(const_cast<void*>(src), from, {n}), TensorView::contiguous(dst, to, {n}));
}

}  // namespace

namespace detail {
void rotate_half_scalar(float* v, int64_t half, const float* c, const float* s, int64_t begin) {
  for (int64_t i = begin; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = std::fma(b, -s[i], a * c[i]);
    v[i + half] = std::fma(a, s[i + half], b * c[i + half]);
  }
}
#ifndef FLASHLM_HAVE_AVX2_KERNELS
void rotate_half_avx2(float* v, int64_t half, const float* c, const float* s) { rotate_half_scalar(v, half, c, s); }
#endif
}  // namespace detail

namespace {

// Rotate-half rope on `heads` heads of each row of x [T, heads * hd] (rope_kernels.h), c and s the rows
// positions[t] of the tables.
void rotate(float* x, int64_t t_count, int64_t heads, int64_t hd, const int64_t* positions, const float* cos,
            const float* sin) {
  const int64_t half = hd / 2;
  const bool avx2 = cpu_isa() == CpuIsa::AVX2;
  for (int64_t t = 0; t < t_count; ++t) {
    const float* c = cos + positions[t] * hd;
    const float* s = sin + positions[t] * hd;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * hd;
      if (avx2) detail::rotate_half_avx2(v, half, c, s);
      else detail::rotate_half_scalar(v, half, c, s);
    }
  }
}

}  // namespace

struct Decoder::State {
  DecoderConfig config;
  std::vector<DecoderLayer> layers;
  DecoderEnds ends;
  bool has_ends = false;
  std::unordered_map<const void*, std::vector<uint8_t>> packed;  // a weight's data -> its regrouped copy

  // Makes l's regrouped copy where its type and shape have one, once per weight; the matmuls then read only
  // the copy (its last n % 4 rows included), never the weight's own bytes.
  void pack(const QuantLinear& l) {
    if (!gemm::detail::repack_x4_supported(l.type, l.n, l.k) || packed.count(l.weight.data)) return;
    std::vector<uint8_t> copy(static_cast<size_t>(storage_bytes(l.type, l.n * l.k)));
    gemm::detail::repack_x4(l.type, static_cast<const uint8_t*>(l.weight.data), l.n, l.k, copy.data());
    packed.emplace(l.weight.data, std::move(copy));
  }
  MatmulPart part(const QuantLinear& l, float* y) const {
    const auto it = packed.find(l.weight.data);
    return runtime::part(l, y, it == packed.end() ? nullptr : it->second.data());
  }

  void forward(const DecoderStep& s) const;
  // out = the layer's gated MLP (SwiGLU or GeGLU) of h [T, d] (gate, up: [T, l.gate.n] scratch).
  void mlp(const DecoderLayer& l, int64_t t, const float* h, float* out, float* gate, float* up) const;
  // out = the layer's mixture of experts of h [T, d], its shared expert's gated output added.
  void experts(const DecoderLayer& l, int64_t t, const float* h, float* out, float* gate, float* up) const;
  void logits(const TensorView& tokens, const TensorView& logits_rows, DecoderStep s, const TensorView& out) const;
};

void Decoder::State::logits(const TensorView& tokens, const TensorView& logits_rows, DecoderStep s,
                            const TensorView& out) const {
  const DecoderConfig& c = config;
  const DecoderEnds& e = ends;
  const int64_t d = c.d_model, vocab = e.embedding.shape[0];
  FLASHLM_CHECK(tokens.device.is_cpu() && tokens.dtype == DType::I64 && tokens.ndim == 1 && tokens.is_contiguous(),
                "tokens must be a contiguous int64 [T] on the CPU, got ", tokens.shape_string());
  const int64_t t = tokens.shape[0];
  const auto* ids = static_cast<const int64_t*>(tokens.data);
  for (int64_t i = 0; i < t; ++i)
    FLASHLM_CHECK(ids[i] >= 0 && ids[i] < vocab, "tokens[", i, "] = ", ids[i], " is outside the vocabulary [0, ",
                  vocab, ")");
  const TensorView& r = logits_rows;
  FLASHLM_CHECK(r.device.is_cpu() && r.dtype == DType::I64 && r.ndim == 1 && r.is_contiguous(),
                "logits_rows must be a contiguous int64 [R] on the CPU, got ", r.shape_string());
  const int64_t n_rows = r.shape[0];
  const auto* rows_at = static_cast<const int64_t*>(r.data);
  for (int64_t i = 0; i < n_rows; ++i)
    FLASHLM_CHECK(rows_at[i] >= 0 && rows_at[i] < t, "logits_rows[", i, "] = ", rows_at[i], " is not a row of the ", t,
                  " tokens");
  const bool head = e.head.weight.data != nullptr;
  const int64_t width = head ? e.head.n : d;
  FLASHLM_CHECK(out.device.is_cpu() && out.dtype == DType::F32 && out.ndim == 2 && out.shape[0] == n_rows &&
                out.shape[1] == width && out.is_contiguous() && (n_rows == 0 || out.data),
                "out must be a contiguous float32 [", n_rows, ", ", width, "], got ", out.shape_string());

  std::vector<float> x(static_cast<size_t>(t * d));
  const int64_t row_bytes = storage_bytes(e.embedding.dtype, d);
  for (int64_t i = 0; i < t; ++i) {
    const auto* row = static_cast<const uint8_t*>(e.embedding.data) + ids[i] * row_bytes;
    dequantize(TensorView::contiguous(const_cast<uint8_t*>(row), e.embedding.dtype, {d}),
               TensorView::contiguous(x.data() + i * d, DType::F32, {d}));
  }
  if (c.embedding_scale > 0.0) {  // gemma: times sqrt(d_model) rounded to f32, as the module path multiplies
    const float scale = static_cast<float>(c.embedding_scale);
    parallel_for(t * d, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) x[i] *= scale;
    });
  }
  s.x = rows(x.data(), t, d);
  forward(s);
  if (n_rows == 0) return;

  std::vector<float> picked(static_cast<size_t>(n_rows * d));
  for (int64_t i = 0; i < n_rows; ++i)
    std::copy(x.begin() + rows_at[i] * d, x.begin() + (rows_at[i] + 1) * d, picked.begin() + i * d);
  norm::RMSNormParams p;
  p.x = rows(picked.data(), n_rows, d);
  p.out = head ? p.x : out;
  p.weight = e.final_norm;
  p.eps = c.norm_eps;
  norm::rms_norm(p);
  if (head) {
    const MatmulPart h = part(e.head, static_cast<float*>(out.data));
    matmul(picked.data(), n_rows, d, &h, 1);
  }
}

void Decoder::State::mlp(const DecoderLayer& l, int64_t t, const float* h, float* out, float* gate,
                          float* up) const {
  const int64_t d = config.d_model, ff = l.gate.n;
  const MatmulPart gate_up[2] = {part(l.gate, gate), part(l.up, up)};
  // gate = act(gate) * up on `count` values of a row (the module path's rounding: SwiGLU is silu_mul's; GeGLU the
  // gelu kernel's f32 values, then one f32 product with up).
  const auto activate = [&](float* g, const float* u, int64_t count) {
    const TensorView g_row = rows(g, 1, count), u_row = rows(const_cast<float*>(u), 1, count);
    if (config.activation == MlpActivation::SiLU) {
      activation::silu_mul(g_row, u_row, g_row);
    } else {
      activation::gelu_tanh(g_row, g_row);
      for (int64_t i = 0; i < count; ++i) g[i] *= u[i];
    }
  };
  if (ff % kActivationRows == 0) {
    // gate, up and the activation as one job: each thread activates the rows it has just computed, so the
    // activation takes no hand-off of its own (and runs on both threads, not on the caller alone).
    for (int64_t r0 = 0; r0 < t; r0 += kChunkRows) {
      const int64_t r1 = std::min(t, r0 + kChunkRows);
      MatmulPart chunk[2] = {gate_up[0], gate_up[1]};
      for (MatmulPart& p : chunk) p.y += r0 * ff;
      gemm::detail::gguf_matmul_aligned_f32(h + r0 * d, r1 - r0, d, chunk, 2, kActivationRows, [&](int64_t n0, int64_t n1) {
        for (int64_t i = r0; i < r1; ++i) activate(gate + i * ff + n0, up + i * ff + n0, n1 - n0);
      });
    }
  } else {
    matmul(h, t, d, gate_up, 2);
    activate(gate, up, t * ff);
  }
  const MatmulPart down = part(l.down, out);
  matmul(gate, t, ff, &down, 1);
}

void Decoder::State::experts(const DecoderLayer& l, int64_t t, const float* h, float* out, float* gate,
                             float* up) const {
  const DecoderMoe& m = l.moe;
  const int64_t d = config.d_model, e = m.gate.num_experts, k = m.top_k;
  std::vector<float> logits(static_cast<size_t>(t * e)), weights(static_cast<size_t>(t * k));
  std::vector<int32_t> chosen(static_cast<size_t>(t * k));
  if (present(m.router)) {
    const MatmulPart router = part(m.router, logits.data());
    matmul(h, t, d, &router, 1);
  } else {
    f64_rows(h, t, d, static_cast<const float*>(m.router_f32.data), e, logits.data(), [](double z) { return z; });
  }
  const TensorView weight_rows = TensorView::contiguous(weights.data(), DType::F32, {t, k});
  const TensorView expert_rows = TensorView::contiguous(chosen.data(), DType::I32, {t, k});
  moe_route(rows(logits.data(), t, e), k, /*softmax_first=*/true, m.renormalize, weight_rows, expert_rows);
  const TensorView h_rows = rows(const_cast<float*>(h), t, d);
  moe_expert_ffn(h_rows, weight_rows, expert_rows, m.gate, m.up, m.down, MoeActivation::SiLU, rows(out, t, d));
  if (!m.shared_gate.data) return;
  // out += sigmoid(h . w) * shared(h), the product and the sum each rounded to f32 as torch's ops round them;
  // the gate in f64 (its dot product and sigmoid), rounded once, as flashlm.models.moe computes it.
  std::vector<float> shared(static_cast<size_t>(t * d)), gates(static_cast<size_t>(t));
  mlp(l, t, h, shared.data(), gate, up);
  f64_rows(h, t, d, static_cast<const float*>(m.shared_gate.data), 1, gates.data(),
           [](double z) { return 1.0 / (1.0 + std::exp(-z)); });
  parallel_for(t, std::max<int64_t>(1, (1 << 14) / d), [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i) {
      const float g = gates[i];
      for (int64_t c = 0; c < d; ++c) {
        const float gated = g * shared[i * d + c];
        out[i * d + c] = out[i * d + c] + gated;
      }
    }
  });
}

void Decoder::State::forward(const DecoderStep& s) const {
  const DecoderConfig& c = config;
  detail::check_step(c, layers, s);
  const int64_t t = s.x.shape[0], d = c.d_model, hd = c.head_dim;
  const int64_t qd = c.n_head * hd, kvd = c.n_kv_head * hd, ff = widest_mlp(layers);
  if (t == 0 || layers.empty()) return;

  std::vector<float> scratch(static_cast<size_t>(t * (2 * d + 2 * qd + 2 * kvd + 2 * ff)));
  float* h = scratch.data();    // [T, d]: normed input of attention / MLP, then a sublayer's output
  float* out = h + t * d;       // [T, d]: a sublayer's output, added to x by the next norm
  float* q = out + t * d;       // [T, qd]
  float* att = q + t * qd;      // [T, qd]
  float* k = att + t * qd;      // [T, kvd]
  float* v = k + t * kvd;       // [T, kvd]
  float* gate = v + t * kvd;    // [T, ff]
  float* up = gate + t * ff;    // [T, ff]
  // With a bf16 cache, K, V and q go to it and attention comes back through bf16 copies, rounded as the module
  // path's .to() calls round them.
  const DType kv_dtype = s.k_caches[0].dtype;
  const bool bf16 = kv_dtype == DType::BF16;
  std::vector<uint16_t> half(bf16 ? static_cast<size_t>(t * (2 * kvd + 2 * qd)) : 0);
  void* const kc = bf16 ? static_cast<void*>(half.data()) : k;
  void* const vc = bf16 ? static_cast<void*>(half.data() + t * kvd) : v;
  void* const qc = bf16 ? static_cast<void*>(half.data() + 2 * t * kvd) : q;
  void* const ac = bf16 ? static_cast<void*>(half.data() + 2 * t * kvd + t * qd) : att;
  auto* x = static_cast<float*>(s.x.data);
  const auto* positions = static_cast<const int64_t*>(s.positions.data);
  const auto* cos = static_cast<const float*>(s.rope_cos.data);
  const auto* sin = static_cast<const float*>(s.rope_sin.data);
  const TensorView x_rows = rows(x, t, d), h_rows = rows(h, t, d), out_rows = rows(out, t, d);

  // out holds the last sublayer's output, not yet added to x (the norm that follows adds it).
  bool pending = false;
  auto norm_into_h = [&](const TensorView& weight) {
    norm::RMSNormParams p;
    p.weight = weight;
    p.eps = c.norm_eps;
    p.out = h_rows;
    if (pending) {
      p.x = out_rows;
      p.residual = x_rows;  // x += out, then h = norm(x)
    } else {
      p.x = x_rows;
    }
    norm::rms_norm(p);
    pending = false;
  };

  // gemma: a sublayer's output normed before it is added (absent weight: nothing)
  auto norm_in_place = [&](const TensorView& weight) {
    if (!weight.data) return;
    norm::RMSNormParams p;
    p.x = p.out = out_rows;
    p.weight = weight;
    p.eps = c.norm_eps;
    norm::rms_norm(p);
  };
  const float softmax_scale = static_cast<float>(
      c.softmax_scale > 0.0 ? c.softmax_scale : 1.0 / std::sqrt(static_cast<double>(hd)));  // as flashlm.ops rounds it
  const float softcap = static_cast<float>(c.attn_softcap);

  for (size_t i = 0; i < layers.size(); ++i) {
    const DecoderLayer& l = layers[i];
    norm_into_h(l.attn_norm);
    const MatmulPart qkv[3] = {part(l.q, q), part(l.k, k), part(l.v, v)};
    matmul(h, t, d, qkv, 3);
    if (l.q_norm.data) {  // qwen3: each head's row normed in place
      for (const auto& [qk, heads, weight] :
           {std::tuple(q, c.n_head, &l.q_norm), std::tuple(k, c.n_kv_head, &l.k_norm)}) {
        norm::RMSNormParams p;
        p.x = p.out = rows(qk, t * heads, hd);
        p.weight = *weight;
        p.eps = c.norm_eps;
        norm::rms_norm(p);
      }
    }
    const float* lc = l.local_rope ? static_cast<const float*>(s.rope_local_cos.data) : cos;
    const float* ls = l.local_rope ? static_cast<const float*>(s.rope_local_sin.data) : sin;
    rotate(q, t, c.n_head, hd, positions, lc, ls);
    rotate(k, t, c.n_kv_head, hd, positions, lc, ls);

    if (bf16) {
      convert(k, DType::F32, kc, kv_dtype, t * kvd);
      convert(v, DType::F32, vc, kv_dtype, t * kvd);
      convert(q, DType::F32, qc, kv_dtype, t * qd);
    }
    KVCacheWriteParams w;
    w.key = TensorView::contiguous(kc, kv_dtype, {t, c.n_kv_head, hd});
    w.value = TensorView::contiguous(vc, kv_dtype, {t, c.n_kv_head, hd});
    w.k_cache = s.k_caches[i];
    w.v_cache = s.v_caches[i];
    w.slot_mapping = s.slot_mapping;
    write_kv_cache(w);

    PagedAttentionParams a;
    a.q = TensorView::contiguous(qc, kv_dtype, {t, c.n_head, hd});
    a.out = TensorView::contiguous(ac, kv_dtype, {t, c.n_head, hd});
    a.k_cache = s.k_caches[i];
    a.v_cache = s.v_caches[i];
    a.block_table = s.block_table;
    a.seq_lens = s.seq_lens;
    a.cu_seqlens_q = s.cu_seqlens_q;
    a.max_seqlen_q = s.max_seqlen_q;
    a.options.softmax_scale = softmax_scale;
    a.options.softcap = softcap;
    a.options.causal = true;
    if (l.window > 0) a.options.window_left = l.window - 1;  // the query itself and window - 1 keys before it
    paged_attention(a);
    if (bf16) convert(ac, kv_dtype, att, DType::F32, t * qd);

    const MatmulPart o = part(l.o, out);
    matmul(att, t, qd, &o, 1);
    norm_in_place(l.post_attn_norm);
    pending = true;
    norm_into_h(l.mlp_norm);

    if (l.moe.top_k > 0) experts(l, t, h, out, gate, up);
    else mlp(l, t, h, out, gate, up);
    norm_in_place(l.post_mlp_norm);
    pending = true;
  }
  // The last MLP's output.
  parallel_for(t * d, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) x[i] += out[i];
  });
}

Decoder::Decoder(const DecoderConfig& config, std::vector<DecoderLayer> layers) : state_(std::make_unique<State>()) {
  detail::check_layers(config, layers);
  state_->config = config;
  state_->layers = std::move(layers);
  for (const DecoderLayer& l : state_->layers)
    for (const QuantLinear* q : linears(l)) state_->pack(*q);
}

Decoder::~Decoder() = default;
Decoder::Decoder(Decoder&&) noexcept = default;
Decoder& Decoder::operator=(Decoder&&) noexcept = default;

void Decoder::set_ends(const DecoderEnds& ends) {
  detail::check_ends(state_->config, ends);
  State& s = *state_;
  // The previous head's regrouped copy goes with it, unless a layer reads the same weight (copies are keyed
  // by the weight's data).
  const void* old_head = s.has_ends ? s.ends.head.weight.data : nullptr;
  if (ends.head.weight.data) s.pack(ends.head);
  if (old_head && old_head != ends.head.weight.data) {
    bool shared = false;
    for (const DecoderLayer& l : s.layers)
      for (const QuantLinear* q : linears(l)) shared = shared || q->weight.data == old_head;
    if (!shared) s.packed.erase(old_head);
  }
  s.ends = ends;
  s.has_ends = true;
}

bool Decoder::has_ends() const { return state_->has_ends; }
bool Decoder::has_head() const { return state_->has_ends && state_->ends.head.weight.data != nullptr; }
int64_t Decoder::num_layers() const { return static_cast<int64_t>(state_->layers.size()); }

void Decoder::forward(const DecoderStep& step) const { state_->forward(step); }

void Decoder::logits(const TensorView& tokens, const TensorView& logits_rows, DecoderStep step,
                     const TensorView& out) const {
  FLASHLM_CHECK(state_->has_ends, "logits: this decoder has no embedding and final norm yet (set_ends)");
  state_->logits(tokens, logits_rows, std::move(step), out);
}

}  // namespace flashlm::runtime