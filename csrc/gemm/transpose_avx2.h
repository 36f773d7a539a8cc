// An 8 x 8 transpose of 32-bit elements in AVX2 registers, shared by the GEMM kernels that repack weight
// panels (int4_gemm_avx2.cpp, int8_gemm_avx2_body.h).
//
// Include this only from sources compiled with AVX2 flags; as core/avx2.h requires, the function is forced
// inline and has internal linkage, so no copy compiled with AVX2 can stand in for a caller on a CPU
// without it.
#pragma once

#include <immintrin.h>

namespace flashlm::gemm {
namespace {

// In place: rows of v become its columns (v[i][j] <-> v[j][i]), 8 x 8 floats.
__attribute__((always_inline)) inline void transpose8(__m256 (&v)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

}  // namespace
}  // namespace flashlm::gemm
