// What the norm .cu files share: the warp and block sums of their row reductions, and what every entry point
// does around its kernel launch (make `device` current, turn x's dtype T (F32, F16 or BF16) and the weight's
// W (F32, or x's dtype) into template arguments in this one place, and check the launch).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../core/cuda_guard.h"
#include "flashlm/core/dtype.h"
#include "flashlm/core/error.h"

namespace flashlm::norm::detail {

// The sum of v over a warp, the same value in every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sum of v over a block of kWarps warps, the same value in every thread: the warps' sums are added in one
// order (warp_sums: kWarps floats of shared memory, free again on return).
template <int kWarps>
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

template <DType T, DType W>
struct NormTypes {
  static constexpr DType kX = T, kWeight = W;
};

// Calls launch(NormTypes<T, W>{}) for x's dtype and the weight's with `device` current; op names the entry
// point in errors. An F32 x always takes an F32 weight (the dispatchers check it).
template <class Launch>
void launch_norm(const char* op, DType dtype, DType weight_dtype, int device, const Launch& launch) {
  CudaDeviceGuard guard(device);
  const bool f32_weight = weight_dtype == DType::F32;
  switch (dtype) {
    case DType::F32: launch(NormTypes<DType::F32, DType::F32>{}); break;
    case DType::F16:
      f32_weight ? launch(NormTypes<DType::F16, DType::F32>{}) : launch(NormTypes<DType::F16, DType::F16>{});
      break;
    case DType::BF16:
      f32_weight ? launch(NormTypes<DType::BF16, DType::F32>{}) : launch(NormTypes<DType::BF16, DType::BF16>{});
      break;
    default: throw ValueError(std::string(op) + ": x dtype must be F32, F16 or BF16");
  }
  throw_on_cuda_error(cudaGetLastError(), std::string(op) + ": kernel launch");
}

}  // namespace flashlm::norm::detail
