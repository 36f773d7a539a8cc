// SwiGLU's gate: out = silu(gate) * up, element-wise, with silu(g) = g / (1 + exp(-g)) (torch's F.silu(gate) *
// up, as Llama-family MLPs compute it before the down projection).
//
// f32 math; for BF16/F16 the silu is rounded to the dtype before the product and the product rounded again,
// as torch computes it on 16-bit tensors. dtypes: F32 and BF16 on the CPU; F32, F16 and BF16 on CUDA. The CPU
// kernels use one exp polynomial (Cephes' expf, within 2 ulp of the true value) in the scalar and AVX2 code,
// which agree bit for bit; CUDA uses expf and agrees to f32 rounding.
#pragma once

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::activation {

// gate, up, out: contiguous, one shape and dtype, on one device; out may be gate or up itself. `stream` is a
// cudaStream_t for CUDA views. Throws ValueError naming the argument.
FLASHLM_API void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out, void* stream = nullptr);

// The gradients of out = silu(gate) * up, with s = sigmoid(gate):
//   dgate = (dout * up) * s (1 + gate (1 - s)),   dup = dout * silu(gate)
// f32 math, each result rounded once to the dtype. gate, up, dout, dgate, dup: as silu_mul's views; dgate and
// dup may each be one of the inputs itself, but not each other.
FLASHLM_API void silu_mul_backward(const TensorView& gate, const TensorView& up, const TensorView& dout,
                                   const TensorView& dgate, const TensorView& dup, void* stream = nullptr);

}  // namespace flashlm::activation
