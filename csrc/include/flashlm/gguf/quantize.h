// GGUF quantization: float rows (f32, f16 or bf16) to GGML blocks, on the CPU. The bytes are exactly
// those of ggml's quantizers (ggml-quants.c: quantize_row_*_ref without an importance matrix,
// quantize_<type>(src, dst, nrow, n_per_row, imatrix) with one; IQ4_NL and IQ4_XS through
// quantize_iq4_nl / quantize_iq4_xs either way), so a file written with them matches one written by
// llama.cpp's quantize tool for the same weights and imatrix.
#pragma once

#include "flashlm/core/dtype.h"
#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

// The types `gguf_quantize` writes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
// IQ4_XS, and the plain F32, F16 and BF16 (a conversion, rounding to nearest even).
FLASHLM_API bool quantize_supported(DType type);

// data: a contiguous CPU tensor of F32, F16 or BF16 whose innermost dimension (a row) holds whole blocks
// of `type`; out: a contiguous CPU U8 tensor of exactly storage_bytes(type, data.numel()) bytes, rows
// packed one after another as in a GGUF file. Rows are split over the library's thread pool.
FLASHLM_API void gguf_quantize(const TensorView& data, DType type, const TensorView& out);

// The same with an importance matrix entry: importance is a contiguous CPU F32 tensor of one value per
// column of a row (llama.cpp's imatrix values, mean squared activations), the same for every row. The
// float conversions and Q8_0 ignore it, as ggml does.
FLASHLM_API void gguf_quantize(const TensorView& data, DType type, const TensorView& out, const TensorView& importance);

}  // namespace flashlm
