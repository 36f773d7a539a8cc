// The decoder layers of a Llama-family model (llama, qwen2, qwen3, mistral, phi3 and the mixture-of-experts
// mixtral, qwen2_moe, qwen3_moe: RMSNorm, rotary attention with grouped KV heads over the paged cache, a SwiGLU
// MLP or experts) run for one serving step on the CPU in a single call, with the linear weights kept in their
// GGML blocks. It is what Python's per-layer loop does op by op, without the
// ~10 us of interpreter and binding work around each of the dozen kernels of a layer, which at decode
// sizes is more than the kernels' own time.
//
// Per layer, on the residual stream x [T, d] (f32):
//   h = rms_norm(x); q, k, v = h @ Wq.T (+ bq), ...; (qwen3) each head of q and k rms-normed;
//   rotate q and k (rotate-half rope, HF's convention); write k, v into the layer's paged cache;
//   a = paged_attention(q) @ Wo.T (+ bo), each query seeing its layer's window of keys (mistral)
//   x += a; h = rms_norm(x); x += (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T
// or, in a mixture-of-experts layer, x += moe_expert_ffn(h, moe_route(h @ Wrouter.T)) (flashlm/moe/moe.h)
//   [+ sigmoid(h . w_shared_gate) * shared(h), shared a SwiGLU MLP: qwen2_moe's shared expert]
// Decoder::logits adds both ends: the embedding lookup before the layers, and after them the final norm and
// the output head on the rows whose next-token logits are wanted.
//
// Gemma 2 and 3 are the same stack with their options (DecoderConfig, DecoderLayer): embeddings scaled by
// sqrt(d_model), scores scaled by query_pre_attn_scalar^-1/2 and soft-capped (gemma2), a GeGLU MLP
// (gelu_tanh(h @ Wgate.T) * (h @ Wup.T)), each sublayer's output normed before it is added
// (x += post_attn_norm(a); x += post_mlp_norm(mlp)), and gemma3's local layers rotating by their own rope tables.
// Gemma's (1 + w) norm weights are the weights given (the loaders fold the 1 in). The final logits' soft cap is
// the caller's (a tanh rounded as torch rounds it).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "flashlm/core/dtype.h"
#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"
#include "flashlm/moe/moe.h"

namespace flashlm::runtime {

// y = x @ W.T (+ bias): W is n rows of k values in GGML blocks of `type` (a gguf_matmul type).
struct QuantLinear {
  TensorView weight;  // uint8, contiguous, n * row bytes
  DType type = DType::Q4_0;
  int64_t n = 0, k = 0;
  TensorView bias;    // optional f32 [n]; absent: null data
};

// A mixture-of-experts MLP: the router's top_k experts of each token (softmax over all experts first, as
// mixtral and qwen-moe route; renormalize: the k weights divided by their sum), their SwiGLU outputs summed
// with those weights.
struct DecoderMoe {
  QuantLinear router;            // [E, d] in GGML blocks; absent (null weight data): router_f32 instead
  TensorView router_f32;         // f32 [E, d]: a float router, its dot products summed in f64 and rounded once
                                 // (as flashlm.models.moe computes a float32 router, so the logits agree)
  ExpertWeights gate, up, down;  // [E, F, d], [E, F, d], [E, d, F]: float or GGML blocks, as moe_expert_ffn reads
  int64_t top_k = 0;             // 0: not a mixture-of-experts layer
  bool renormalize = true;
  TensorView shared_gate;        // f32 [d]: the shared expert's gate (qwen2_moe), sigmoid(h . w) in f64 rounded once;
                                 // absent (null data): no shared expert
};

struct DecoderLayer {
  TensorView attn_norm;  // f32 [d]
  QuantLinear q, k, v, o;
  TensorView mlp_norm;   // f32 [d]
  QuantLinear gate, up, down;  // the MLP; in a mixture-of-experts layer the shared expert (any width), or absent
                               // (null weight data) without one
  TensorView q_norm, k_norm;   // f32 [head_dim]: qwen3's per-head norms of q and k; absent: null data
  int64_t window = 0;          // keys a query sees, itself included (a sliding window); 0: every key before it
  DecoderMoe moe;
  TensorView post_attn_norm, post_mlp_norm;  // f32 [d]: gemma's norms of each sublayer's output; absent: null data
  bool local_rope = false;     // rotate by the step's rope_local tables (gemma3's local layers)
};

// The model's ends: the token embedding table, the final norm and (optionally) the output head.
struct DecoderEnds {
  TensorView embedding;  // [vocab, d_model] rows of any type flashlm::dequantize reads (a view of a block type,
                         // or F32/F16/BF16 values)
  TensorView final_norm;  // f32 [d]
  QuantLinear head;       // [vocab', d] in GGML blocks; absent (null weight data): decoder_logits returns the
                          // normed hidden rows and the caller applies its head
};

// The MLP's activation: SwiGLU (silu(gate) * up) or GeGLU (gelu_tanh(gate) * up, gemma's).
enum class MlpActivation : int { SiLU = 0, GeluTanh = 1 };

struct DecoderConfig {
  int64_t d_model = 0, n_head = 0, n_kv_head = 0, head_dim = 0, d_ff = 0;
  double norm_eps = 1e-6;
  double softmax_scale = 0.0;   // the scores' factor, rounded to f32 (as flashlm.ops passes it); 0: 1/sqrt(head_dim)
  double attn_softcap = 0.0;    // > 0: scores s become cap * tanh(s / cap) (gemma2); 0: off
  double embedding_scale = 0.0; // > 0: embedding rows times this, rounded to f32 first (gemma: sqrt(d_model)); 0: none
  MlpActivation activation = MlpActivation::SiLU;  // of the dense MLPs (a mixture of experts is SwiGLU)
};

// One step's tokens and where their K/V go (as flashlm.models.PagedBatch; see paged_attention.h).
struct DecoderStep {
  TensorView x;             // f32 [T, d]: embeddings in, the residual stream after the last layer out
  TensorView positions;     // int64 [T]: rows of the rope tables
  TensorView rope_cos, rope_sin;  // f32 [max_positions, head_dim]: cos/sin of position * inv_freq, both halves
  TensorView rope_local_cos, rope_local_sin;  // the same for layers with local_rope (gemma3); absent: null data
  std::vector<TensorView> k_caches, v_caches;  // per layer, [num_blocks, block_size, n_kv_head, head_dim], all f32
                                               // or all bf16 (then K, V and q are rounded to bf16 for attention)
  TensorView slot_mapping;  // int64 [T]
  TensorView block_table;   // int32 [S, max_blocks]
  TensorView seq_lens;      // int32 [S]
  TensorView cu_seqlens_q;  // int32 [S + 1] from 0 to T (every token is a query); absent: one token per sequence
  int64_t max_seqlen_q = 1;
};

// The stack itself: built once from views of the weights (their memory must outlive it), which it checks
// (ValueError naming the layer and tensor) and, for Q4_0 and Q8_0 matrices with K % 64 == 0 and Q4_K and Q6_K
// ones with K % 256 == 0, copies regrouped four rows at a time (their blocks interleaved, the scales side by
// side): the matmuls read
// the copies, a second copy of those weights in memory, and give the same bits as from the originals (a Q4_0
// decode runs ~1.1x faster, a prefill ~1.2x). Calls may run concurrently; each allocates its own scratch.
class FLASHLM_API Decoder {
 public:
  Decoder(const DecoderConfig& config, std::vector<DecoderLayer> layers);
  ~Decoder();
  Decoder(Decoder&&) noexcept;
  Decoder& operator=(Decoder&&) noexcept;

  // Checks `ends` against the config and takes them in place of any before; a failed check changes nothing.
  void set_ends(const DecoderEnds& ends);
  bool has_ends() const;
  bool has_head() const;
  int64_t num_layers() const;

  // Runs every layer on step.x in place. The step's views are checked (ValueError naming them).
  void forward(const DecoderStep& step) const;
  // One whole step (needs the ends): the embeddings of `tokens` (int64 [T], each in [0, vocab)) through every
  // layer, then the final norm and the head on rows `logits_rows` (int64 [R], each in [0, T)) into `out`: f32
  // [R, head rows], or f32 [R, d_model] (the normed rows) without a head. step.x is not read.
  void logits(const TensorView& tokens, const TensorView& logits_rows, DecoderStep step, const TensorView& out) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace flashlm::runtime
