// Shared by the memory-bound element-wise CUDA kernels (the ring's reduction, the AdamW step): f32 access to
// F32, F16 and BF16 elements (rounded to nearest even on the way back) and the size of a grid-stride launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_guard.h"
#include "flashlm/core/dtype.h"

namespace flashlm::cuda_elementwise {

template <DType T>
struct Elem;
template <>
struct Elem<DType::F32> {
  using type = float;
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <>
struct Elem<DType::F16> {
  using type = __half;
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<DType::BF16> {
  using type = __nv_bfloat16;
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// Blocks of `threads` for `work` grid-stride items on `device`: enough to cover it, at most 8 per SM (more
// only queue). `op` names the caller in errors.
inline unsigned grid_for(int64_t work, int threads, int device, const char* op) {
  static thread_local int cached_device = -1, sms = 0;
  if (cached_device != device) {
    throw_on_cuda_error(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                        std::string(op) + ": cudaDeviceGetAttribute");
    cached_device = device;
  }
  const int64_t blocks = (work + threads - 1) / threads;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 8)));
}

}  // namespace flashlm::cuda_elementwise
