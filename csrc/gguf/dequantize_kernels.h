// Internal entry points of the dequantization kernels, one per implementation; dequantize.cpp routes.
// CPU kernels work on a range of blocks [begin, end) so the dispatcher can split the work over the
// thread pool; for F32/F16/BF16 sources a "block" is one element.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::gguf::detail {

void dequantize_scalar(DType type, const uint8_t* src, int64_t begin, int64_t end, void* dst, DType out);

// Returns false where there is no AVX2 kernel for `type` (the caller falls back to scalar).
// `nontemporal`: the whole output is too large to stay in the cache, so blocks are written with streaming
// stores (where `dst` is 32-byte aligned).
bool dequantize_avx2(DType type, const uint8_t* src, int64_t begin, int64_t end, void* dst, DType out,
                     bool nontemporal);

// All `n_blocks` blocks on CUDA device `device`, queued on `stream`.
void dequantize_cuda(DType type, const uint8_t* src, int64_t n_blocks, void* dst, DType out, int device, void* stream);

}  // namespace flashlm::gguf::detail
