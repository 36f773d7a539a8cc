// The plain parameter structs of the paged KV-cache kernels (CPU and CUDA), filled by the dispatcher
// (paged_attention.cpp) after it has checked the views. Strides count elements.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::kvcache {

struct WriteParams {
  DType dtype = DType::F32;
  int64_t num_tokens = 0;
  int kv_heads = 0, head_dim = 0, block_size = 0;
  int64_t num_blocks = 0;
  const void* key = nullptr;
  const void* value = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* slot_mapping = nullptr;
  // key/value element (t, h, d) at t * row_stride + h * head_stride + d.
  int64_t key_row_stride = 0, key_head_stride = 0, value_row_stride = 0, value_head_stride = 0;
  // cache element (block, offset, h, d) at block * block_stride + offset * row_stride + h * head_stride + d.
  int64_t kc_block_stride = 0, kc_row_stride = 0, kc_head_stride = 0;
  int64_t vc_block_stride = 0, vc_row_stride = 0, vc_head_stride = 0;
};

struct PagedParams {
  DType dtype = DType::F32;  // of q, out and the caches
  int num_seqs = 0, heads = 0, kv_heads = 0, head_dim = 0, block_size = 0;
  int64_t num_tokens = 0;     // rows of q
  int64_t num_blocks = 0;     // of the caches (CUDA kernels clamp block ids to it)
  int64_t max_seqlen_q = 1;
  int64_t max_seq_len = 0;    // an upper bound of seq_lens (the dispatcher's; max_blocks_per_seq * block_size)
  int64_t max_blocks_per_seq = 0;

  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* out = nullptr;
  float* lse = nullptr;                 // optional: row i of head h at lse[h * num_tokens + i]
  const int32_t* block_table = nullptr; // row s at block_table + s * block_table_stride
  int64_t block_table_stride = 0;
  const int32_t* seq_lens = nullptr;
  const int32_t* cu_seqlens_q = nullptr;  // nullptr: decode, query s is row s

  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t o_row_stride = 0, o_head_stride = 0;
  int64_t kc_block_stride = 0, kc_row_stride = 0, kc_head_stride = 0;
  int64_t vc_block_stride = 0, vc_row_stride = 0, vc_head_stride = 0;

  float scale = 1.f;
  float softcap = 0.f;
  // ALiBi: the score of query i of sequence s and context token t gains -slope * |pos(i) - t| (pos(i) =
  // seq_len - q_len + i), slope being alibi_slopes[s * alibi_batch_stride + h] (f32); nullptr: no bias.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;  // 0: one slope row for all sequences
  int64_t window_left = -1, window_right = -1;  // causal folded in as window_right = 0
  bool causal = false;
  int num_splits = 1;  // decode: context parts merged by lse (>= 1)

  bool decode() const { return cu_seqlens_q == nullptr; }
  int group() const { return heads / kv_heads; }
};

}  // namespace flashlm::kvcache
