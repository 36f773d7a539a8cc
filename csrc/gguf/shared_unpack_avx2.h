// AVX2 unpacking of GGML block quants, shared by the dequantization kernels (dequantize_avx2.cpp) and the
// GGUF matmul kernels (gemm/gguf_matmul_avx2.cpp): unaligned loads, half scales, nibbles, 2-bit crumbs and
// bit planes widened to one byte per element. Include only from sources compiled with AVX2 flags (see
// core/avx2.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"

namespace flashlm::gguf::detail {
namespace {

FLASHLM_AVX2_INLINE __m256i load32B(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
FLASHLM_AVX2_INLINE __m128i load16B(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// An IEEE half scale. F16C is exact for every half but sets the quiet bit of a signalling NaN; every scale
// goes through a multiply or add, which sets that bit anyway.
FLASHLM_AVX2_INLINE float load_f16(const uint8_t* p) { return _cvtsh_ss(static_cast<unsigned short>(p[0] | (p[1] << 8))); }

// 16 bytes of packed nibbles -> 32 bytes: the low nibbles, then the high nibbles (the order of Q4_0,
// Q5_x and IQ4_NL, whose element j < 16 is the low nibble of qs[j] and element j + 16 its high nibble).
FLASHLM_AVX2_INLINE __m256i nibbles_lo_hi(const uint8_t* p) {
  const __m128i x = load16B(p), mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), mask), _mm_and_si128(x, mask));
}

// Bits [2s, 2s + 2) (or [4s, 4s + 4)) of each byte. Shifting 16-bit lanes is fine: the mask drops what
// crossed in from the neighbouring byte.
FLASHLM_AVX2_INLINE __m256i crumbs(__m256i x, int s) {
  return _mm256_and_si256(_mm256_srl_epi16(x, _mm_cvtsi32_si128(2 * s)), _mm256_set1_epi8(3));
}
FLASHLM_AVX2_INLINE __m256i nibbles(__m256i x, int s) {
  return _mm256_and_si256(_mm256_srl_epi16(x, _mm_cvtsi32_si128(4 * s)), _mm256_set1_epi8(0x0F));
}

// Byte i = `value` where bit `bit` of byte i of x is set, else 0.
FLASHLM_AVX2_INLINE __m256i bit_plane(__m256i x, int bit, char value) {
  const __m256i b = _mm256_set1_epi8(static_cast<char>(1 << bit));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(x, b), b), _mm256_set1_epi8(value));
}

// Byte j = `value` where bit j of `bits` is set, else 0 (Q5_0/Q5_1's fifth bits).
FLASHLM_AVX2_INLINE __m256i expand_bits(uint32_t bits, char value) {
  // Byte j picks byte j / 8 of `bits` (shuffle_epi8 indexes within each 128-bit lane; set1 fills both).
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), spread);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);  // byte j tests bit j % 8
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit), _mm256_set1_epi8(value));
}

}  // namespace
}  // namespace flashlm::gguf::detail
