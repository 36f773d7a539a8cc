// CUDA paged attention for decode: one query per sequence, attending to the sequence's cached context.
//
// A CTA owns (sequence, K/V head, up to 16 of the group's query heads, split). The group's queries form the
// 16 rows of one tensor-core m-tile, so every K/V row is read from HBM once for the whole GQA group (a group
// of more than 16 heads takes several CTAs); with a single query head 15 rows are idle, which costs nothing
// that matters since decode is bound by HBM bandwidth, not by mma throughput. The split's key tiles (16 keys
// each) are dealt round-robin to the 4 warps; each warp runs its own two-stage cp.async pipeline on buffers
// of its own (gathering rows through the block table, so block boundaries may fall anywhere), with
// S = Q K^T, the online softmax and O += P V in registers as in the flash attention forward, and only
// __syncwarp between steps. At the end the warps' (max, sum, O) are merged in shared memory.
//
// With num_splits > 1 (flash-decoding) each split writes its normalised O and lse (f32) to scratch that
// paged_decode_cuda allocates on the stream, and paged_decode_reduce_kernel merges the splits by lse.
//
// Shared memory per CTA: Q (16 rows) + 4 warps x 2 stages x (K + V) tiles of 16 rows, rows padded by 16
// bytes: 38 KiB at d = 64, 72 KiB at d = 128, 140 KiB at d = 256; with ptxas's 115, 166 and 252 registers
// per thread that is 4, 3 and 1 CTAs per H100 SM, so (one K/V stage in flight per warp) about 74, 104 and
// 67 KiB of loads in flight per SM, well above what HBM latency x bandwidth needs (~25 KiB per SM). The
// merge reuses the K/V buffers for the warps' f32 O.
#include "../core/cuda_guard.h"
#include "paged_cuda_common.cuh"

namespace flashlm::kvcache::cuda {
namespace {

using namespace attention::cuda;
namespace softmax = attention::softmax;

template <int kHeadDim_>
struct DecodeConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kHeads = 16;   // query heads per CTA: one m16 tile
  static constexpr int kBlockN = 16;  // keys per warp step
  static constexpr int kStages = 2;
  static constexpr int kNT = kBlockN / 8, kDT = kHeadDim / 8;
  static constexpr int kStride = kHeadDim + kPad;
  static constexpr int kTile = kBlockN * kStride;  // elements of one K or V tile
  static constexpr size_t kKVBytes = size_t(kWarps) * kStages * 2 * kTile * 2;
  static constexpr size_t kSmemBytes = size_t(kHeads) * kStride * 2 + kKVBytes;
  static_assert(kHeadDim % 16 == 0 && kNT % 2 == 0, "bad decode tile configuration");
  static_assert(size_t(kWarps) * kHeads * kHeadDim * 4 <= kKVBytes, "the merge must fit in the K/V buffers");
};

// Where a split's result goes when num_splits > 1: part_o [num_splits, num_seqs, heads, head_dim] and
// part_lse [num_splits, num_seqs, heads] (f32; lse = -inf for a split that saw no key).
struct SplitScratch {
  float* part_o;
  float* part_lse;
};

// Sets the scores of the tile's columns outside [lo, hi) to -inf (every row: they are one query's heads).
template <int kNT>
__device__ __forceinline__ void mask_cols(float (&s)[1][kNT][4], attention::tiles::Cols cols, int lane) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * (lane & 3) + (e & 1);
      if (col < cols.lo || col >= cols.hi) s[0][nt][e] = -INFINITY;
    }
}

// blockIdx.x: sequence; blockIdx.y: K/V head * head_tiles + tile of 16 query heads; blockIdx.z: split.
template <class Cfg, bool kBf16>
__global__ void __launch_bounds__(Cfg::kThreads) paged_decode_kernel(const PagedParams p, int head_tiles, bool aligned,
                                                                    SplitScratch scratch) {
  using T = Elem<kBf16>;
  constexpr int kHeads = Cfg::kHeads, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride, kWarps = Cfg::kWarps;
  constexpr int kNT = Cfg::kNT, kDT = Cfg::kDT, kHeadDim = Cfg::kHeadDim;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_max[kWarps][kHeads], s_sum[kWarps][kHeads];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = sQ + kHeads * kStride;

  const int s = blockIdx.x, split = blockIdx.z;
  const int kvh = int(blockIdx.y) / head_tiles, g0 = (int(blockIdx.y) % head_tiles) * kHeads;
  const int group = p.heads / p.kv_heads;  // (PagedParams::group is host-only)
  const int nrows = min(kHeads, group - g0);  // >= 1: the grid has ceil(group / 16) head tiles
  const int h0 = kvh * group + g0;            // the CTA's first query head
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int d = p.head_dim;

  const tiles::CacheShape shape = cache_shape(p);
  const int64_t sk = tiles::context_len(p.seq_lens[s], p.max_seq_len, shape);
  const tiles::Range keys = tiles::decode_keys(sk, p.window_left);
  const tiles::Range mine = tiles::split_tiles(tiles::tile_range(keys, kBlockN), p.num_splits, split);
  const int32_t* table = p.block_table + s * p.block_table_stride;
  const PagedHead<T> kv[2] = {paged_head<T>(p.k_cache, p.kc_block_stride, p.kc_row_stride, p.kc_head_stride, kvh),
                               paged_head<T>(p.v_cache, p.vc_block_stride, p.vc_row_stride, p.vc_head_stride, kvh)};

  const T* q = static_cast<const T*>(p.q) + s * p.q_row_stride + h0 * p.q_head_stride;
  load_tile<kHeads, kHeadDim, Cfg::kThreads>(sQ, q, p.q_head_stride, nrows, d, aligned, q);
  cp_async_commit();

  // The warp's K/V buffers: stage st holds K at sK + 2 st kTile and V right after it.
  T* sK = sKV + warp * Cfg::kStages * 2 * Cfg::kTile;
  auto load = [&](int64_t tile, int st) {
    const int64_t j0 = tile * kBlockN;
    const int first = int(tiles::clamp64(keys.begin - j0, 0, kBlockN)), rows = int(tiles::min64(sk - j0, kBlockN));
    T* const dst[2] = {sK + st * 2 * Cfg::kTile, sK + (st * 2 + 1) * Cfg::kTile};
    load_paged_tiles<kBlockN, kHeadDim, 32, kBlockN * kHeadDim / 8 / 32>(dst, kv, table, shape, j0, first, rows, d,
                                                                         aligned, lane);
  };

  float o[1][kDT][4];
  float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
  zero(o);
  const ScoreMap score_map(p.scale, p.softcap);
  const uint32_t q_base = smem_addr(sQ);
  // ALiBi (log2 domain) of the lane's two rows, heads h0 + (lane >> 2) and 8 more: the query sits at sk - 1.
  float alibi2[2] = {0.f, 0.f};
  if (p.alibi_slopes != nullptr) {
    for (int r = 0; r < 2; ++r) {
      const int row = (lane >> 2) + 8 * r;
      if (row < nrows) alibi2[r] = p.alibi_slopes[s * p.alibi_batch_stride + h0 + row] * kLog2e;
    }
  }

  int64_t t = mine.begin + warp;
  if (t < mine.end) load(t, 0);
  cp_async_commit();
  cp_async_wait<1>();  // this thread's part of Q has landed
  __syncthreads();     // ... and everyone's
  for (int st = 0; t < mine.end; t += kWarps, st ^= 1) {
    if (t + kWarps < mine.end) load(t + kWarps, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile t has landed
    __syncwarp();        // ... for every lane
    const T* tk = sK + st * 2 * Cfg::kTile;

    float sc[1][kNT][4];
    zero(sc);
    mma_abt<kBf16, 1, kNT, kHeadDim, kStride, kStride>(sc, q_base, smem_addr(tk), lane);
    scores_log2(sc, score_map);
    const int64_t j0 = t * kBlockN;
    if (p.alibi_slopes != nullptr) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          sc[0][nt][e] -= alibi2[e >> 1] * fabsf(float(sk - 1 - (j0 + nt * 8 + 2 * (lane & 3) + (e & 1))));
    }
    if (j0 < keys.begin || j0 + kBlockN > keys.end) mask_cols(sc, tiles::tile_cols(keys, j0, kBlockN), lane);
    online_softmax(sc, o, m, l);
    uint32_t pa[1][kNT / 2][4];
    acc_to_a<kBf16>(pa, sc);
    mma_pv<kBf16, 1, kNT / 2, kDT, kStride>(o, pa, smem_addr(tk + Cfg::kTile), lane);
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the K/V buffers: they now hold the warps' O

  // Merge the warps: row r of warp w has max s_max[w][r] (log2 domain), sum s_sum[w][r] and unnormalised O.
  float* sO = reinterpret_cast<float*>(sKV);  // [kWarps][kHeads][kHeadDim]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = (lane >> 2) + 8 * h;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<float2*>(sO + (warp * kHeads + r) * kHeadDim + dt * 8 + 2 * (lane & 3)) =
          make_float2(o[0][dt][2 * h], o[0][dt][2 * h + 1]);
    const float sum = quad_sum(l[0][h]);
    if ((lane & 3) == 0) s_max[warp][r] = m[0][h], s_sum[warp][r] = sum;
  }
  __syncthreads();

  // The end of the row or split follows shared_softmax.h (a warp's NaN max makes the row's NaN; one that saw
  // only -inf scores adds its O, 0 or NaN where V is, at weight 0).
  const int pairs = d / 2;
  const bool seen = keys.begin < keys.end;  // the row's keys (a split ends as a part, whatever it saw)
  for (int idx = int(threadIdx.x); idx < nrows * pairs; idx += Cfg::kThreads) {
    const int r = idx / pairs, c = 2 * (idx % pairs);
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = max_nan(mx, s_max[w][r]);
    float sum = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = s_max[w][r] == -INFINITY ? 0.f : exp2f(s_max[w][r] - mx);
      const float2 ow = *reinterpret_cast<const float2*>(sO + (w * kHeads + r) * kHeadDim + c);
      sum += a * s_sum[w][r];
      o0 += a * ow.x;
      o1 += a * ow.y;
    }
    const float lse = (mx + log2f(sum)) * kLn2;
    const int64_t h = h0 + r;
    if (p.num_splits == 1) {
      const float inv = softmax::out_scale(seen, sum);
      T* out = static_cast<T*>(p.out) + s * p.o_row_stride + h * p.o_head_stride + c;
      store_pair<kBf16>(out, o0 * inv, o1 * inv, aligned);
      if (c == 0 && p.lse != nullptr) p.lse[h * p.num_tokens + s] = softmax::row_lse(seen, mx, lse);
    } else {
      const float inv = softmax::part_scale(sum);
      const int64_t row = (int64_t(split) * p.num_seqs + s) * p.heads + h;
      *reinterpret_cast<float2*>(scratch.part_o + row * d + c) = make_float2(o0 * inv, o1 * inv);
      if (c == 0) scratch.part_lse[row] = softmax::row_lse(true, mx, lse);
    }
  }
}

// Merges the splits of (sequence blockIdx.x, head blockIdx.y): out = sum_i exp(lse_i - lse) O_i with
// lse = log sum_i exp(lse_i), a softmax over the splits' lse with shared_softmax.h's rules (a split of weight 0
// still passes on the NaN of a V row it saw); a row that sees no key gets out = 0 and lse = +inf.
template <bool kBf16>
__global__ void __launch_bounds__(64) paged_decode_reduce_kernel(const PagedParams p, bool aligned,
                                                                  SplitScratch scratch) {
  using T = Elem<kBf16>;
  const int s = blockIdx.x, h = blockIdx.y, d = p.head_dim;
  const int64_t split_stride = int64_t(p.num_seqs) * p.heads, row0 = int64_t(s) * p.heads + h;
  float mx = -INFINITY;
  for (int i = 0; i < p.num_splits; ++i) mx = max_nan(mx, scratch.part_lse[i * split_stride + row0]);
  const float base = softmax::base(mx);
  float sum = 0.f;
  for (int i = 0; i < p.num_splits; ++i) sum += expf(scratch.part_lse[i * split_stride + row0] - base);
  const tiles::Range keys = tiles::decode_keys(tiles::context_len(p.seq_lens[s], p.max_seq_len, cache_shape(p)),
                                               p.window_left);
  const bool seen = keys.begin < keys.end;
  const float inv = softmax::out_scale(seen, sum);
  for (int c = 2 * int(threadIdx.x); c < d; c += 2 * int(blockDim.x)) {
    float o0 = 0.f, o1 = 0.f;
    for (int i = 0; i < p.num_splits; ++i) {
      const int64_t row = i * split_stride + row0;
      const float w = expf(scratch.part_lse[row] - base);  // 0 for a split that saw nothing
      const float2 oi = *reinterpret_cast<const float2*>(scratch.part_o + row * d + c);
      o0 += w * oi.x;
      o1 += w * oi.y;
    }
    T* out = static_cast<T*>(p.out) + s * p.o_row_stride + h * p.o_head_stride + c;
    store_pair<kBf16>(out, o0 * inv, o1 * inv, aligned);
  }
  if (threadIdx.x == 0 && p.lse != nullptr)
    p.lse[int64_t(h) * p.num_tokens + s] = softmax::row_lse(seen, mx, base + logf(sum));
}

template <class Cfg, bool kBf16>
void launch_decode(const PagedParams& p, bool aligned, cudaStream_t stream) {
  const int head_tiles = int(tiles::ceil_div(p.group(), Cfg::kHeads));
  const int64_t head_blocks = int64_t(p.kv_heads) * head_tiles;
  // head_blocks <= heads, which is grid y of the merge.
  FLASHLM_CHECK(p.heads <= 65535 && p.num_splits <= 65535, "paged_attention: ", p.heads, " heads and ",
                p.num_splits, " splits exceed the CUDA grid (65535 each)");
  const dim3 grid(unsigned(p.num_seqs), unsigned(head_blocks), unsigned(p.num_splits));
  SplitScratch scratch{nullptr, nullptr};
  StreamScratch owner{nullptr, stream};
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.num_splits) * p.num_seqs * p.heads;
    check_cuda(cudaMallocAsync(&owner.ptr, size_t(rows) * (p.head_dim + 1) * sizeof(float), stream),
               "paged attention: cudaMallocAsync of the split scratch");
    scratch.part_o = static_cast<float*>(owner.ptr);
    scratch.part_lse = scratch.part_o + rows * p.head_dim;
  }
  auto kernel = paged_decode_kernel<Cfg, kBf16>;
  set_smem(kernel, Cfg::kSmemBytes);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, head_tiles, aligned, scratch);
  check_cuda(cudaGetLastError(), "paged decode kernel launch");
  if (p.num_splits > 1) {
    const dim3 rgrid(unsigned(p.num_seqs), unsigned(p.heads));
    paged_decode_reduce_kernel<kBf16><<<rgrid, 64, 0, stream>>>(p, aligned, scratch);
    check_cuda(cudaGetLastError(), "paged decode merge kernel launch");
  }
}

}  // namespace

void paged_decode_cuda(const PagedParams& p, bool aligned, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto bf16) {
    dispatch_head_dim<64, 128, 256>(p.head_dim, [&](auto dim) {
      launch_decode<DecodeConfig<decltype(dim)::value>, decltype(bf16)::value>(p, aligned, stream);
    });
  });
}

}  // namespace flashlm::kvcache::cuda
