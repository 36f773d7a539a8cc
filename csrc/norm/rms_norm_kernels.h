// The RMSNorm kernels' shared internals: one struct of pointers and row strides (checked by rms_norm.cpp)
// and the kernel entry points. The CPU kernels agree bit for bit: each squares and sums a row in the lanes
// of lanes.h; every other step is element-wise.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"
#include "lanes.h"

namespace flashlm::norm::detail {

struct RMSNormArgs {
  DType dtype = DType::F32;         // x, out and residual
  DType weight_dtype = DType::F32;  // dtype or F32
  const void* x = nullptr;
  void* out = nullptr;
  void* residual = nullptr;  // nullptr: no residual
  const void* weight = nullptr;
  int64_t x_stride = 0, out_stride = 0, residual_stride = 0;  // row strides, in elements
  int64_t rows = 0, d = 0;
  float eps = 1e-6f;
};

struct RMSNormBackwardArgs {
  DType dtype = DType::F32;         // x, dout, dx
  DType weight_dtype = DType::F32;  // dtype or F32
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* dout = nullptr;
  void* dx = nullptr;
  int64_t rows = 0, d = 0;  // contiguous rows
  float eps = 1e-6f;
};

// Rows [begin, end).
void rms_norm_scalar(const RMSNormArgs& a, int64_t begin, int64_t end);
void rms_norm_avx2(const RMSNormArgs& a, int64_t begin, int64_t end);
// Backward of rows [begin, end): dx, and dout * y of each row added to dweight (f32 [d]) row by row in order.
// The sums over a row (of x^2 and of g * y) take the forward's lanes and order.
void rms_norm_backward_scalar(const RMSNormBackwardArgs& a, int64_t begin, int64_t end, float* dweight);
void rms_norm_backward_avx2(const RMSNormBackwardArgs& a, int64_t begin, int64_t end, float* dweight);
// All rows, on `device`'s `stream`; dweight is F32 [d] on the device.
void rms_norm_backward_cuda(const RMSNormBackwardArgs& a, float* dweight, int device, void* stream);
// All rows, on `device`'s `stream`.
void rms_norm_cuda(const RMSNormArgs& a, int device, void* stream);

}  // namespace flashlm::norm::detail
