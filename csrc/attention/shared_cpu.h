// Row access of the CPU attention kernels that the paged attention kernels (kvcache/) use too: n elements of
// an F32 or BF16 row to float32 and back (bf16 rounded to nearest even, as core/half.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "../core/half.h"
#include "flashlm/core/dtype.h"

namespace flashlm::attention::cpu {
// Internal linkage: the AVX2 kernels include these too, and a copy compiled with AVX2 flags must never be
// the one that callers on other CPUs get (see core/avx2.h).
namespace {

using core::bf16_to_f32;
using core::f32_to_bf16;

// n elements of a row of `dtype` (F32 or BF16) to f32, and back.
inline void load_row(const void* src, DType dtype, int64_t n, float* dst) {
  if (dtype == DType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
  } else {
    const auto* s = static_cast<const uint16_t*>(src);
    for (int64_t d = 0; d < n; ++d) dst[d] = bf16_to_f32(s[d]);
  }
}

inline void store_row(const float* src, int64_t n, void* dst, DType dtype) {
  if (dtype == DType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
  } else {
    auto* t = static_cast<uint16_t*>(dst);
    for (int64_t d = 0; d < n; ++d) t[d] = f32_to_bf16(src[d]);
  }
}

}  // namespace
}  // namespace flashlm::attention::cpu
