// AVX2 float expert rows: tiles of rows of x against a few weight rows at a time, so that each load feeds
// several FMAs (the weights stream from memory once per group of four rows). Same products as
// float_rows_scalar, summed in 8 lanes instead of one: results agree to float32 rounding.
#include <immintrin.h>

#include "../core/avx2.h"
#include "../core/hsum_avx2.h"
#include "moe_kernels.h"

namespace flashlm::moe::detail {

namespace {

using core::hsum;

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

// y[r, c] = x_r . w_c for kRows rows of x (k apart) and kCols weight rows (wstride bytes apart): each 8-wide
// load of x feeds kCols FMAs and each weight load kRows, into kRows * kCols independent accumulators.
template <bool kBf16, int kRows, int kCols>
FLASHLM_AVX2_INLINE void dot_tile(const char* w, int64_t wstride, const float* x, int64_t k, float* y, int64_t ldy) {
  __m256 acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 wv[kCols];
    for (int c = 0; c < kCols; ++c) wv[c] = load_w<kBf16>(w + c * wstride, j);
    for (int r = 0; r < kRows; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + j);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t t = j; t < k; ++t) s += x[r * k + t] * w_at<kBf16>(w + c * wstride, t);
      y[r * ldy + c] = s;
    }
}

// Columns [n, n + kCols) for every row: tiles of 4 rows, then the rows left one at a time.
template <bool kBf16, int kCols>
FLASHLM_AVX2_INLINE void columns(const FloatRowsArgs& a, int64_t n) {
  const int64_t wstride = a.k * (kBf16 ? 2 : 4);
  const char* w = static_cast<const char*>(a.w) + n * wstride;
  int64_t i = 0;
  for (; i + 4 <= a.m; i += 4) dot_tile<kBf16, 4, kCols>(w, wstride, a.x + i * a.k, a.k, a.y + i * a.ldy + n, a.ldy);
  for (; i < a.m; ++i) dot_tile<kBf16, 1, kCols>(w, wstride, a.x + i * a.k, a.k, a.y + i * a.ldy + n, a.ldy);
}

// Tiles of 4 rows x 2 columns (6 loads per 8 FMAs); fewer than 4 rows (decode) take 4 columns at a time, so
// one row still has 4 independent FMA chains.
template <bool kBf16>
void rows(const FloatRowsArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (a.m < 4) {
    for (; n + 4 <= n1; n += 4) columns<kBf16, 4>(a, n);
  } else {
    for (; n + 2 <= n1; n += 2) columns<kBf16, 2>(a, n);
  }
  for (; n < n1; ++n) columns<kBf16, 1>(a, n);
}

}  // namespace

bool float_rows_avx2(const FloatRowsArgs& a, int64_t n0, int64_t n1) {
  if (a.type == DType::BF16) rows<true>(a, n0, n1);
  else rows<false>(a, n0, n1);
  return true;
}

}  // namespace flashlm::moe::detail
