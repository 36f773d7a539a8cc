// The training rope's CUDA kernel: one thread per pair (i, i + half) of a row, grid-stride; the CPU
// kernels' fma(x[j], sin, x[i] * cos) in f32, rounded once to the dtype.
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/cuda_elementwise.cuh"
#include "rope_train_kernels.h"

namespace flashlm::runtime::detail {
namespace {

using cuda_elementwise::Elem;

constexpr int kThreads = 256;

template <DType D>
__global__ void rope_kernel(RopeArgs a) {
  using E = typename Elem<D>::type;
  const int64_t half = a.hd / 2, pairs = a.rows * half;
  const int64_t s_lo = a.transpose ? half : 0, s_hi = a.transpose ? 0 : half;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = p / half, i = p % half, t = (r / a.heads) % a.T;
    const E* x = static_cast<const E*>(a.x) + r * a.hd;
    E* out = static_cast<E*>(a.out) + r * a.hd;
    const E* c = static_cast<const E*>(a.cos) + t * a.hd;
    const E* s = static_cast<const E*>(a.sin) + t * a.hd;
    const float lo = Elem<D>::load(x[i]), hi = Elem<D>::load(x[half + i]);
    const float new_lo = __fmaf_rn(hi, Elem<D>::load(s[s_lo + i]), __fmul_rn(lo, Elem<D>::load(c[i])));
    const float new_hi = __fmaf_rn(lo, Elem<D>::load(s[s_hi + i]), __fmul_rn(hi, Elem<D>::load(c[half + i])));
    out[i] = Elem<D>::store(new_lo);
    out[half + i] = Elem<D>::store(new_hi);
  }
}

}  // namespace

void rope_rows_cuda(const RopeArgs& a, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = cuda_elementwise::grid_for(a.rows * (a.hd / 2), kThreads, device, "rope_rotate");
  switch (a.dtype) {
    case DType::F32: rope_kernel<DType::F32><<<grid, kThreads, 0, st>>>(a); break;
    case DType::F16: rope_kernel<DType::F16><<<grid, kThreads, 0, st>>>(a); break;
    case DType::BF16: rope_kernel<DType::BF16><<<grid, kThreads, 0, st>>>(a); break;
    default: throw ValueError("rope_rotate: dtype must be F32, F16 or BF16");
  }
  throw_on_cuda_error(cudaGetLastError(), "rope_rotate: kernel launch");
}

}  // namespace flashlm::runtime::detail
