// The horizontal sum of a ymm of floats, in the one order every AVX2 kernel uses: the two 128-bit halves
// added lane by lane, then lanes (0 + 2) and (1 + 3), then those two. Kernels whose layouts must agree bit
// for bit (the GGUF matmul's AVX2 and AVX-512 paths, attention's forward and backward) rely on that order.
// Include only from sources compiled with AVX2 flags (see avx2.h).
#pragma once

#include <immintrin.h>

#include "avx2.h"

namespace flashlm::core {
namespace {

FLASHLM_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace
}  // namespace flashlm::core
