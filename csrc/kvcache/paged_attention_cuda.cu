// The CUDA entry point of paged attention: makes the device current, decides whether every tile can move in
// 16-byte copies, and routes to the decode kernels (one query per sequence, paged_decode_cuda.cu) or the
// prefill kernel (packed queries, paged_prefill_cuda.cu). The dispatcher (paged_attention.cpp) has checked
// the arguments; what lives in device memory (block tables, seq_lens, cu_seqlens_q) is clamped by the
// kernels themselves (paged_tiles.h).
#include "../core/cuda_guard.h"
#include "paged_cuda_common.cuh"
#include "paged_kernels.h"

namespace flashlm::kvcache {

void paged_attention_cuda(const PagedParams& p, int device, void* stream) {
  if (p.num_seqs <= 0 || p.num_tokens <= 0 || p.heads <= 0) return;
  FLASHLM_CHECK(p.kv_heads > 0 && p.heads % p.kv_heads == 0, "paged_attention: heads (", p.heads,
                ") must be a multiple of kv_heads (", p.kv_heads, ")");
  FLASHLM_CHECK(p.head_dim > 0 && p.head_dim % 8 == 0 && p.head_dim <= 256,
                "paged_attention: CUDA takes head_dim a multiple of 8 up to 256, not ", p.head_dim);
  FLASHLM_CHECK(p.block_size >= 1, "paged_attention: block_size must be >= 1, not ", p.block_size);
  if (p.decode()) {
    FLASHLM_CHECK(p.num_splits >= 1, "paged_attention: num_splits must be >= 1, not ", p.num_splits);
    FLASHLM_CHECK(p.num_tokens == p.num_seqs, "paged_attention: decode takes one query per sequence (q has ",
                  p.num_tokens, " rows for ", p.num_seqs, " sequences)");
  } else if (p.max_seqlen_q <= 0) {
    return;  // no sequence has a query
  }
  CudaDeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  using attention::cuda::vector_ok;
  const bool aligned = vector_ok(p.q, 0, p.q_row_stride, p.q_head_stride) &&
                       vector_ok(p.out, 0, p.o_row_stride, p.o_head_stride) &&
                       vector_ok(p.k_cache, p.kc_block_stride, p.kc_row_stride, p.kc_head_stride) &&
                       vector_ok(p.v_cache, p.vc_block_stride, p.vc_row_stride, p.vc_head_stride);
  if (p.decode()) cuda::paged_decode_cuda(p, aligned, s);
  else cuda::paged_prefill_cuda(p, aligned, s);
}

}  // namespace flashlm::kvcache
