// AVX2 silu_mul: the scalar kernel (silu_mul_scalar.cpp) 8 elements per instruction, bit for bit: the same
// exp polynomial step by step without FMA, the same division, bf16 rounded to nearest even. The ragged tail
// runs through the scalar kernel. Compiled with -mavx2 -mfma -mf16c, called after the run-time CPU check.
#include <immintrin.h>

#include <cstdint>

#include "cephes_exp_avx2.h"
#include "silu_mul_kernels.h"

namespace flashlm::activation::detail {
namespace {

FLASHLM_AVX2_INLINE __m256 silu8(__m256 g) {
  const __m256 e = exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));  // -g
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
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
      const __m256 s = round_bf16(silu8(load_bf16(g + i)));
      store_bf16(o + i, _mm256_mul_ps(s, load_bf16(u + i)));
    }
  }
  silu_mul_scalar(a, i, end);
}

}  // namespace flashlm::activation::detail
