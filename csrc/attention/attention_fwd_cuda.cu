// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16, f16/bf16 in, f32 accumulate), and the CUDA
// forward entry point. Reference: forward_scalar (attention_scalar.cpp), same masks, softcap and lse.
//
// Grid: (query tile, head, sequence). A CTA loads its Q tile once and walks the K/V tiles that any of its
// rows sees (tiles wholly outside the causal/window band are never touched; only tiles that cross the band's
// edge or the sequence's end are masked); the loop itself is forward_q_tile (shared_fwd_cuda.cuh).
// Pipeline, with one K and one V buffer: V(n) is loaded while S = Q K(n)^T is computed, and K(n + 1) while
// the softmax and O += P V(n) run, so a load is always in flight behind the math (flash-attn's schedule; two
// buffers per tensor would cost smem that 2 CTAs/SM need).
// S stays in registers: scaled to the log2 domain, masked, exponentiated against the running max (online
// softmax), converted to f16/bf16 and fed straight back as the A operand of P V. O is normalised once at the
// end; lse = m + ln(l), and a row that sees no key gets out = 0 and lse = +inf.
#include "shared_fwd_cuda.cuh"
#include "attention_kernels.h"

namespace flashlm::attention {
namespace cuda {
namespace {

template <class Cfg, bool kBf16>
__global__ void __launch_bounds__(Cfg::kThreads) flash_fwd_v2_kernel(const Params p, bool aligned) {
  using T = Elem<kBf16>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  extern __shared__ __align__(16) unsigned char smem[];

  const int head = blockIdx.y, b = blockIdx.z;
  const tiles::SeqRows seq = sequence_rows(p, b);
  const int64_t i0 = int64_t(blockIdx.x) * kBlockM;
  if (i0 >= seq.sq) return;
  const int rows = int(tiles::min64(seq.sq - i0, kBlockM));
  const int kvh = head / (p.heads / p.kv_heads);
  const int d = p.head_dim;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + (seq.q0 + i0) * p.q_row_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + seq.k0 * p.k_row_stride + kvh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + seq.k0 * p.v_row_stride + kvh * p.v_head_stride;
  auto load_k = [&](T* dst, int64_t j0) {
    load_tile<kBlockN, Cfg::kHeadDim, Cfg::kThreads>(dst, k + j0 * p.k_row_stride, p.k_row_stride,
                                                     int(tiles::min64(seq.sk - j0, kBlockN)), d, aligned,
                                                     static_cast<const T*>(p.k));
  };
  auto load_v = [&](T* dst, int64_t j0) {
    load_tile<kBlockN, Cfg::kHeadDim, Cfg::kThreads>(dst, v + j0 * p.v_row_stride, p.v_row_stride,
                                                     int(tiles::min64(seq.sk - j0, kBlockN)), d, aligned,
                                                     static_cast<const T*>(p.v));
  };
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + (seq.q0 + i0) * p.o_row_stride + head * p.o_head_stride;
  float* lse = p.lse + b * p.lse_batch_stride + head * p.lse_head_stride + seq.q0 + i0;
  ScoreMap score_map(p);
  score_map.alibi2 = alibi_slope2(p, b, head);
  forward_q_tile<Cfg, kBf16>(smem, q, p.q_row_stride, out, p.o_row_stride, lse, band_of(p, seq), i0, rows, d,
                             score_map, aligned, load_k, load_v, TileDropout{p.dropout_p > 0.f, p.rng, b, head});
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
  const bool aligned = qkv_vector_ok(p) && vector_ok(p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
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
