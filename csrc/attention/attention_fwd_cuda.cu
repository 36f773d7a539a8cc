// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16, f16/bf16 in, f32 accumulate), and the CUDA
// forward entry point. Reference: forward_scalar (attention_scalar.cpp), same masks, softcap and lse.
//
// Grid: (query tile, head, sequence). A CTA loads its Q tile once and walks the K/V tiles that any of its
// rows sees (tiles wholly outside the causal/window band are never touched; only tiles that cross the band's
// edge or the sequence's end are masked). Pipeline, with one K and one V buffer: V(n) is loaded while
// S = Q K(n)^T is computed, and K(n + 1) while the softmax and O += P V(n) run, so a load is always in
// flight behind the math (flash-attn's schedule; two buffers per tensor would cost smem that 2 CTAs/SM need).
// S stays in registers: scaled to the log2 domain, masked, exponentiated against the running max (online
// softmax), converted to f16/bf16 and fed straight back as the A operand of P V. O is normalised once at the
// end; lse = m + ln(l), and a row that sees no key gets out = 0 and lse = +inf.
#include "attention_fwd_common.cuh"
#include "attention_kernels.h"

namespace flashlm::attention {
namespace cuda {
namespace {

template <class Cfg, bool kBf16>
__global__ void __launch_bounds__(Cfg::kThreads) flash_fwd_v2_kernel(const Params p, bool aligned) {
  using T = Elem<kBf16>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kDT = Cfg::kDT;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int head = blockIdx.y, b = blockIdx.z;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const tiles::SeqRows seq = sequence_rows(p, b);
  const int64_t i0 = int64_t(blockIdx.x) * kBlockM;
  if (i0 >= seq.sq) return;
  const int rows = int(tiles::min64(seq.sq - i0, kBlockM));
  const tiles::Band band = band_of(p, seq);
  const tiles::Range n_tiles = tiles::tile_range(band.keys(i0, i0 + rows), kBlockN);
  const int kvh = head / (p.heads / p.kv_heads);
  const int d = p.head_dim;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + (seq.q0 + i0) * p.q_row_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + seq.k0 * p.k_row_stride + kvh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + seq.k0 * p.v_row_stride + kvh * p.v_head_stride;
  const T* k_any = static_cast<const T*>(p.k);
  const T* v_any = static_cast<const T*>(p.v);

  float o[kMT][kDT][4];
  float m[kMT][2], l[kMT][2];
  zero(o);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

  const int row0 = warp * kMT * 16;  // the warp's first row in the tile
  const uint32_t q_base = smem_addr(sQ + row0 * kStride), k_base = smem_addr(sK), v_base = smem_addr(sV);
  const ScoreMap score_map(p);

  if (n_tiles.begin < n_tiles.end) {
    const int64_t j0 = n_tiles.begin * kBlockN;
    load_tile<kBlockM, Cfg::kHeadDim, Cfg::kThreads>(sQ, q, p.q_row_stride, rows, d, aligned, q);
    load_tile<kBlockN, Cfg::kHeadDim, Cfg::kThreads>(sK, k + j0 * p.k_row_stride, p.k_row_stride,
                                                     int(tiles::min64(seq.sk - j0, kBlockN)), d, aligned, k_any);
    cp_async_commit();
  }
  for (int64_t n = n_tiles.begin; n < n_tiles.end; ++n) {
    const int64_t j0 = n * kBlockN;
    cp_async_wait<0>();  // Q and K(n) have landed
    __syncthreads();     // ... for every thread, and every warp is done with V(n - 1)
    load_tile<kBlockN, Cfg::kHeadDim, Cfg::kThreads>(sV, v + j0 * p.v_row_stride, p.v_row_stride,
                                                     int(tiles::min64(seq.sk - j0, kBlockN)), d, aligned, v_any);
    cp_async_commit();

    float s[kMT][kNT][4];
    zero(s);
    mma_abt<kBf16, kMT, kNT, Cfg::kHeadDim, kStride, kStride>(s, q_base, k_base, lane);

    cp_async_wait<0>();  // V(n) has landed
    __syncthreads();     // ... for every thread, and every warp is done with K(n)
    if (n + 1 < n_tiles.end) {
      const int64_t j1 = j0 + kBlockN;
      load_tile<kBlockN, Cfg::kHeadDim, Cfg::kThreads>(sK, k + j1 * p.k_row_stride, p.k_row_stride,
                                                       int(tiles::min64(seq.sk - j1, kBlockN)), d, aligned, k_any);
      cp_async_commit();
    }

    scores_log2(s, score_map);
    if (!band.tile_full(i0, i0 + rows, j0, j0 + kBlockN)) mask_rows(s, band, i0 + row0, j0, lane);
    online_softmax(s, o, m, l);
    uint32_t pa[kMT][kNT / 2][4];
    acc_to_a<kBf16>(pa, s);
    mma_pv<kBf16, kMT, kNT / 2, kDT, kStride>(o, pa, v_base, lane);
  }

  float inv[kMT][2], lse[kMT][2];
  finish_rows(m, l, inv, lse);
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + (seq.q0 + i0) * p.o_row_stride + head * p.o_head_stride;
  store_acc<kBf16>(out, p.o_row_stride, o, inv, row0, 0, rows, d, aligned, lane);
  store_lse(p.lse + b * p.lse_batch_stride + head * p.lse_head_stride + seq.q0 + i0, lse, row0, rows, lane);
}

template <class Cfg, bool kBf16>
void launch_fwd_v2(const Params& p, bool aligned, cudaStream_t stream) {
  auto kernel = flash_fwd_v2_kernel<Cfg, kBf16>;
  set_smem(kernel, Cfg::kSmemBytes);
  const dim3 grid = make_grid(tiles::ceil_div(p.seqlen_q, Cfg::kBlockM), p.heads, p.batch, "attention forward");
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, aligned);
  check_cuda(cudaGetLastError(), "forward kernel launch");
}

}  // namespace
}  // namespace cuda

void forward_cuda(const Params& p, int device, void* stream) {
  using namespace cuda;
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  const bool aligned = vector_ok(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
                       vector_ok(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
                       vector_ok(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride) &&
                       vector_ok(p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  if (p.version == 1) {
    forward_v1_cuda(p, aligned, s);
    return;
  }
  dispatch_dtype(p.dtype, [&](auto bf16) {
    dispatch_head_dim<32, 64, 96, 128, 192, 256>(p.head_dim, [&](auto dim) {
      launch_fwd_v2<FwdConfigFor<decltype(dim)::value>, decltype(bf16)::value>(p, aligned, s);
    });
  });
}

}  // namespace flashlm::attention
