// AVX2 W8A8 GEMM (maddubs + madd, the sign trick; the body is int8_gemm_avx2_body.h) and the AVX2
// per-token activation quantizer. Compiled with -mavx2 -mfma -mf16c, called only after a run-time CPU check.
// The quantizer matches quantize_per_token_scalar bit for bit (the same float operations; cvtps rounds half
// to even like nearbyint). Tested by tests/test_int_gemm.py against the scalar kernels.
#include <cstring>

#include "int8_gemm_avx2_body.h"

namespace flashlm::gemm {
namespace {

struct DotMaddubs {
  FLASHLM_AVX2_INLINE static __m256i dot(__m256i acc, __m256i u8, __m256i s8) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), _mm256_set1_epi16(1)));
  }
};

// 8 elements of a row as f32.
FLASHLM_AVX2_INLINE __m256 load8(const void* x, DType dtype, int64_t i) {
  if (dtype == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

FLASHLM_AVX2_INLINE float load1(const void* x, DType dtype, int64_t i) {
  if (dtype == DType::F32) return static_cast<const float*>(x)[i];
  return core::bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
}

// v * f (kDivide: v / f) rounded half to even and clamped to [-127, 127].
template <bool kDivide>
FLASHLM_AVX2_INLINE __m256i quantize8(__m256 v, __m256 f) {
  const __m256i q = _mm256_cvtps_epi32(kDivide ? _mm256_div_ps(v, f) : _mm256_mul_ps(v, f));  // NaN -> INT_MIN
  return _mm256_min_epi32(_mm256_max_epi32(q, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
}

// Row m of x as int8 codes of x * f (kDivide: x / f), as the scalar quantizers write them.
template <bool kDivide>
FLASHLM_AVX2_INLINE void quantize_row(const QuantizeArgs& a, int64_t m, float f) {
  const int64_t row = m * a.K;
  const __m256 vf = _mm256_set1_ps(f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int8_t* q = a.q + row;
  int64_t k = 0;
  for (; k + 32 <= a.K; k += 32) {
    const __m256i q0 = quantize8<kDivide>(load8(a.x, a.x_dtype, row + k), vf);
    const __m256i q1 = quantize8<kDivide>(load8(a.x, a.x_dtype, row + k + 8), vf);
    const __m256i q2 = quantize8<kDivide>(load8(a.x, a.x_dtype, row + k + 16), vf);
    const __m256i q3 = quantize8<kDivide>(load8(a.x, a.x_dtype, row + k + 24), vf);
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(packed, order));
  }
  for (; k < a.K; ++k) {
    const float x = load1(a.x, a.x_dtype, row + k);
    float r = __builtin_nearbyintf(kDivide ? x / f : x * f);
    r = r >= -127.f ? (r <= 127.f ? r : 127.f) : -127.f;
    q[k] = static_cast<int8_t>(r);
  }
}

}  // namespace

// The absolute maximum as the scalar quantizer takes it: the largest |x| bit pattern (an integer max of the
// floats without their sign bit), so that a NaN in the row is the maximum and its scale NaN.
void quantize_per_token_avx2(const QuantizeArgs& a, int64_t m_begin, int64_t m_end) {
  if (a.static_scale) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      a.scales[m] = *a.static_scale;
      quantize_row<true>(a, m, *a.static_scale);
    }
    return;
  }
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t m = m_begin; m < m_end; ++m) {
    const int64_t row = m * a.K;
    __m256i vmax = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 8 <= a.K; k += 8)
      vmax = _mm256_max_epi32(vmax, _mm256_and_si256(_mm256_castps_si256(load8(a.x, a.x_dtype, row + k)), abs_mask));
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
    uint32_t max_bits = 0;
    for (uint32_t v : lanes) max_bits = max_bits > v ? max_bits : v;
    for (; k < a.K; ++k) {
      const float x = load1(a.x, a.x_dtype, row + k);
      uint32_t v;
      std::memcpy(&v, &x, 4);
      v &= 0x7FFFFFFFu;
      max_bits = max_bits > v ? max_bits : v;
    }
    float absmax;
    std::memcpy(&absmax, &max_bits, 4);
    const float inv_s = absmax > 0.f ? 127.f / absmax : 0.f;
    a.scales[m] = absmax / 127.f;
    quantize_row<false>(a, m, inv_s);
  }
}

int64_t int8_scratch_bytes(int64_t M, int64_t K) {
  return quads(K) * kQuadBytes + M * kCols * int64_t(sizeof(int32_t));  // the panel, then the rows' sums
}

void int8_gemm_avx2(const Int8Args& a, int64_t n_begin, int64_t n_end, int8_t* panel) {
  int8_gemm_panels<DotMaddubs>(a, n_begin, n_end, panel);
}

}  // namespace flashlm::gemm
