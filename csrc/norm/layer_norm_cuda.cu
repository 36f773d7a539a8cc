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
#include "layer_norm_kernels.h"

namespace flashlm::norm::detail {
namespace {

using cuda_elementwise::Elem;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sum of v over the block, the same value in every thread (warp_sums: kWarps floats of shared memory).
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) sum = __fadd_rn(sum, warp_sums[k]);
  __syncthreads();
  return sum;
}

struct Stats {
  float mean, rstd;
};

template <DType T>
__device__ __forceinline__ Stats row_stats(const typename Elem<T>::type* x, int64_t d, float eps, float* warp_sums) {
  float part = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) part = __fadd_rn(part, Elem<T>::load(x[i]));
  const float mean = __fdiv_rn(block_sum(part, warp_sums), float(d));
  part = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const float c = __fsub_rn(Elem<T>::load(x[i]), mean);
    part = __fadd_rn(part, __fmul_rn(c, c));
  }
  const float var = __fdiv_rn(block_sum(part, warp_sums), float(d));
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
    const float c1 = __fdiv_rn(block_sum(pg, warp_sums), float(a.d));
    const float c2 = __fdiv_rn(block_sum(pgx, warp_sums), float(a.d));
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
  CudaDeviceGuard guard(device);
  auto st = static_cast<cudaStream_t>(stream);
  const bool f32_weight = a.weight_dtype == DType::F32;
  switch (a.dtype) {
    case DType::F32: launch<DType::F32, DType::F32>(a, device, st); break;
    case DType::F16:
      f32_weight ? launch<DType::F16, DType::F32>(a, device, st) : launch<DType::F16, DType::F16>(a, device, st);
      break;
    case DType::BF16:
      f32_weight ? launch<DType::BF16, DType::F32>(a, device, st) : launch<DType::BF16, DType::BF16>(a, device, st);
      break;
    default: throw ValueError("layer_norm: x dtype must be F32, F16 or BF16");
  }
  throw_on_cuda_error(cudaGetLastError(), "layer_norm: kernel launch");
}

void layer_norm_backward_cuda(const LayerNormArgs& a, float* dweight, float* dbias, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto st = static_cast<cudaStream_t>(stream);
  const bool f32_weight = a.weight_dtype == DType::F32;
  switch (a.dtype) {
    case DType::F32: launch_backward<DType::F32, DType::F32>(a, dweight, dbias, device, st); break;
    case DType::F16:
      f32_weight ? launch_backward<DType::F16, DType::F32>(a, dweight, dbias, device, st)
                 : launch_backward<DType::F16, DType::F16>(a, dweight, dbias, device, st);
      break;
    case DType::BF16:
      f32_weight ? launch_backward<DType::BF16, DType::F32>(a, dweight, dbias, device, st)
                 : launch_backward<DType::BF16, DType::BF16>(a, dweight, dbias, device, st);
      break;
    default: throw ValueError("layer_norm_backward: x dtype must be F32, F16 or BF16");
  }
  throw_on_cuda_error(cudaGetLastError(), "layer_norm_backward: kernel launch");
}

}  // namespace flashlm::norm::detail
