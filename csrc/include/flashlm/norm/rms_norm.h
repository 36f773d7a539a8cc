// RMSNorm with the semantics of HF's LlamaRMSNorm, and vLLM's fused residual form (fused_add_rms_norm):
//   residual += x                        (only when a residual is given; the sum rounded to x's dtype)
//   h   = f32(residual or x)
//   y   = h * 1 / sqrt(mean(h^2) + eps)  (f32; the sum of squares accumulates in f32)
//   out = weight * y.to(x's dtype)       (f32 product, rounded to x's dtype)
// For BF16/F16 that is two roundings per element (y, then the product), exactly as a bf16 model computes it
// in torch. dtypes: F32 and BF16 on the CPU; F32, F16 and BF16 on CUDA. The weight is x's dtype or F32.
#pragma once

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::norm {

struct RMSNormParams {
  TensorView x;         // [rows, d]; rows may be strided (any stride >= 0), the last dimension contiguous
  TensorView weight;    // [d], contiguous; x's dtype or F32
  TensorView out;       // [rows, d], x's dtype, last dimension contiguous; may be x itself (same memory)
  TensorView residual;  // optional [rows, d], x's dtype, updated in place; absent: ndim 0 and null data
  double eps = 1e-6;    // applied in f32, as torch adds a Python float to an f32 tensor
};

// One call normalises every row. Views on one device; `stream` is a cudaStream_t for CUDA views. Rows go
// to the thread pool on the CPU when there are enough of them (a decode-sized call runs on the caller's
// thread). Throws ValueError naming the argument for bad shapes, dtypes, devices or overlapping outputs.
FLASHLM_API void rms_norm(const RMSNormParams& params, void* stream = nullptr);

// The gradients of out = rms_norm(x) (no residual), with inv = 1 / sqrt(mean(x^2) + eps) as the forward takes
// it, y = x * inv (rounded to x's dtype for the weight's gradient, as the forward rounds it) and g = dout * w:
//   dx      = inv * (g - y * mean(g * y))
//   dweight = sum over rows of dout * y          (f32, summed in a fixed order of row blocks: deterministic)
struct RMSNormBackwardParams {
  TensorView x;        // [rows, d], contiguous
  TensorView weight;   // [d], contiguous; x's dtype or F32
  TensorView dout;     // [rows, d], x's dtype, contiguous
  TensorView dx;       // [rows, d], x's dtype, contiguous, written; may be dout itself
  TensorView dweight;  // [d], F32, contiguous, written (not accumulated into)
  double eps = 1e-6;
};

FLASHLM_API void rms_norm_backward(const RMSNormBackwardParams& params, void* stream = nullptr);

}  // namespace flashlm::norm
