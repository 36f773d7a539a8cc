// The one plain parameter struct of the attention kernels (CPU and CUDA), filled by the dispatcher
// (flash_attention.cpp) after it has checked the views. Strides count elements.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"
#include "shared_dropout.h"

namespace flashlm::attention {

struct Params {
  DType dtype = DType::F32;  // of q, k, v, out (and dout, dq, dk, dv)
  int batch = 0, heads = 0, kv_heads = 0, head_dim = 0;
  // Padded batches: every sequence has seqlen_q queries and seqlen_k keys. Packed batches (cu_seqlens_q
  // set; device pointers on CUDA): sequence b has rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and the
  // seqlens are the longest sequence's.
  int64_t seqlen_q = 0, seqlen_k = 0;
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;  // rows of the packed q and k tensors (CUDA kernels clamp to them)

  // Forward.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // row i of (b, h): lse[b * lse_batch_stride + h * lse_head_stride + row0 + i]
  // Backward (dout is read; delta is written, laid out as lse).
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* delta = nullptr;

  // Element (b, row, h, d) of q is q[b * q_batch_stride + row * q_row_stride + h * q_head_stride + d];
  // packed batches have batch strides of 0 and rows counted from the start of the packed tensor.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  float scale = 1.f;  // softmax scale
  float softcap = 0.f;
  // ALiBi: the score of query i and key j (after the softcap) gains -slope * |i + Sk - Sq - j|, slope being
  // alibi_slopes[b * alibi_batch_stride + h] (f32, on the tensors' device); nullptr: no bias.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;  // 0: one slope row for all sequences
  // Key j is visible to query i when i + (Sk - Sq) - window_left <= j <= i + (Sk - Sq) + window_right,
  // a negative side being unbounded. causal has been folded in as window_right = 0 (and kept as a flag
  // for block skipping).
  int64_t window_left = -1, window_right = -1;
  bool causal = false;
  int version = 2;
  // Dropout (flash_attn_func and its variants; never paged attention): element (b, h, row, col) of P is kept
  // with probability 1 - dropout_p and then scaled by 1 / (1 - dropout_p), as shared_dropout.h draws it from
  // (philox_seed, philox_offset); 0 is off. rng holds what the kernels draw from, filled by the dispatcher.
  float dropout_p = 0.f;
  uint64_t philox_seed = 0, philox_offset = 0;
  dropout::Rng rng;

  bool packed() const { return cu_seqlens_q != nullptr; }
  int group() const { return heads / kv_heads; }  // query heads per K/V head
  bool dropout() const { return dropout_p > 0.f; }
};

}  // namespace flashlm::attention
