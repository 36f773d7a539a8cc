// The paged KV cache (vLLM's layout) and attention over it, on the CPU (f32, bf16) and on CUDA (f16, bf16).
//
// Layout: per layer, k_cache and v_cache are [num_blocks, block_size, kv_heads, head_dim] (any block_size
// >= 1; the last dimension contiguous, the other strides free). Token t of sequence s lives in physical
// block block_table[s, t / block_size] at offset t % block_size; seq_lens[s] is the sequence's length in
// tokens, the new ones included. block_table is int32 [num_seqs, max_blocks_per_seq] (only the first
// ceil(seq_lens[s] / block_size) entries of a row are read); seq_lens is int32 [num_seqs].
//
// Queries are the new tokens of each sequence, packed: q and out are [num_tokens, heads, head_dim] with
// int32 cu_seqlens_q [num_seqs + 1]. Without cu_seqlens_q every sequence has exactly one query (decode):
// q is [num_seqs, heads, head_dim]. Sequence s's q_len queries sit at its last q_len positions
// (bottom-right alignment, as in flash_attention.h), so a causal prefill chunk sees the cached prefix and
// itself. A sequence may have more queries than tokens (seq_lens[s] < q_len), as in flash attention: query
// i sits at position seq_lens[s] - q_len + i, and under causal the first q_len - seq_lens[s] see no key. Masking, softcap, the lse convention (f32 [heads, num_tokens]; +inf for a row that sees no
// key, whose out is 0) and how NaN and inf propagate are those of flash_attention.h; cache slots a query does
// not read (past seq_lens, blocks of other sequences, keys outside its window) never reach it, whatever
// they hold. Rows of q past cu_seqlens_q[num_seqs] belong to no
// sequence; their out and lse are not written. On the CPU, seq_lens, the block ids they reach and
// cu_seqlens_q are checked (ValueError); CUDA kernels clamp them instead.
#pragma once

#include <cstdint>

#include "flashlm/attention/flash_attention.h"
#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

struct KVCacheWriteParams {
  TensorView key, value;         // [num_tokens, kv_heads, head_dim], the cache's dtype
  TensorView k_cache, v_cache;   // [num_blocks, block_size, kv_heads, head_dim], written in place
  TensorView slot_mapping;       // int64 [num_tokens]: block * block_size + offset; -1 skips the token
};

// Scatters each token's K and V into its slot. Slots outside the cache raise on the CPU; CUDA kernels skip them.
// Two tokens given one slot: one of them is written (which is unspecified).
FLASHLM_API void write_kv_cache(const KVCacheWriteParams& params, void* stream = nullptr);

struct PagedAttentionParams {
  TensorView q;                  // [num_tokens, heads, head_dim]
  TensorView k_cache, v_cache;   // [num_blocks, block_size, kv_heads, head_dim]
  TensorView block_table;        // int32 [num_seqs, max_blocks_per_seq]
  TensorView seq_lens;           // int32 [num_seqs]
  TensorView cu_seqlens_q;       // int32 [num_seqs + 1]; empty: one query per sequence (decode)
  int64_t max_seqlen_q = 0;      // with cu_seqlens_q: the most queries of any sequence
  TensorView out;                // output, shaped and typed as q
  TensorView lse;                // optional output, f32 [heads, num_tokens]
  AttentionOptions options;      // version is ignored
  TensorView alibi_slopes;       // optional f32 [heads] or [num_seqs, heads], as flash_attention.h's
  // Decode only: split each sequence's context into this many parts, attended in parallel and merged by
  // their lse (flash-decoding). 0 lets the library choose (see paged_attention_num_splits).
  int num_splits = 0;
};

FLASHLM_API void paged_attention(const PagedAttentionParams& params, void* stream = nullptr);

// The split count the library picks for a decode batch on `device_type` (0 CPU, 1 CUDA).
FLASHLM_API int paged_attention_num_splits(int device_type, int64_t num_seqs, int64_t kv_heads, int64_t max_seq_len,
                                           int64_t block_size);

}  // namespace flashlm
