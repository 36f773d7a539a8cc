// Shared by the CUDA paged-attention kernels (paged_decode_cuda.cu, paged_prefill_cuda.cu): K/V tile loads
// that gather a run of a sequence's tokens through its block table into padded shared memory, and the two
// launchers that paged_attention_cuda.cu routes to. Everything else (mma.sync, ldmatrix, cp.async, online
// softmax, masking) is the flash attention forward's (shared_cuda.cuh, shared_fwd_cuda.cuh).
#pragma once

#include "../attention/shared_fwd_cuda.cuh"
#include "paged_params.h"
#include "paged_tiles.h"

namespace flashlm::kvcache::cuda {

using attention::cuda::Elem;
using attention::cuda::kPad;

// One K/V head of one cache tensor.
template <class T>
struct PagedHead {
  const T* base;  // cache + kv_head * head_stride
  int64_t block_stride, row_stride;
};

template <class T>
__device__ __forceinline__ PagedHead<T> paged_head(const void* cache, int64_t block_stride, int64_t row_stride,
                                                   int64_t head_stride, int kv_head) {
  return {static_cast<const T*>(cache) + kv_head * head_stride, block_stride, row_stride};
}

// Copies the tokens [j0 + first, j0 + rows) of a sequence (columns [0, d)) of kTensors cache heads (K, or K
// and V: their rows share the slots) into smem tiles [kRows][kHeadDim + kPad], zero-filling the rest of each
// kRows x kHeadDim tile (rows before `first` too: tokens no query of the tile sees, whose V must not reach
// the output through 0 * NaN), like attention::cuda::load_tile but with each row's address looked up through the
// block table (a tile may span any number of blocks). kThreads threads take part, `tid` being this one's
// index among them. `aligned`: the caches and their strides allow 16-byte cp.async (see load_chunk).
// kUnroll: how far to unroll the chunk loop (unrolled, the table reads of several rows are in flight at
// once; the prefill kernel keeps 1 for the same register reasons as load_tile). Issues no commit.
template <int kRows, int kHeadDim, int kThreads, int kUnroll, int kTensors, class T>
__device__ __forceinline__ void load_paged_tiles(T* const (&smem)[kTensors], const PagedHead<T> (&heads)[kTensors],
                                                 const int32_t* table, const tiles::CacheShape& shape, int64_t j0,
                                                 int first, int rows, int d, bool aligned, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "tile chunks must spread evenly over the threads");
#pragma unroll kUnroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + tid;
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool pred = r >= first && r < rows && c < d;
    tiles::Slot slot{0, 0};
    if (pred) slot = tiles::token_slot(table, j0 + r, shape);
#pragma unroll
    for (int x = 0; x < kTensors; ++x) {
      // Any valid address when !pred: nothing is read then.
      const T* src = pred ? heads[x].base + slot.block * heads[x].block_stride + slot.offset * heads[x].row_stride + c
                          : heads[x].base;
      attention::cuda::load_chunk(smem[x] + r * (kHeadDim + kPad) + c, src, pred, aligned);
    }
  }
}

__device__ __forceinline__ tiles::CacheShape cache_shape(const PagedParams& p) {
  return {p.num_blocks, p.max_blocks_per_seq, p.block_size};
}

// The launchers. `aligned`: q, out and both caches start on 16-byte boundaries and all their strides are
// multiples of 8 elements (16-byte cp.async for every tile, 4-byte stores of output pairs).
void paged_decode_cuda(const PagedParams& p, bool aligned, cudaStream_t stream);
void paged_prefill_cuda(const PagedParams& p, bool aligned, cudaStream_t stream);

}  // namespace flashlm::kvcache::cuda
