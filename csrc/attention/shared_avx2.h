// AVX2 building blocks of the CPU attention kernels that the paged attention kernels (kvcache/) use too: a
// vectorised exp2 and tanh, a horizontal sum, row loads and scaled stores (f32/bf16 <-> f32), and scratch
// buffers. The GEMM microkernel and the score epilogues stay with the flash attention kernels
// (attention_avx2.h). Include only from sources compiled with AVX2 flags; it keeps the rule of core/avx2.h
// (anonymous namespace, forced inline, no standard templates).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "../core/avx2.h"
#include "../core/hsum_avx2.h"
#include "flashlm/core/dtype.h"
#include "shared_cpu.h"

namespace flashlm::attention::avx2 {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

FLASHLM_AVX2_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FLASHLM_AVX2_INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
FLASHLM_AVX2_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- exp2 and tanh -------------------------------------------------------------------------------------

// 2^x for x <= 0 (and -inf): 2^n * p(r) with n = round(x), r = x - n in [-0.5, 0.5] (exact) and p a
// degree-6 polynomial fitted to 2^r for minimal relative error (fit error 2.0e-9). Measured against
// double exp2 over every 7th float in [-126, 0] (tests/cpp/attention_exp_check.cpp, run by
// tests/test_attention_kernels.py): max relative error 8.0e-8, about 1 ulp. Results below 2^-126 are
// flushed to 0, and so is x = -inf (masked scores); NaN gives NaN (a NaN score poisons its row, as in
// softmax). The degree-5 fit saves one FMA per 8 elements but measured 1.7e-7 (up to 3 ulp near 2^-0.5).
FLASHLM_AVX2_INLINE __m256 exp2_ps(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_NLT_UQ);  // x >= -126 or NaN
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);  // max_ps returns its second operand, so NaN stays NaN
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5353360504377633e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3398875016719103e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.61843691766262e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5503323674201965e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022647738456726e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.931471824645996e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // p in [0.70, 1.42]: adding n to its exponent field multiplies by 2^n (n >= -126 where kept).
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(y, keep);
}

// tanh(y) = sign(y) (1 - 2 / (e^{2|y|} + 1)); for |y| < 2^-4 the odd Taylor polynomial to y^7 instead,
// where the formula would lose relative accuracy to cancellation. Max absolute error 1.1e-7 (the
// attention scores it feeds are softcap * tanh, so that is a relative error of the softcap, not of the
// score). |y| >= 10 gives exactly +-1, +-inf included (tanh rounds to 1 from about 9.1 on, and the softcap's
// gradient 1 - t^2 must then be 0, not an ulp that turns an inf into +-inf instead of NaN); NaN gives NaN.
FLASHLM_AVX2_INLINE __m256 tanh_ps(__m256 y) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_min_ps(_mm256_set1_ps(10.f), _mm256_andnot_ps(sign, y));  // NaN stays (second operand)
  const __m256 e = exp2_ps(_mm256_mul_ps(a, _mm256_set1_ps(2.f * kLog2e)));  // e^{2|y|} <= e^20
  const __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.f),
                                   _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
  const __m256 a2 = _mm256_mul_ps(a, a);
  __m256 s = _mm256_set1_ps(-17.f / 315.f);
  s = _mm256_fmadd_ps(s, a2, _mm256_set1_ps(2.f / 15.f));
  s = _mm256_fmadd_ps(s, a2, _mm256_set1_ps(-1.f / 3.f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(s, a2), a, a);
  const __m256 t = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.0625f), _CMP_LT_OQ));
  return _mm256_or_ps(t, _mm256_and_ps(y, sign));
}

using core::hsum;

// ---- Rows ------------------------------------------------------------------------------------------------

// Row `src` (d elements of `dtype`) -> dst[0 .. dp) in f32, zero-padded.
FLASHLM_AVX2_INLINE void load_row_f32(const void* src, DType dtype, int64_t d, int64_t dp, float* dst) {
  int64_t i = 0;
  if (dtype == DType::F32) {
    const float* s = static_cast<const float*>(src);
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(s + i));
    for (; i < d; ++i) dst[i] = s[i];
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (; i + 8 <= d; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
    for (; i < d; ++i) dst[i] = cpu::bf16_to_f32(s[i]);
  }
  for (; i < dp; ++i) dst[i] = 0.f;
}

// f32 -> bf16 bits in the low half of each 32-bit lane, rounding to nearest even as cpu::f32_to_bf16
// (NaN stays NaN).
FLASHLM_AVX2_INLINE __m128i bf16_from_f32(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// dst (d elements of dtype) = src[0 .. d) * mul.
FLASHLM_AVX2_INLINE void store_row_scaled(const float* src, float mul, int64_t d, void* dst, DType dtype) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  if (dtype == DType::F32) {
    float* t = static_cast<float*>(dst);
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(t + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), m));
    for (; i < d; ++i) t[i] = src[i] * mul;
  } else {
    uint16_t* t = static_cast<uint16_t*>(dst);
    for (; i + 8 <= d; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(t + i), bf16_from_f32(_mm256_mul_ps(_mm256_loadu_ps(src + i), m)));
    for (; i < d; ++i) t[i] = cpu::f32_to_bf16(src[i] * mul);
  }
}

// ---- Scratch ---------------------------------------------------------------------------------------------

// A 64-byte aligned f32 buffer owned by one task (or one chunk of tasks); zero-filled on request.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }
  float* get(int64_t n) {
    if (n > size_) {
      std::free(data_);
      data_ = static_cast<float*>(std::aligned_alloc(64, size_t(round_up(max64(n, 16), 16)) * 4));
      if (!data_) throw std::bad_alloc();
      size_ = n;
    }
    return data_;
  }
  float* zeros(int64_t n) {
    float* p = get(n);
    std::memset(p, 0, size_t(n) * 4);
    return p;
  }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
};

// Consecutive float arrays carved out of one scratch allocation (each start 64-byte aligned).
struct Carver {
  float* base;
  int64_t used = 0;
  float* take(int64_t n) {
    float* r = base + used;
    used += round_up(n, 16);
    return r;
  }
};

}  // namespace
}  // namespace flashlm::attention::avx2
