// The LayerNorm kernels' shared internals: the pointers and sizes layer_norm.cpp checked, and the kernel
// entry points. The CPU kernels agree bit for bit: every row sum (of x, of (x - mean)^2, of g = dout * w and
// of g * xhat) is taken in the lanes of lanes.h, and every other step is element-wise, without FMA.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"
#include "lanes.h"

namespace flashlm::norm::detail {

struct LayerNormArgs {
  DType dtype = DType::F32;         // x, out, dout, dx
  DType weight_dtype = DType::F32;  // weight and bias: dtype or F32
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;  // forward; nullptr: no bias
  void* out = nullptr;         // forward
  const void* dout = nullptr;  // backward
  void* dx = nullptr;          // backward
  float* mean = nullptr;       // F32 [rows]: written by the forward, read by the backward; nullptr: none
  float* rstd = nullptr;       // (forward: not kept; backward: recomputed from x as the forward computes them)
  int64_t rows = 0, d = 0;     // contiguous rows
  float eps = 1e-5f;
};

// Forward of rows [begin, end).
void layer_norm_scalar(const LayerNormArgs& a, int64_t begin, int64_t end);
void layer_norm_avx2(const LayerNormArgs& a, int64_t begin, int64_t end);
// Backward of rows [begin, end): dx, and each row's dout * xhat added to dweight and dout to dbias (f32 [d],
// both given, row by row in order).
void layer_norm_backward_scalar(const LayerNormArgs& a, int64_t begin, int64_t end, float* dweight, float* dbias);
void layer_norm_backward_avx2(const LayerNormArgs& a, int64_t begin, int64_t end, float* dweight, float* dbias);
// All rows, on `device`'s `stream`; dweight and dbias (nullptr: not wanted) F32 [d] on the device.
void layer_norm_cuda(const LayerNormArgs& a, int device, void* stream);
void layer_norm_backward_cuda(const LayerNormArgs& a, float* dweight, float* dbias, int device, void* stream);

}  // namespace flashlm::norm::detail
