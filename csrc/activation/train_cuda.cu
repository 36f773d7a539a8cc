// CUDA training kernels (train_kernels.h): one grid-stride loop per op, f32 math with expf/tanhf (they agree
// with the CPU kernels to f32 rounding, not bit for bit), each result rounded once to the dtype.
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/cuda_elementwise.cuh"
#include "train_kernels.h"

namespace flashlm::activation::detail {
namespace {

using cuda_elementwise::Elem;

constexpr int kThreads = 256;

template <DType T, TrainOp Op>
__global__ void train_kernel(const typename Elem<T>::type* in0, const typename Elem<T>::type* in1,
                             const typename Elem<T>::type* in2, typename Elem<T>::type* out,
                             typename Elem<T>::type* out2, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = Elem<T>::load(in0[i]);
    if constexpr (Op == TrainOp::SiluMulBackward) {
      const float u = Elem<T>::load(in1[i]), dy = Elem<T>::load(in2[i]);
      const float s = 1.0f / (1.0f + expf(-x));
      out[i] = Elem<T>::store((dy * u) * (s * (1.0f + x * (1.0f - s))));
      out2[i] = Elem<T>::store(dy * (x * s));
    } else {
      const float x2 = x * x;
      const float t = tanhf(kGeluA * (x + kGeluB * (x2 * x)));
      if constexpr (Op == TrainOp::GeluTanh) {
        out[i] = Elem<T>::store((0.5f * x) * (1.0f + t));
      } else {
        const float slope = kGeluA * (1.0f + (3.0f * kGeluB) * x2);
        const float grad = 0.5f * (1.0f + t) + (0.5f * x) * ((1.0f - t * t) * slope);
        out[i] = Elem<T>::store(Elem<T>::load(in1[i]) * grad);
      }
    }
  }
}

template <DType T, TrainOp Op>
void launch(const TrainArgs& a, int device, cudaStream_t stream) {
  using E = typename Elem<T>::type;
  const unsigned grid = cuda_elementwise::grid_for(a.n, kThreads, device, "activation");
  train_kernel<T, Op><<<grid, kThreads, 0, stream>>>(static_cast<const E*>(a.in0), static_cast<const E*>(a.in1),
                                                     static_cast<const E*>(a.in2), static_cast<E*>(a.out),
                                                     static_cast<E*>(a.out2), a.n);
}

template <DType T>
void launch_op(const TrainArgs& a, int device, cudaStream_t stream) {
  switch (a.op) {
    case TrainOp::GeluTanh: launch<T, TrainOp::GeluTanh>(a, device, stream); break;
    case TrainOp::GeluTanhBackward: launch<T, TrainOp::GeluTanhBackward>(a, device, stream); break;
    case TrainOp::SiluMulBackward: launch<T, TrainOp::SiluMulBackward>(a, device, stream); break;
  }
}

}  // namespace

void train_cuda(const TrainArgs& a, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::F32: launch_op<DType::F32>(a, device, st); break;
    case DType::F16: launch_op<DType::F16>(a, device, st); break;
    case DType::BF16: launch_op<DType::BF16>(a, device, st); break;
    default: throw ValueError("activation: dtype must be F32, F16 or BF16");
  }
  throw_on_cuda_error(cudaGetLastError(), "activation: kernel launch");
}

}  // namespace flashlm::activation::detail
