// AVX2/FMA rotate-half rope (rope_kernels.h): 8 pairs per instruction, the ragged tail through the scalar
// form. Compiled with -mavx2 -mfma, called after the run-time CPU check.
#include <immintrin.h>

#include "rope_kernels.h"

namespace flashlm::runtime::detail {

void rotate_half_avx2(float* v, int64_t half, const float* c, const float* s) {
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
    const __m256 lo = _mm256_fnmadd_ps(b, _mm256_loadu_ps(s + i), _mm256_mul_ps(a, _mm256_loadu_ps(c + i)));
    const __m256 hi = _mm256_fmadd_ps(a, _mm256_loadu_ps(s + half + i), _mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)));
    _mm256_storeu_ps(v + i, lo);
    _mm256_storeu_ps(v + half + i, hi);
  }
  rotate_half_scalar(v, half, c, s, i);
}

}  // namespace flashlm::runtime::detail
