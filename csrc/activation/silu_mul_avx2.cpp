// AVX2 silu_mul: the scalar kernel (silu_mul_scalar.cpp) 8 elements per instruction, bit for bit: the same
// exp polynomial step by step without FMA, the same division, bf16 rounded to nearest even. The ragged tail
// runs through the scalar kernel. Compiled with -mavx2 -mfma -mf16c, called after the run-time CPU check.
#include <immintrin.h>

#include <cstdint>

#include "../core/half_avx2.h"
#include "silu_mul_kernels.h"

namespace flashlm::activation::detail {
namespace {

using core::bf16_bits;

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

FLASHLM_AVX2_INLINE __m256 silu8(__m256 g) {
  const __m256 e = exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));  // -g
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

FLASHLM_AVX2_INLINE __m256 load_bf16(const uint16_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}

FLASHLM_AVX2_INLINE __m256i to_bf16(__m256 v) {  // 8 bf16 in the low halves of the lanes
  return bf16_bits(v);
}

FLASHLM_AVX2_INLINE void store_bf16(uint16_t* p, __m256 v) {
  const __m256i b = to_bf16(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

}  // namespace

void silu_mul_avx2(const SiluMulArgs& a, int64_t begin, int64_t end) {
  int64_t i = begin;
  if (a.dtype == DType::F32) {
    const auto* g = static_cast<const float*>(a.gate);
    const auto* u = static_cast<const float*>(a.up);
    auto* o = static_cast<float*>(a.out);
    for (; i + 8 <= end; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
  } else {
    const auto* g = static_cast<const uint16_t*>(a.gate);
    const auto* u = static_cast<const uint16_t*>(a.up);
    auto* o = static_cast<uint16_t*>(a.out);
    for (; i + 8 <= end; i += 8) {
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(to_bf16(silu8(load_bf16(g + i))), 16));
      store_bf16(o + i, _mm256_mul_ps(s, load_bf16(u + i)));
    }
  }
  silu_mul_scalar(a, i, end);
}

}  // namespace flashlm::activation::detail
