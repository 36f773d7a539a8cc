// GGUF-native matrix multiplication: y = x @ W.T (+ bias) with W kept in its GGML blocks.
//
// On the CPU, as ggml does: each row of x is quantized to 8-bit blocks (32 values with a float scale for
// the 32-element types, Q8_K blocks of 256 with group sums for the K-quants), and each output is a sum of
// integer block dot products, scaled and accumulated in float32. On CUDA: a GEMV kernel that dequantizes
// the blocks in registers for small M, and dequantize-to-f16/bf16 followed by a tensor-core GEMM for
// larger M.
#pragma once

#include <cstdint>

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

// The weight types gguf_matmul reads: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
FLASHLM_API bool gguf_matmul_supported(DType weight_type);

// x: [M, K] contiguous, f32 or bf16 on the CPU, f16/bf16/f32 on CUDA.
// weight: uint8, contiguous, N * K / block_size * block_bytes bytes: N rows of K / block_size blocks of
//         `weight_type` (K a multiple of the type's block size).
// bias: nullptr, or [N] contiguous with x's dtype.
// y: [M, N] contiguous with x's dtype, on x's device.
// CUDA work is queued on `stream` (a cudaStream_t, nullptr for the default stream); CPU work runs on the
// library's thread pool.
FLASHLM_API void gguf_matmul(const TensorView& x, const TensorView& weight, DType weight_type, int64_t n,
                             const TensorView* bias, const TensorView& y, void* stream = nullptr);

// The regrouped (x4) layout of a Q4_0 or Q8_0 weight with K a multiple of 64, or of a Q4_K or Q6_K weight with
// K a multiple of 256 (any N): rows in groups of four, each group's scales and quants interleaved for the CPU
// kernels, as many bytes as the plain blocks.
// A weight is regrouped once (at load) and then read only in that form; unpacking gives its blocks back.
FLASHLM_API bool gguf_repack_supported(DType weight_type, int64_t n, int64_t k);
// dst = src regrouped (to_x4) or src unpacked back to plain blocks (!to_x4); both uint8 CPU tensors of
// N x K of `weight_type`. Throws ValueError for a type or shape without the layout.
FLASHLM_API void gguf_repack(const TensorView& src, const TensorView& dst, DType weight_type, int64_t n, int64_t k,
                             bool to_x4);
// gguf_matmul on the CPU with the weight in the x4 layout; x, bias and y are float32. Each output equals
// gguf_matmul's with the plain weight, bit for bit.
FLASHLM_API void gguf_matmul_repacked(const TensorView& x, const TensorView& packed, DType weight_type, int64_t n,
                                      const TensorView* bias, const TensorView& y);
// Whether the CPU kernels may use VNNI where the CPU has it: AVX-512 VNNI for the regrouped layout, AVX-VNNI
// for the plain one (on by default; off: the AVX2 kernels, which give the same results). Returns the
// previous setting.
FLASHLM_API bool set_gguf_matmul_vnni(bool allowed);

}  // namespace flashlm
