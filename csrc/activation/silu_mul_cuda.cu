// CUDA silu_mul: one grid-stride loop over the elements, f32 math with expf (it agrees with the CPU kernels to
// f32 rounding, not bit for bit), 16-bit dtypes rounded after the silu and after the product as on the CPU.
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/cuda_elementwise.cuh"
#include "silu_mul_kernels.h"

namespace flashlm::activation::detail {
namespace {

using cuda_elementwise::Elem;

constexpr int kThreads = 256;

template <DType T>
__global__ void silu_mul_kernel(const typename Elem<T>::type* gate, const typename Elem<T>::type* up,
                                typename Elem<T>::type* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = Elem<T>::load(gate[i]);
    const float s = Elem<T>::load(Elem<T>::store(g / (1.0f + expf(-g))));
    out[i] = Elem<T>::store(s * Elem<T>::load(up[i]));
  }
}

template <DType T>
void launch(const SiluMulArgs& a, int device, cudaStream_t stream) {
  using E = typename Elem<T>::type;
  const unsigned grid = cuda_elementwise::grid_for(a.n, kThreads, device, "silu_mul");
  silu_mul_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const E*>(a.gate), static_cast<const E*>(a.up),
                                                    static_cast<E*>(a.out), a.n);
}

}  // namespace

void silu_mul_cuda(const SiluMulArgs& a, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::F32: launch<DType::F32>(a, device, st); break;
    case DType::F16: launch<DType::F16>(a, device, st); break;
    case DType::BF16: launch<DType::BF16>(a, device, st); break;
    default: throw ValueError("silu_mul: dtype must be F32, F16 or BF16");
  }
  throw_on_cuda_error(cudaGetLastError(), "silu_mul: kernel launch");
}

}  // namespace flashlm::activation::detail
