// The CPU activation kernels' exp and bf16 access, AVX2 form: the scalar exp_cephes (cephes_exp.h) 8 lanes
// at a time, step by step without FMA, and bf16 widened by a shift and rounded to nearest even. Include only
// from sources compiled with AVX2 flags (see core/avx2.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/half_avx2.h"
#include "silu_mul_kernels.h"

namespace flashlm::activation::detail {
namespace {

FLASHLM_AVX2_INLINE __m256 exp8(__m256 x) {
  // max/min return their second operand when one is NaN: x goes second, so a NaN stays a NaN. Lanes above
  // kExpHi are computed at kExpHi and replaced by +inf at the end.
  const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(kExpHi), _CMP_GT_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(kExpLo), x);
  x = _mm256_min_ps(_mm256_set1_ps(kExpHi), x);
  const __m256 k =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(kLn2Hi)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(k, _mm256_set1_ps(kLn2Lo)));
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kExpP[i]));
  p = _mm256_add_ps(_mm256_mul_ps(p, z), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), _mm256_set1_ps(__builtin_inff()), overflow);
}

FLASHLM_AVX2_INLINE __m256 load_bf16(const uint16_t* p) { return core::load_bf16x8(p); }
FLASHLM_AVX2_INLINE void store_bf16(uint16_t* p, __m256 v) { core::store_bf16x8(p, v); }

// v rounded to bf16 and widened back.
FLASHLM_AVX2_INLINE __m256 round_bf16(__m256 v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(core::bf16_bits(v), 16));
}

}  // namespace
}  // namespace flashlm::activation::detail
