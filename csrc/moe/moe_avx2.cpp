// AVX2 float expert rows: four rows of x against one weight row at a time, so each 8-wide load of the
// weight feeds four FMAs (the weight streams from memory once per group of four rows). Same products as
// float_rows_scalar, summed in 8 lanes instead of one: results agree to float32 rounding.
#include <immintrin.h>

#include "../core/avx2.h"
#include "moe_kernels.h"

namespace flashlm::moe::detail {

namespace {

FLASHLM_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool kBf16>
FLASHLM_AVX2_INLINE __m256 load_w(const void* w, int64_t j) {
  if constexpr (kBf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + j));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + j);
  }
}

template <bool kBf16>
FLASHLM_AVX2_INLINE float w_at(const void* w, int64_t j) {
  if constexpr (kBf16) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[j]) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  } else {
    return static_cast<const float*>(w)[j];
  }
}

// Rows [i0, i0 + kRows) of x against weight row w (k values).
template <bool kBf16, int kRows>
FLASHLM_AVX2_INLINE void dot_rows(const void* w, const float* x, int64_t k, float* out) {
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 wv = load_w<kBf16>(w, j);
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * k + j), acc[r]);
  }
  for (int r = 0; r < kRows; ++r) {
    float s = hsum(acc[r]);
    for (int64_t t = j; t < k; ++t) s += x[r * k + t] * w_at<kBf16>(w, t);
    out[r] = s;
  }
}

template <bool kBf16>
void rows(const FloatRowsArgs& a, int64_t n0, int64_t n1) {
  const int64_t wstride = a.k * (kBf16 ? 2 : 4);
  for (int64_t n = n0; n < n1; ++n) {
    const void* w = static_cast<const char*>(a.w) + n * wstride;
    int64_t i = 0;
    float out[4];
    for (; i + 4 <= a.m; i += 4) {
      dot_rows<kBf16, 4>(w, a.x + i * a.k, a.k, out);
      for (int r = 0; r < 4; ++r) a.y[(i + r) * a.ldy + n] = out[r];
    }
    for (; i < a.m; ++i) {
      dot_rows<kBf16, 1>(w, a.x + i * a.k, a.k, out);
      a.y[i * a.ldy + n] = out[0];
    }
  }
}

}  // namespace

bool float_rows_avx2(const FloatRowsArgs& a, int64_t n0, int64_t n1) {
  if (a.type == DType::BF16) rows<true>(a, n0, n1);
  else rows<false>(a, n0, n1);
  return true;
}

}  // namespace flashlm::moe::detail
