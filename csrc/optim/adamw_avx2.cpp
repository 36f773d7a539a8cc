// AVX2 AdamW: 8 elements per instruction, the scalar kernel's operations (adamw_scalar.cpp) in the same
// order with no FMA, so it matches the scalar kernel bit for bit (sqrt and div are correctly rounded in
// both). bf16 params are widened by a shift and rounded to nearest even on the way back, as the scalar
// kernel does. Compiled with -mavx2 -mfma -mf16c and called only after the run-time CPU check (adamw.cpp);
// the ragged tail (< 8 elements) goes to the scalar kernel. Memory-bound: 28 bytes an f32 element.
#include <immintrin.h>

#include <cstdint>

#include "../core/half_avx2.h"
#include "adamw_kernels.h"

namespace flashlm::optim::detail {
namespace {

using core::bf16_bits;

struct Consts {
  __m256 decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, sign;
  explicit Consts(const AdamWScalars& s)
      : decay(_mm256_set1_ps(s.decay)),
        one_minus_beta1(_mm256_set1_ps(s.one_minus_beta1)),
        beta2(_mm256_set1_ps(s.beta2)),
        one_minus_beta2(_mm256_set1_ps(s.one_minus_beta2)),
        neg_step_size(_mm256_set1_ps(s.neg_step_size)),
        bc2_sqrt(_mm256_set1_ps(s.bc2_sqrt)),
        eps(_mm256_set1_ps(s.eps)),
        sign(_mm256_set1_ps(s.maximize ? -0.0f : 0.0f)) {}
};

// Updates m[0..8) and v[0..8) and returns the new param values.
template <bool kDecay>
FLASHLM_AVX2_INLINE __m256 update8(__m256 p, __m256 g, float* m, float* v, const Consts& c) {
  g = _mm256_xor_ps(g, c.sign);  // negated when maximizing
  if constexpr (kDecay) p = _mm256_mul_ps(p, c.decay);
  const __m256 m0 = _mm256_loadu_ps(m), v0 = _mm256_loadu_ps(v);
  const __m256 mi = _mm256_add_ps(m0, _mm256_mul_ps(c.one_minus_beta1, _mm256_sub_ps(g, m0)));
  const __m256 vi = _mm256_add_ps(_mm256_mul_ps(v0, c.beta2), _mm256_mul_ps(_mm256_mul_ps(c.one_minus_beta2, g), g));
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), c.bc2_sqrt), c.eps);
  _mm256_storeu_ps(m, mi);
  _mm256_storeu_ps(v, vi);
  return _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(c.neg_step_size, mi), denom));
}

template <bool kDecay>
int64_t adamw_f32(float* p, const float* g, float* m, float* v, int64_t n, const Consts& c) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(p + i, update8<kDecay>(_mm256_loadu_ps(p + i), _mm256_loadu_ps(g + i), m + i, v + i, c));
  return i;
}

FLASHLM_AVX2_INLINE __m256 load8_bf16(const uint16_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}

FLASHLM_AVX2_INLINE void store8_bf16(uint16_t* p, __m256 x) {
  // bf16 bits in the low half of each lane -> 8 packed halves.
  const __m256i b = bf16_bits(x);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <bool kDecay>
int64_t adamw_bf16(uint16_t* p, const uint16_t* g, float* m, float* v, int64_t n, const Consts& c) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8_bf16(p + i, update8<kDecay>(load8_bf16(p + i), load8_bf16(g + i), m + i, v + i, c));
  return i;
}

template <bool kDecay>
int64_t adamw_any(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const Consts& c) {
  switch (dtype) {
    case DType::F32:
      return adamw_f32<kDecay>(static_cast<float*>(p), static_cast<const float*>(g), m, v, n, c);
    case DType::BF16:
      return adamw_bf16<kDecay>(static_cast<uint16_t*>(p), static_cast<const uint16_t*>(g), m, v, n, c);
    default:
      return 0;
  }
}

}  // namespace

void adamw_avx2(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  const Consts c(s);
  const int64_t done = s.apply_decay ? adamw_any<true>(dtype, p, g, m, v, n, c) : adamw_any<false>(dtype, p, g, m, v, n, c);
  if (done == n) return;
  const int64_t off = done * (dtype == DType::F32 ? 4 : 2);
  adamw_scalar(dtype, static_cast<char*>(p) + off, static_cast<const char*>(g) + off, m + done, v + done, n - done, s);
}

}  // namespace flashlm::optim::detail
