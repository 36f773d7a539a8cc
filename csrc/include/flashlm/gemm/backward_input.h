// The input gradient of a linear layer with frozen quantized weights: dx = dy @ W for y = x @ W.T, W [N, K]
// read in its stored form (GGML blocks, int8 per channel, int4 per group) without expanding it into memory.
// There is no weight gradient, and nothing of the forward pass is needed: x is not read.
//
// CPU: the blocks' columns are split over the library's thread pool (no two threads write the same dx
// element); each thread decodes a few weight rows' blocks into a small float buffer at a time (the AVX2
// decoders of dequantize where the ISA is AVX2) and adds dy[m, n] times them into its columns of dx, in
// float32; for M <= 2 and Q4_0, Q8_0, Q4_K, Q6_K, int8 and int4, AVX2 multiplies straight from the quants
// with dy folded into the block scales (no buffer), 16 columns a vector where the CPU has AVX-512F; for M >= 8
// AVX2 and AVX-512 decode W a panel at a time (128 rows x 256 columns) and multiply it into all M rows as a
// register-blocked GEMM. CUDA: each thread owns 8 columns of dx for up to 4 rows of dy and walks the N weight
// rows, decoding its 8 elements of each in registers.
#pragma once

#include <cstdint>

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

// The GGUF block types gguf_linear_backward_input reads: every block type `dequantize` decodes (Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL, IQ4_XS).
FLASHLM_API bool gguf_backward_input_supported(DType weight_type);

// dy: [M, N] contiguous, f32 or bf16 on the CPU (f16 too on CUDA).
// weight: uint8, contiguous, N rows of K / block_size blocks of `weight_type`.
// dx: [M, K] contiguous with dy's dtype, on dy's device; K a multiple of the block size.
FLASHLM_API void gguf_linear_backward_input(const TensorView& dy, const TensorView& weight, DType weight_type,
                                            const TensorView& dx, void* stream = nullptr);

// int8 weights w [N, K] with f32 per-row scales [N] (the int8_gemm layout): dx = dy @ (w * scales[:, None]).
FLASHLM_API void int8_linear_backward_input(const TensorView& dy, const TensorView& w, const TensorView& w_scales,
                                            const TensorView& dx, void* stream = nullptr);

// int4 weights w uint8 [N, K / 2] in int4_gemm's layout, f32 scales [N, K / group] and optional f32 zeros
// (zeros.data == nullptr and ndim == 0: symmetric, z = 8): dx = dy @ ((u - z) * s).
FLASHLM_API void int4_linear_backward_input(const TensorView& dy, const TensorView& w, const TensorView& scales,
                                            const TensorView& zeros, int64_t group_size, const TensorView& dx,
                                            void* stream = nullptr);

// Whether the AVX2 ISA may use the AVX-512 build of the few-rows kernels where the CPU has AVX-512F (on by
// default; both give the same bits, so this is for tests and benchmarks). Returns the previous setting.
FLASHLM_API bool set_backward_input_avx512(bool allowed);

// Whether the AVX2 ISA multiplies 8 or more rows of dy as a GEMM over decoded panels of W (on by default) or
// row by row (for tests and benchmarks: both give the same bits). Returns the previous setting.
FLASHLM_API bool set_backward_input_gemm(bool allowed);

}  // namespace flashlm
