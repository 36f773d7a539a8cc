// What the GGUF matmul's AVX2 and AVX-512 kernels share: the sum across a ymm's lanes in the one order every
// kernel uses (so the layouts' results agree bit for bit) and the unpacking of Q4_K/Q5_K's 6-bit scales.
// Include only from sources compiled with AVX2 flags (see core/avx2.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"
#include "../core/half.h"
#include "../core/hsum_avx2.h"

namespace flashlm::gemm::detail {
namespace {

// The horizontal sum of a ymm of floats, in core's one order.
using core::hsum;

// The 8 sub-blocks' scales and mins (ggml's get_scale_min_k4, four at a time) from the block's 12 bytes at q:
// bytes 0..7 of the result are the scales, bytes 8..15 the mins.
FLASHLM_AVX2_INLINE __m128i scales_mins_k4(const uint8_t* q) {
  const uint32_t w0 = core::ld_u32(q), w1 = core::ld_u32(q + 4), w2 = core::ld_u32(q + 8);
  const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, low2 = 0x03030303u;
  const uint32_t sc_lo = w0 & low6, sc_hi = (w2 & low4) | (((w0 >> 6) & low2) << 4);
  const uint32_t mn_lo = w1 & low6, mn_hi = ((w2 >> 4) & low4) | (((w1 >> 6) & low2) << 4);
  return _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), static_cast<int>(mn_lo), static_cast<int>(mn_hi));
}

}  // namespace
}  // namespace flashlm::gemm::detail
