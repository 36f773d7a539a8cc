// 16-bit floats in AVX2 registers: float32 lanes rounded to bf16 or IEEE half exactly as the scalar
// conversions of half.h (round to nearest even; NaN -> 0x7FC0 for bf16), and packed in order.
// Include only from sources compiled with AVX2 flags (see avx2.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "avx2.h"

namespace flashlm::core {
namespace {

// float -> bf16 bits in the low half of each 32-bit lane: round to nearest even by adding 0x7FFF plus the
// lowest kept bit, as the scalar f32_to_bf16; NaN becomes 0x7FC0 as in torch.
FLASHLM_AVX2_INLINE __m256i bf16_bits(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// 16 floats -> 16 bf16 in order. packus works within 128-bit lanes ([a0-3 b0-3 | a4-7 b4-7]); the
// permute puts the 64-bit quarters back in order.
FLASHLM_AVX2_INLINE __m256i pack_bf16(__m256 a, __m256 b) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(a), bf16_bits(b)), _MM_SHUFFLE(3, 1, 2, 0));
}

// 16 floats -> 16 halves in order. F16C with round-to-nearest-even overflows to infinity and keeps the
// top of a NaN's payload with the quiet bit set, exactly as the scalar f32_to_f16.
FLASHLM_AVX2_INLINE __m256i pack_f16(__m256 a, __m256 b) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return _mm256_set_m128i(_mm256_cvtps_ph(b, kRound), _mm256_cvtps_ph(a, kRound));
}

// 8 bf16 -> 8 floats (exact: the bits shifted up).
FLASHLM_AVX2_INLINE __m256 load_bf16x8(const uint16_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}

// 8 floats -> 8 bf16 in order, rounded as bf16_bits.
FLASHLM_AVX2_INLINE void store_bf16x8(uint16_t* p, __m256 v) {
  const __m256i b = bf16_bits(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

}  // namespace
}  // namespace flashlm::core
