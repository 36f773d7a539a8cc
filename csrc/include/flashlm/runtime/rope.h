// The rotate-half rotary embedding of the training path (flashlm.models.transformer.apply_rope), and its
// gradient. With hd the head dimension, half = hd / 2, t a row's position and sin the signed table of
// rope_factors (-sin over the first half, +sin over the second):
//   forward    out[i] = x[i] * cos[t, i] + x[(i + half) % hd] * sin[t, i]
//   transpose  out[i] = x[i] * cos[t, i] + x[(i + half) % hd] * sin[t, (i + half) % hd]
// The transpose is the forward's gradient (dx from dout). Each output is fma(x[j], sin, x[i] * cos) in f32
// (in f32 the roundings of torch's addcmul in apply_rope), rounded once to the dtype. dtypes: F32 and BF16 on the CPU; F32, F16 and BF16 on CUDA.
#pragma once

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::runtime {

struct RopeParams {
  TensorView x;     // [..., T, heads, hd], contiguous, hd even
  TensorView cos;   // [T, hd], x's dtype, contiguous
  TensorView sin;   // [T, hd], x's dtype, contiguous (signed: -sin, +sin)
  TensorView out;   // x's shape and dtype, contiguous; may be x itself
  bool transpose = false;
};

// `stream` is a cudaStream_t for CUDA views. Throws ValueError naming the argument.
FLASHLM_API void rope_rotate(const RopeParams& params, void* stream = nullptr);

}  // namespace flashlm::runtime
