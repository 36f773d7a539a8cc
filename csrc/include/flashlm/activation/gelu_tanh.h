// GELU in its tanh form (GPT-2's MLP; torch's F.gelu(x, approximate="tanh")) and its gradient:
//   y  = 0.5 x (1 + tanh(a (x + b x^3))),   a = sqrt(2 / pi), b = 0.044715
//   dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) a (1 + 3 b x^2)),   t = tanh(a (x + b x^3))
// f32 math, one rounding to the dtype at the end (as torch computes 16-bit tensors). tanh(z) is
// 1 - 2 / (1 + exp(2z)) with the activation kernels' exp (silu_mul.h), which the scalar and AVX2 kernels share
// bit for bit; CUDA uses tanhf. dtypes: F32 and BF16 on the CPU; F32, F16 and BF16 on CUDA.
#pragma once

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::activation {

// x, out: contiguous, one shape and dtype, on one device; out may be x itself. `stream` is a cudaStream_t for
// CUDA views. Throws ValueError naming the argument.
FLASHLM_API void gelu_tanh(const TensorView& x, const TensorView& out, void* stream = nullptr);

// dx = dout * gelu_tanh'(x). x, dout, dx: as above; dx may be x or dout itself.
FLASHLM_API void gelu_tanh_backward(const TensorView& x, const TensorView& dout, const TensorView& dx,
                                    void* stream = nullptr);

}  // namespace flashlm::activation
