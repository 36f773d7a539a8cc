// CUDA paged attention for prefill (and chunked prefill): the packed queries of each sequence's new tokens
// attend to the sequence's whole paged context, bottom-right aligned (query i of a sequence with q_len
// queries sits at position seq_len - q_len + i).
//
// The flash attention forward's query-tile loop (forward_q_tile, FlashAttention-2 order, tensor cores) with
// one change: K and V tiles are gathered row by row through the block table (load_paged_tiles), since a tile
// of kBlockN keys may span several blocks and block boundaries fall anywhere. Same tile configurations
// (FwdConfigFor), pipeline, masking and online softmax; a CTA per (query tile, head, sequence), so the CTAs
// of a GQA group each read the K/V tiles (from L2 after the first).
#include "paged_cuda_common.cuh"

namespace flashlm::kvcache::cuda {
namespace {

using namespace attention::cuda;

template <class Cfg, bool kBf16>
__global__ void __launch_bounds__(Cfg::kThreads) paged_prefill_kernel(const PagedParams p, bool aligned) {
  using T = Elem<kBf16>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  // Short chunk loops (d = 32: 2 chunks per thread) unrolled, longer ones not (registers, see load_tile).
  constexpr int kLoadIters = kBlockN * Cfg::kHeadDim / 8 / Cfg::kThreads;
  constexpr int kLoadUnroll = kLoadIters <= 2 ? kLoadIters : 1;
  extern __shared__ __align__(16) unsigned char smem[];

  const int head = blockIdx.y, s = blockIdx.z;
  const tiles::QueryRows qr = tiles::query_rows(p.cu_seqlens_q, s, p.num_tokens, p.max_seqlen_q);
  const int64_t i0 = int64_t(blockIdx.x) * kBlockM;
  if (i0 >= qr.sq) return;
  const int rows = int(tiles::min64(qr.sq - i0, kBlockM));
  const tiles::CacheShape shape = cache_shape(p);
  const int64_t sk = tiles::context_len(p.seq_lens[s], p.max_seq_len, shape);
  const int kvh = head / (p.heads / p.kv_heads);
  const int d = p.head_dim;

  const int32_t* table = p.block_table + s * p.block_table_stride;
  const PagedHead<T> k = paged_head<T>(p.k_cache, p.kc_block_stride, p.kc_row_stride, p.kc_head_stride, kvh);
  const PagedHead<T> v = paged_head<T>(p.v_cache, p.vc_block_stride, p.vc_row_stride, p.vc_head_stride, kvh);
  auto gather = [&](T* dst, const PagedHead<T>& src, int64_t j0) {
    T* const dsts[1] = {dst};
    const PagedHead<T> srcs[1] = {src};
    load_paged_tiles<kBlockN, Cfg::kHeadDim, Cfg::kThreads, kLoadUnroll>(
        dsts, srcs, table, shape, j0, 0, int(tiles::min64(sk - j0, kBlockN)), d, aligned, int(threadIdx.x));
  };
  const T* q = static_cast<const T*>(p.q) + (qr.q0 + i0) * p.q_row_stride + head * p.q_head_stride;
  T* out = static_cast<T*>(p.out) + (qr.q0 + i0) * p.o_row_stride + head * p.o_head_stride;
  float* lse = p.lse != nullptr ? p.lse + head * p.num_tokens + qr.q0 + i0 : nullptr;
  ScoreMap score_map(p.scale, p.softcap);
  if (p.alibi_slopes != nullptr) score_map.alibi2 = p.alibi_slopes[s * p.alibi_batch_stride + head] * kLog2e;
  forward_q_tile<Cfg, kBf16>(smem, q, p.q_row_stride, out, p.o_row_stride, lse,
                             tiles::Band{qr.sq, sk, p.window_left, p.window_right}, i0, rows, d,
                             score_map, aligned, [&](T* dst, int64_t j0) { gather(dst, k, j0); },
                             [&](T* dst, int64_t j0) { gather(dst, v, j0); });
}

template <class Cfg, bool kBf16>
void launch_prefill(const PagedParams& p, bool aligned, cudaStream_t stream) {
  auto kernel = paged_prefill_kernel<Cfg, kBf16>;
  set_smem(kernel, Cfg::kSmemBytes);
  const dim3 grid =
      make_grid(tiles::ceil_div(p.max_seqlen_q, Cfg::kBlockM), p.heads, p.num_seqs, "paged attention prefill");
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, aligned);
  check_cuda(cudaGetLastError(), "paged prefill kernel launch");
}

}  // namespace

void paged_prefill_cuda(const PagedParams& p, bool aligned, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto bf16) {
    dispatch_head_dim<32, 64, 96, 128, 192, 256>(p.head_dim, [&](auto dim) {
      launch_prefill<FwdConfigFor<decltype(dim)::value>, decltype(bf16)::value>(p, aligned, stream);
    });
  });
}

}  // namespace flashlm::kvcache::cuda
