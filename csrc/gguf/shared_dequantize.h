// Dequantization of a run of blocks on the calling thread, for other folders' kernels that decode weight
// blocks as they go (gemm/backward_input.cpp). Public callers use flashlm/gguf/dequantize.h; this skips its
// checks and its thread pool, so callers check what they pass.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::gguf::detail {

// Blocks [0, count) of `src` (a block type dequantize_supported accepts) as float32 into dst, with the AVX2
// decoders where `avx2` (the caller has checked the CPU), else the scalar ones. Both are bit-exact.
void dequantize_blocks_f32(DType type, const uint8_t* src, int64_t count, float* dst, bool avx2);

}  // namespace flashlm::gguf::detail
