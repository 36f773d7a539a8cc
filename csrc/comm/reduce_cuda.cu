// CUDA reduction of the NCCL ring: dst := (dst + src) / divisor in f32, rounded once to the dtype, bit for
// bit the scalar oracle (reduce_scalar.cpp: __fadd_rn/__fdiv_rn, never contracted). Memory-bound: each
// thread handles 8 elements per iteration with 16-byte loads and stores where both pointers are 16-byte
// aligned, and one element at a time otherwise, in a grid-stride loop sized to the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "../core/cuda_elementwise.cuh"
#include "ring_transport.h"

namespace flashlm::comm::detail {
namespace {

constexpr int kThreads = 256;

void check(cudaError_t err, const char* what) { throw_on_cuda_error(err, std::string("reduce_add: ") + what); }

using cuda_elementwise::Elem;

template <DType T, bool kDivide>
__device__ __forceinline__ typename Elem<T>::type combine(typename Elem<T>::type a, typename Elem<T>::type b,
                                                          float divisor) {
  float s = __fadd_rn(Elem<T>::load(a), Elem<T>::load(b));
  if constexpr (kDivide) s = __fdiv_rn(s, divisor);
  return Elem<T>::store(s);
}

// 8 elements per thread and iteration as two or one 16-byte vectors (f32 / 16-bit types).
template <DType T, bool kDivide>
__global__ void __launch_bounds__(kThreads) reduce_vec8_kernel(typename Elem<T>::type* __restrict__ dst,
                                                               const typename Elem<T>::type* __restrict__ src,
                                                               int64_t groups, float divisor) {
  using E = typename Elem<T>::type;
  constexpr int kVecs = sizeof(E) * 8 / 16;  // 16-byte vectors per group of 8
  for (int64_t g = blockIdx.x * int64_t(kThreads) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      uint4 a = reinterpret_cast<const uint4*>(dst + 8 * g)[v], b = reinterpret_cast<const uint4*>(src + 8 * g)[v];
      E* ea = reinterpret_cast<E*>(&a);
      const E* eb = reinterpret_cast<const E*>(&b);
#pragma unroll
      for (int k = 0; k < int(16 / sizeof(E)); ++k) ea[k] = combine<T, kDivide>(ea[k], eb[k], divisor);
      reinterpret_cast<uint4*>(dst + 8 * g)[v] = a;
    }
  }
}

template <DType T, bool kDivide>
__global__ void __launch_bounds__(kThreads) reduce_scalar_kernel(typename Elem<T>::type* __restrict__ dst,
                                                                 const typename Elem<T>::type* __restrict__ src,
                                                                 int64_t n, float divisor) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    dst[i] = combine<T, kDivide>(dst[i], src[i], divisor);
}

unsigned grid_for(int64_t work, int device) { return cuda_elementwise::grid_for(work, kThreads, device, "reduce_add"); }

template <DType T, bool kDivide>
void launch(void* dst, const void* src, int64_t n, float divisor, int device, cudaStream_t stream) {
  using E = typename Elem<T>::type;
  auto* d = static_cast<E*>(dst);
  auto* s = static_cast<const E*>(src);
  const bool aligned = (reinterpret_cast<uintptr_t>(dst) % 16 == 0) && (reinterpret_cast<uintptr_t>(src) % 16 == 0);
  int64_t head = 0;
  if (aligned) {
    const int64_t groups = n / 8;
    if (groups > 0)
      reduce_vec8_kernel<T, kDivide><<<grid_for(groups, device), kThreads, 0, stream>>>(d, s, groups, divisor);
    head = groups * 8;
  }
  if (head < n)
    reduce_scalar_kernel<T, kDivide><<<grid_for(n - head, device), kThreads, 0, stream>>>(d + head, s + head, n - head,
                                                                                           divisor);
}

template <DType T>
void launch_op(void* dst, const void* src, int64_t n, float divisor, int device, cudaStream_t stream) {
  if (divisor == 1.0f) launch<T, false>(dst, src, n, divisor, device, stream);
  else launch<T, true>(dst, src, n, divisor, device, stream);
}

}  // namespace

void reduce_add_cuda(DType dtype, void* dst, const void* src, int64_t n, float divisor, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32: launch_op<DType::F32>(dst, src, n, divisor, device, s); break;
    case DType::F16: launch_op<DType::F16>(dst, src, n, divisor, device, s); break;
    case DType::BF16: launch_op<DType::BF16>(dst, src, n, divisor, device, s); break;
    default: throw ValueError("reduce_add: dtype must be F32, F16 or BF16");
  }
  check(cudaGetLastError(), "reduce kernel launch");
}

}  // namespace flashlm::comm::detail
