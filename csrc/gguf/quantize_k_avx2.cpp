// AVX2 versions of make_qkx2_quants and make_qx_quants (quantize_k.cpp), the scale searches of Q2_K,
// Q4_K, Q5_K and Q6_K, run on 8 sub-blocks at once: lane k of every vector belongs to sub-block k, and each lane performs exactly the
// scalar code's float operations in the scalar code's order (separate multiplies and adds, no FMA, IEEE
// division), with the branches turned into blends. So the result is bit-identical to the scalar search,
// about 4-6x faster. The inputs are transposed: x8[8 * i + k] is element i of sub-block k.
//
// Compiled with -mavx2 -mfma -mf16c and called only after a run-time check; like the dequantization
// kernels it uses no inline functions or templates with external linkage (see core/avx2.h).
#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"

namespace flashlm::gguf::detail {

void make_qkx2_quants_x8(int n, int nmax, const float* x8, const float* w8, int32_t* L8, float* the_min8, float* scale8,
                         float rmin, float rdelta, int nstep, bool use_mad);
void make_qx_quants_x8(int n, int nmax, const float* x8, int32_t* L8, float* scale8);

namespace {

// ggml's nearest_int, lane-wise: add 1.5 * 2^23 and read the low mantissa bits.
FLASHLM_AVX2_INLINE __m256i nearest_int8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12582912.f)));
  return _mm256_sub_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x00400000));
}

FLASHLM_AVX2_INLINE __m256i clamp8(__m256i v, int lo, int hi) {
  return _mm256_max_epi32(_mm256_set1_epi32(lo), _mm256_min_epi32(_mm256_set1_epi32(hi), v));
}

// w * (|diff| or diff^2)
FLASHLM_AVX2_INLINE __m256 weighted_error(__m256 w, __m256 diff, bool use_mad) {
  const __m256 e = use_mad ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), diff) : _mm256_mul_ps(diff, diff);
  return _mm256_mul_ps(w, e);
}

FLASHLM_AVX2_INLINE __m256 select(__m256 mask, __m256 if_true, __m256 if_false) {
  return _mm256_blendv_ps(if_false, if_true, mask);
}

}  // namespace

void make_qkx2_quants_x8(int n, int nmax, const float* x8, const float* w8, int32_t* L8, float* the_min8, float* scale8,
                         float rmin, float rdelta, int nstep, bool use_mad) {
  __m256 min = _mm256_loadu_ps(x8), max = min;
  __m256 sum_w = _mm256_loadu_ps(w8);
  __m256 sum_x = _mm256_mul_ps(sum_w, min);
  for (int i = 1; i < n; ++i) {
    const __m256 x = _mm256_loadu_ps(x8 + 8 * i), w = _mm256_loadu_ps(w8 + 8 * i);
    min = _mm256_min_ps(x, min);  // x < min ? x : min, as `if (x < min) min = x`
    max = _mm256_max_ps(x, max);
    sum_w = _mm256_add_ps(sum_w, w);
    sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(w, x));
  }
  const __m256 zero = _mm256_setzero_ps();
  min = select(_mm256_cmp_ps(min, zero, _CMP_GT_OQ), zero, min);     // if (min > 0) min = 0
  const __m256 flat = _mm256_cmp_ps(max, min, _CMP_EQ_OQ);          // lanes that return early
  const __m256 flat_min = min;
  const __m256 nmax_f = _mm256_set1_ps(static_cast<float>(nmax));

  __m256 iscale = _mm256_div_ps(nmax_f, _mm256_sub_ps(max, min));
  __m256 scale = _mm256_div_ps(_mm256_set1_ps(1.0f), iscale);
  __m256 best_error = zero;
  __m256i L[32], Laux[32];
  for (int i = 0; i < n; ++i) {
    const __m256 x = _mm256_loadu_ps(x8 + 8 * i), w = _mm256_loadu_ps(w8 + 8 * i);
    L[i] = clamp8(nearest_int8(_mm256_mul_ps(iscale, _mm256_sub_ps(x, min))), 0, nmax);
    const __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(L[i])), min), x);
    best_error = _mm256_add_ps(best_error, weighted_error(w, diff, use_mad));
  }
  for (int is = 0; is <= nstep; ++is) {
    // min is the best fit so far: later candidates are spread over max - (that min), as in the scalar code
    iscale = _mm256_div_ps(_mm256_set1_ps(rmin + rdelta * is + nmax), _mm256_sub_ps(max, min));
    __m256 sum_l = zero, sum_l2 = zero, sum_xl = zero;
    for (int i = 0; i < n; ++i) {
      const __m256 x = _mm256_loadu_ps(x8 + 8 * i), w = _mm256_loadu_ps(w8 + 8 * i);
      Laux[i] = clamp8(nearest_int8(_mm256_mul_ps(iscale, _mm256_sub_ps(x, min))), 0, nmax);
      const __m256 l = _mm256_cvtepi32_ps(Laux[i]);
      const __m256 wl = _mm256_mul_ps(w, l);
      sum_l = _mm256_add_ps(sum_l, wl);
      sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, l));
      sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, x));
    }
    const __m256 D = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
    __m256 this_scale = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)), D);
    __m256 this_min = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)), D);
    const __m256 positive_min = _mm256_cmp_ps(this_min, zero, _CMP_GT_OQ);
    this_scale = select(positive_min, _mm256_div_ps(sum_xl, sum_l2), this_scale);
    this_min = select(positive_min, zero, this_min);
    __m256 cur_error = zero;
    for (int i = 0; i < n; ++i) {
      const __m256 x = _mm256_loadu_ps(x8 + 8 * i), w = _mm256_loadu_ps(w8 + 8 * i);
      const __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(this_scale, _mm256_cvtepi32_ps(Laux[i])), this_min), x);
      cur_error = _mm256_add_ps(cur_error, weighted_error(w, diff, use_mad));
    }
    const __m256 better = _mm256_and_ps(_mm256_cmp_ps(D, zero, _CMP_GT_OQ), _mm256_cmp_ps(cur_error, best_error, _CMP_LT_OQ));
    if (_mm256_movemask_ps(better) == 0) continue;
    const __m256i take = _mm256_castps_si256(better);
    for (int i = 0; i < n; ++i) L[i] = _mm256_blendv_epi8(L[i], Laux[i], take);
    best_error = select(better, cur_error, best_error);
    scale = select(better, this_scale, scale);
    min = select(better, this_min, min);
  }
  // Flat lanes: all levels 0, scale 0, the min as found.
  const __m256i flat_i = _mm256_castps_si256(flat);
  for (int i = 0; i < n; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(L8 + 8 * i), _mm256_andnot_si256(flat_i, L[i]));
  _mm256_storeu_ps(scale8, select(flat, zero, scale));
  _mm256_storeu_ps(the_min8, _mm256_xor_ps(select(flat, flat_min, min), _mm256_set1_ps(-0.0f)));
}

// make_qx_quants with x^2 weights (rmse_type 1): symmetric levels in [-nmax, nmax - 1], 18 scales tried.
void make_qx_quants_x8(int n, int nmax, const float* x8, int32_t* L8, float* scale8) {
  const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
  __m256 amax = zero, max = zero;  // the first element of largest magnitude, with its sign
  for (int i = 0; i < n; ++i) {
    const __m256 x = _mm256_loadu_ps(x8 + 8 * i), ax = _mm256_andnot_ps(sign, x);
    const __m256 larger = _mm256_cmp_ps(ax, amax, _CMP_GT_OQ);
    amax = select(larger, ax, amax);
    max = select(larger, x, max);
  }
  const __m256 all_zero = _mm256_cmp_ps(amax, _mm256_set1_ps(1e-15f), _CMP_LT_OQ);  // GROUP_MAX_EPS

  // levels l (in [-nmax, nmax - 1]) for one iscale, with the sums of the x^2-weighted fit
  __m256i L[32];
  auto fit = [&](__m256 iscale, __m256i* levels, __m256* sumlx, __m256* suml2) {
    *sumlx = *suml2 = zero;
    for (int i = 0; i < n; ++i) {
      const __m256 x = _mm256_loadu_ps(x8 + 8 * i);
      levels[i] = clamp8(nearest_int8(_mm256_mul_ps(iscale, x)), -nmax, nmax - 1);
      const __m256 l = _mm256_cvtepi32_ps(levels[i]), w = _mm256_mul_ps(x, x);
      *sumlx = _mm256_add_ps(*sumlx, _mm256_mul_ps(_mm256_mul_ps(w, x), l));
      *suml2 = _mm256_add_ps(*suml2, _mm256_mul_ps(_mm256_mul_ps(w, l), l));
    }
  };
  __m256 sumlx, suml2;
  fit(_mm256_div_ps(_mm256_set1_ps(static_cast<float>(-nmax)), max), L, &sumlx, &suml2);
  __m256 scale = select(_mm256_cmp_ps(suml2, zero, _CMP_NEQ_UQ), _mm256_div_ps(sumlx, suml2), zero);
  __m256 best = _mm256_mul_ps(scale, sumlx);
  __m256i Laux[32];
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    fit(_mm256_div_ps(_mm256_set1_ps(-(nmax + 0.1f * is)), max), Laux, &sumlx, &suml2);
    const __m256 better = _mm256_and_ps(_mm256_cmp_ps(suml2, zero, _CMP_GT_OQ),
                                        _mm256_cmp_ps(_mm256_mul_ps(sumlx, sumlx), _mm256_mul_ps(best, suml2), _CMP_GT_OQ));
    if (_mm256_movemask_ps(better) == 0) continue;
    const __m256i take = _mm256_castps_si256(better);
    for (int i = 0; i < n; ++i) L[i] = _mm256_blendv_epi8(L[i], Laux[i], take);
    scale = select(better, _mm256_div_ps(sumlx, suml2), scale);
    best = select(better, _mm256_mul_ps(scale, sumlx), best);
  }
  const __m256i zero_i = _mm256_castps_si256(all_zero), offset = _mm256_set1_epi32(nmax);
  for (int i = 0; i < n; ++i)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(L8 + 8 * i), _mm256_andnot_si256(zero_i, _mm256_add_epi32(L[i], offset)));
  _mm256_storeu_ps(scale8, select(all_zero, zero, scale));
}

}  // namespace flashlm::gguf::detail
