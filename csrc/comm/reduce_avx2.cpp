// AVX2 reduction: dst := (a + b) / divisor (dst may be a), 8 floats per instruction, f16 through F16C and bf16 by
// shifting (both accumulated in f32 and rounded once, as the scalar oracle reduce_scalar.cpp does, bit for
// bit). Compiled with -mavx2 -mfma -mf16c and called only after the run-time CPU check (ring.cpp); the
// ragged tail (< 16 elements) goes to the scalar kernel. Memory-bound: two slices are read and one written,
// the received one still in the cache the peer's write left it in.
#include <immintrin.h>

#include <cstdint>

#include "../core/half_avx2.h"
#include "ring_transport.h"

namespace flashlm::comm::detail {
namespace {

using core::pack_bf16;
using core::pack_f16;

FLASHLM_AVX2_INLINE __m256 load8_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FLASHLM_AVX2_INLINE __m256 load8_bf16(const uint16_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}

template <bool kDivide>
FLASHLM_AVX2_INLINE __m256 combine(__m256 a, __m256 b, __m256 divisor) {
  const __m256 s = _mm256_add_ps(a, b);
  if constexpr (kDivide) return _mm256_div_ps(s, divisor);
  return s;
}

// 16 elements per iteration; returns how many were done.
template <bool kDivide>
int64_t reduce_f32(float* dst, const float* a, const float* b, int64_t n, float divisor) {
  const __m256 d = _mm256_set1_ps(divisor);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a0 = _mm256_loadu_ps(a + i), a1 = _mm256_loadu_ps(a + i + 8);
    __m256 b0 = _mm256_loadu_ps(b + i), b1 = _mm256_loadu_ps(b + i + 8);
    _mm256_storeu_ps(dst + i, combine<kDivide>(a0, b0, d));
    _mm256_storeu_ps(dst + i + 8, combine<kDivide>(a1, b1, d));
  }
  return i;
}

template <bool kDivide, bool kF16>
int64_t reduce_half(uint16_t* dst, const uint16_t* a, const uint16_t* b, int64_t n, float divisor) {
  const __m256 d = _mm256_set1_ps(divisor);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a0, a1, b0, b1;
    if constexpr (kF16) {
      a0 = load8_f16(a + i), a1 = load8_f16(a + i + 8), b0 = load8_f16(b + i), b1 = load8_f16(b + i + 8);
    } else {
      a0 = load8_bf16(a + i), a1 = load8_bf16(a + i + 8), b0 = load8_bf16(b + i), b1 = load8_bf16(b + i + 8);
    }
    const __m256 s0 = combine<kDivide>(a0, b0, d), s1 = combine<kDivide>(a1, b1, d);
    const __m256i packed = kF16 ? pack_f16(s0, s1) : pack_bf16(s0, s1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  return i;
}

template <bool kDivide>
int64_t reduce_any(DType dtype, void* dst, const void* a, const void* b, int64_t n, float divisor) {
  using H = uint16_t;
  auto* d16 = static_cast<H*>(dst);
  const auto *a16 = static_cast<const H*>(a), *b16 = static_cast<const H*>(b);
  switch (dtype) {
    case DType::F32:
      return reduce_f32<kDivide>(static_cast<float*>(dst), static_cast<const float*>(a), static_cast<const float*>(b), n,
                                 divisor);
    case DType::F16: return reduce_half<kDivide, true>(d16, a16, b16, n, divisor);
    case DType::BF16: return reduce_half<kDivide, false>(d16, a16, b16, n, divisor);
    default: return 0;
  }
}

}  // namespace

void reduce_add_avx2(DType dtype, void* dst, const void* a, const void* b, int64_t n, float divisor) {
  const int64_t done = divisor == 1.0f ? reduce_any<false>(dtype, dst, a, b, n, divisor)
                                       : reduce_any<true>(dtype, dst, a, b, n, divisor);
  if (done == n) return;
  const int64_t off = done * (dtype == DType::F32 ? 4 : 2);
  reduce_add_scalar(dtype, static_cast<char*>(dst) + off, static_cast<const char*>(a) + off,
                    static_cast<const char*>(b) + off, n - done, divisor);
}

}  // namespace flashlm::comm::detail
