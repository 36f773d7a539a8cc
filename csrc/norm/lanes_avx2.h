// AVX2 helpers the norm kernels share: 8-element loads and stores of f32 or bf16 rows (bf16 widened by a
// shift, stored rounded to nearest even, NaN -> 0x7FC0, as core/half.h does), and lanes.h's sum on four
// 8-wide accumulators (element i of a row in lane i % 32). Included only by files compiled with -mavx2.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/half_avx2.h"
#include "../core/hsum_avx2.h"

namespace flashlm::norm::detail {

FLASHLM_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FLASHLM_AVX2_INLINE __m256 load8(const uint16_t* p) { return core::load_bf16x8(p); }

FLASHLM_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FLASHLM_AVX2_INLINE void store8(uint16_t* p, __m256 v) { core::store_bf16x8(p, v); }

// v rounded to T and widened back (the value a store and a load would give), for values that are computed
// with again, not stored. Without bf16_bits' NaN select (three instructions): every NaN here comes from bf16
// inputs or is the default NaN, so its low 16 bits are zero and the rounding add cannot carry it into a
// number; it keeps its sign and payload, and the store of the result it leads to makes it 0x7FC0.
FLASHLM_AVX2_INLINE __m256 round8(__m256 v, const float*) { return v; }
FLASHLM_AVX2_INLINE __m256 round8(__m256 v, const uint16_t*) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(int(0xFFFF0000u))));
}

// lanes.h's sum_lanes on the four accumulators.
FLASHLM_AVX2_INLINE float total(const __m256* acc) {
  // core::hsum adds the 8 lanes as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), lanes.h's order.
  return core::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

}  // namespace flashlm::norm::detail
