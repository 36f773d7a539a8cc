// Block dequantization: GGML blocks (and F32/F16/BF16) to f32, f16 or bf16, on the CPU or a CUDA device.
// Bit-exact with ggml's reference (and gguf-py): every value is computed in float32 in ggml's order of
// operations, then rounded to the output dtype (round to nearest even).
#pragma once

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

// The types `dequantize` reads: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
// Q6_K, Q8_K, IQ4_NL, IQ4_XS.
FLASHLM_API bool dequantize_supported(DType src_type);

// src: contiguous, of a supported type; dst: contiguous f32/f16/bf16 with the same number of elements,
// on the same device. The innermost dimension of dst must hold whole blocks. CUDA work is queued on
// `stream` (a cudaStream_t; nullptr is the default stream); CPU work runs on the library's thread pool.
FLASHLM_API void dequantize(const TensorView& src, const TensorView& dst, void* stream = nullptr);

}  // namespace flashlm
