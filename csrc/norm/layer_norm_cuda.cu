// CUDA LayerNorm: the scalar kernels' per-element steps (layer_norm_scalar.cpp: the mean, then the variance of
// x - mean, rstd = 1 / sqrt(var + eps), out = ((x - mean) * rstd) * w + b rounded once), with the row sums
// taken in another order (a block tree), so it agrees with the CPU to f32 rounding of the sums, not bit for
// bit. A block of kThreads per row (grid-stride over rows), one element at a time: training widths are
// hundreds to a few thousand elements, and the row is read from L1/L2 after its first pass. The backward
// gathers dweight and dbias by atomicAdd (their order varies from run to run).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/cuda_elementwise.cuh"
#include "common_cuda.cuh"
#include "layer_norm_kernels.h"

namespace flashlm::norm::detail {
namespace {

using cuda_elementwise::Elem;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Stats {
  float mean, rstd;
};

template <DType T>
__device__ __forceinline__ Stats row_stats(const typename Elem<T>::type* x, int64_t d, float eps, float* warp_sums) {
  float part = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) part = __fadd_rn(part, Elem<T>::load(x[i]));
  const float mean = __fdiv_rn(block_sum<kWarps>(part, warp_sums), float(d));
  part = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const float c = __fsub_rn(Elem<T>::load(x[i]), mean);
    part = __fadd_rn(part, __fmul_rn(c, c));
  }
  const float var = __fdiv_rn(block_sum<kWarps>(part, warp_sums), float(d));
  return {mean, __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)))};
}

template <DType T, DType W>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(LayerNormArgs a) {
  using E = typename Elem<T>::type;
  using WE = typename Elem<W>::type;
  __shared__ float warp_sums[kWarps];
  const auto* w = static_cast<const WE*>(a.weight);
  const auto* b = static_cast<const WE*>(a.bias);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const E* x = static_cast<const E*>(a.x) + r * a.d;
    E* out = static_cast<E*>(a.out) + r * a.d;
    const Stats s = row_stats<T>(x, a.d, a.eps, warp_sums);
    if (a.mean && threadIdx.x == 0) a.mean[r] = s.mean, a.rstd[r] = s.rstd;
    for (int64_t i = threadIdx.x; i < a.d; i += kThreads) {
      float y = __fmul_rn(__fmul_rn(__fsub_rn(Elem<T>::load(x[i]), s.mean), s.rstd), Elem<W>::load(w[i]));
      if (b) y = __fadd_rn(y, Elem<W>::load(b[i]));
      out[i] = Elem<T>::store(y);
    }
  }
}

template <DType T, DType W>
__global__ void __launch_bounds__(kThreads) layer_norm_backward_kernel(LayerNormArgs a, float* dweight, float* dbias) {
  using E = typename Elem<T>::type;
  using WE = typename Elem<W>::type;
  __shared__ float warp_sums[kWarps];
  const auto* w = static_cast<const WE*>(a.weight);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const E* x = static_cast<const E*>(a.x) + r * a.d;
    const E* dout = static_cast<const E*>(a.dout) + r * a.d;
    E* dx = static_cast<E*>(a.dx) + r * a.d;
    const Stats s = a.mean ? Stats{a.mean[r], a.rstd[r]} : row_stats<T>(x, a.d, a.eps, warp_sums);
    float pg = 0.0f, pgx = 0.0f;
    for (int64_t i = threadIdx.x; i < a.d; i += kThreads) {
      const float g = __fmul_rn(Elem<T>::load(dout[i]), Elem<W>::load(w[i]));
      const float xh = __fmul_rn(__fsub_rn(Elem<T>::load(x[i]), s.mean), s.rstd);
      pg = __fadd_rn(pg, g);
      pgx = __fadd_rn(pgx, __fmul_rn(g, xh));
    }
    const float c1 = __fdiv_rn(block_sum<kWarps>(pg, warp_sums), float(a.d));
    const float c2 = __fdiv_rn(block_sum<kWarps>(pgx, warp_sums), float(a.d));
    for (int64_t i = threadIdx.x; i < a.d; i += kThreads) {  // dx may be dout: each element is read first
      const float dy = Elem<T>::load(dout[i]);
      const float xh = __fmul_rn(__fsub_rn(Elem<T>::load(x[i]), s.mean), s.rstd);
      atomicAdd(dweight + i, __fmul_rn(dy, xh));
      if (dbias) atomicAdd(dbias + i, dy);
      const float g = __fmul_rn(dy, Elem<W>::load(w[i]));
      dx[i] = Elem<T>::store(__fmul_rn(__fsub_rn(__fsub_rn(g, c1), __fmul_rn(xh, c2)), s.rstd));
    }
  }
}

template <DType T, DType W>
void launch(const LayerNormArgs& a, int device, cudaStream_t stream) {
  const unsigned grid = cuda_elementwise::grid_for(a.rows, 1, device, "layer_norm");
  layer_norm_kernel<T, W><<<grid, kThreads, 0, stream>>>(a);
}

template <DType T, DType W>
void launch_backward(const LayerNormArgs& a, float* dweight, float* dbias, int device, cudaStream_t stream) {
  const size_t bytes = size_t(a.d) * sizeof(float);
  throw_on_cuda_error(cudaMemsetAsync(dweight, 0, bytes, stream), "layer_norm_backward: memset");
  if (dbias) throw_on_cuda_error(cudaMemsetAsync(dbias, 0, bytes, stream), "layer_norm_backward: memset");
  if (a.rows == 0) return;
  const unsigned grid = cuda_elementwise::grid_for(a.rows, 1, device, "layer_norm_backward");
  layer_norm_backward_kernel<T, W><<<grid, kThreads, 0, stream>>>(a, dweight, dbias);
}

}  // namespace

void layer_norm_cuda(const LayerNormArgs& a, int device, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  launch_norm("layer_norm", a.dtype, a.weight_dtype, device, [&](auto types) {
    using Types = decltype(types);
    launch<Types::kX, Types::kWeight>(a, device, st);
  });
}

void layer_norm_backward_cuda(const LayerNormArgs& a, float* dweight, float* dbias, int device, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  launch_norm("layer_norm_backward", a.dtype, a.weight_dtype, device, [&](auto types) {
    using Types = decltype(types);
    launch_backward<Types::kX, Types::kWeight>(a, dweight, dbias, device, st);
  });
}

}  // namespace flashlm::norm::detail
