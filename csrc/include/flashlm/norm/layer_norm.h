// LayerNorm with the semantics of torch's nn.LayerNorm over the last dimension, for training (forward and
// backward; flashlm.ops.norm.layer_norm_train):
//   mean = mean(x), var = mean((x - mean)^2)     (f32, two passes over the row: no cancellation)
//   rstd = 1 / sqrt(var + eps)
//   out  = ((x - mean) * rstd) * weight + bias   (f32, rounded once to x's dtype)
// dtypes: F32 and BF16 on the CPU; F32, F16 and BF16 on CUDA. The weight is x's dtype or F32; the bias, when
// given, the weight's dtype.
#pragma once

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::norm {

struct LayerNormParams {
  TensorView x;       // [rows, d], contiguous
  TensorView weight;  // [d], contiguous; x's dtype or F32
  TensorView bias;    // optional [d], contiguous, the weight's dtype; absent: ndim 0 and null data
  TensorView out;     // [rows, d], x's dtype, contiguous, written; must not overlap x
  TensorView mean;    // optional F32 [rows], written: each row's mean, for the backward (with rstd, or neither)
  TensorView rstd;    // optional F32 [rows], written: each row's rstd
  double eps = 1e-5;  // applied in f32
};

// One call normalises every row. Views on one device; `stream` is a cudaStream_t for CUDA views. Rows go to
// the thread pool on the CPU when there are enough of them. Throws ValueError naming the argument for bad
// shapes, dtypes, devices or overlapping outputs.
FLASHLM_API void layer_norm(const LayerNormParams& params, void* stream = nullptr);

// The gradients of out = layer_norm(x), with mean and rstd the forward's (given, or recomputed alike),
// xhat = (x - mean) * rstd and g = dout * weight:
//   dx      = ((g - mean(g)) - xhat * mean(g * xhat)) * rstd
//   dweight = sum over rows of dout * xhat       (f32; on the CPU summed in a fixed order of row blocks, so
//   dbias   = sum over rows of dout               the result does not depend on the thread count)
struct LayerNormBackwardParams {
  TensorView x;        // [rows, d], contiguous
  TensorView weight;   // [d], contiguous; x's dtype or F32
  TensorView dout;     // [rows, d], x's dtype, contiguous
  TensorView dx;       // [rows, d], x's dtype, contiguous, written; may be dout itself
  TensorView dweight;  // [d], F32, contiguous, written (not accumulated into)
  TensorView dbias;    // optional [d], F32, contiguous, written; absent: ndim 0 and null data
  TensorView mean;     // optional F32 [rows]: the forward's (with rstd, or neither: recomputed from x)
  TensorView rstd;     // optional F32 [rows]
  double eps = 1e-5;
};

FLASHLM_API void layer_norm_backward(const LayerNormBackwardParams& params, void* stream = nullptr);

}  // namespace flashlm::norm
