// Exact attention that never materialises the Sq x Sk score matrix (FlashAttention), forward and backward,
// on the CPU (f32, bf16) and on CUDA (f16, bf16).
//
// Layout (the flash-attn convention): padded batches have q/out [B, Sq, H, D] and k/v [B, Sk, Hkv, D];
// packed variable-length batches have q/out [total_q, H, D] and k/v [total_k, Hkv, D] with int32
// cu_seqlens_q/k [B + 1] (cumulative lengths, on the tensors' device). H % Hkv == 0 (GQA/MQA). The last
// dimension must be contiguous; the other strides are free. The row logsumexp `lse` is f32 and contiguous,
// [B, H, Sq] for padded batches and [H, total_q] for packed ones. Rows of a packed batch outside every
// sequence (before cu_seqlens[0], from cu_seqlens[B] on) are not written, nor are their gradients (flashlm.ops
// sets them as rows that see no key: out 0, lse +inf, gradients 0).
//
// Masking: query i of a sequence with Sq queries and Sk keys sits at key position i + Sk - Sq (bottom-right
// alignment) and sees key j when  i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right, a negative
// window side being unbounded. causal is window_right = 0. A row that sees no key gets out = 0 and
// lse = +inf (its gradients are 0).
//
// Scores: s = scale * q.k, or with softcap > 0, s = softcap * tanh(scale * q.k / softcap). With ALiBi slopes
// (f32 [heads] or [batch, heads], contiguous, on q's device), query i of a sequence and key
// j gain -slope[b, h] * |i + Sk - Sq - j| after that, causal or not (flash-attn's bias).
//
// NaN and inf propagate as through softmax(s) . V: a NaN score (a NaN in q or in a key the row sees) makes
// the row's out and lse NaN, a +inf score makes out NaN and lse +inf, only -inf scores give out NaN and lse
// -inf, and a NaN or inf in a visible V row reaches out in its column. What a row does not see never reaches
// it. The backward pass gives a row whose out is NaN NaN gradients (dq, and dk and dv of the keys it sees).
#pragma once

#include <cstdint>

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

struct AttentionOptions {
  float softmax_scale = 0.f;  // > 0; flash-attn's default is 1/sqrt(D)
  bool causal = false;
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded (causal forces 0)
  float softcap = 0.f;        // 0: off
  int version = 2;            // 1: FlashAttention-1 loop order (K/V outer); 2: FlashAttention-2 (Q outer)
  // Dropout on P (flash-attn's): in [0, 1), 0 is off. Element (b, h, row, col) of P (row and col counted from
  // each sequence's start) is kept, and scaled by 1 / (1 - dropout_p), by a Philox4x32-10 draw of (philox_seed,
  // philox_offset + b * heads + h, row, col) alone: every kernel, and the backward pass given the forward's
  // seed and offset, draws the same mask (flash_attention_dropout_mask writes it). The lse is P's before
  // dropout, as flash-attn's.
  float dropout_p = 0.f;
  uint64_t philox_seed = 0, philox_offset = 0;
};

struct AttentionForwardParams {
  TensorView q, k, v;  // inputs
  TensorView out;      // output, same shape and dtype as q
  TensorView lse;      // output, f32
  // Packed variable-length batch when cu_seqlens_q.data is set (then cu_seqlens_k must be too).
  TensorView cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;  // packed batches only: the longest sequence
  AttentionOptions options;
  TensorView alibi_slopes;  // optional (data == nullptr and ndim == 0: none)
};

struct AttentionBackwardParams {
  TensorView dout, q, k, v, out, lse;  // dout: the gradient of out; out and lse from the forward pass
  TensorView dq, dk, dv;               // outputs, shaped and typed as q, k, v
  TensorView delta;                    // output (scratch), f32, shaped as lse: rowsum(dout * out)
  TensorView cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  AttentionOptions options;            // as in the forward pass (version is ignored: the backward is v2)
  TensorView alibi_slopes;             // as in the forward pass
};

// CPU work runs on the library's thread pool; CUDA work is queued on `stream` (a cudaStream_t).
FLASHLM_API void flash_attention_forward(const AttentionForwardParams& params, void* stream = nullptr);
FLASHLM_API void flash_attention_backward(const AttentionBackwardParams& params, void* stream = nullptr);

// The dropout mask a forward pass with these options keeps: mask (U8 [batch, heads, seqlen_q, seqlen_k], CPU,
// contiguous) gets 1 where element (b, h, row, col) of P is kept and 0 where it is dropped. Rows and columns
// are each sequence's own, so it serves padded and packed batches alike (beyond a sequence's lengths it is
// the draw of positions no query sees).
FLASHLM_API void flash_attention_dropout_mask(const TensorView& mask, float dropout_p, uint64_t philox_seed,
                                              uint64_t philox_offset);

// Whether the CPU kernels may use their AVX-512 build where the CPU has AVX-512F (on by default; off: the AVX2
// kernels, which give the same bits). Returns the previous setting.
FLASHLM_API bool set_attention_avx512(bool allowed);

// The head dimensions the CUDA kernels take (others raise): every multiple of 8 up to 256.
FLASHLM_API bool flash_attention_cuda_supports_head_dim(int64_t head_dim);

}  // namespace flashlm
