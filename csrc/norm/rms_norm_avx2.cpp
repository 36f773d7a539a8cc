// AVX2 RMSNorm: the scalar kernel's operations (rms_norm_scalar.cpp) 8 elements per instruction, matching it
// bit for bit: the sum of squares runs in four 8-wide accumulators (element i in lane i % 32, the scalar
// kernel's lanes) added in the scalar kernel's order, without FMA; bf16 is widened by a shift and rounded to
// nearest even (NaN -> 0x7FC0) as the scalar kernel does. A row's ragged tail goes through the same vector
// code on a zero-padded copy (zeros add nothing to the sums). Compiled with -mavx2 -mfma -mf16c and called
// only after the run-time CPU check (rms_norm.cpp). Memory-bound: a row is read twice (the second time from
// L1 at decode sizes) and written once.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "lanes_avx2.h"
#include "rms_norm_kernels.h"

namespace flashlm::norm::detail {
namespace {

// 32 elements of a row into the four accumulators; with a residual, res = round(res + x) is what is summed.
template <class T>
FLASHLM_AVX2_INLINE void square_sum32(const T* x, T* res, __m256* acc) {
  for (int k = 0; k < 4; ++k) {
    __m256 h = load8(x + 8 * k);
    if (res) {
      h = round8(_mm256_add_ps(load8(res + 8 * k), h), x);
      store8(res + 8 * k, h);
    }
    acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(h, h));
  }
}

// 8 outputs: out = round(w * round(src * inv)).
template <class T, class W>
FLASHLM_AVX2_INLINE void normalize8(const T* src, const W* w, T* out, __m256 inv) {
  const __m256 y = round8(_mm256_mul_ps(load8(src), inv), src);
  store8(out, _mm256_mul_ps(load8(w), y));
}

template <class T, class W>
void rows(const RMSNormArgs& a, int64_t begin, int64_t end) {
  const auto* w = static_cast<const W*>(a.weight);
  const int64_t d = a.d;
  const int64_t d32 = d - d % 32, d8 = d - d % 8;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    T* out = static_cast<T*>(a.out) + r * a.out_stride;
    T* res = a.residual ? static_cast<T*>(a.residual) + r * a.residual_stride : nullptr;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < d32; i += 32) square_sum32(x + i, res ? res + i : nullptr, acc);
    if (const int64_t n = d - d32; n > 0) {  // the tail, zero-padded to 32
      T xb[32] = {}, rb[32] = {};
      std::memcpy(xb, x + d32, size_t(n) * sizeof(T));
      if (res) std::memcpy(rb, res + d32, size_t(n) * sizeof(T));
      square_sum32(xb, res ? rb : nullptr, acc);
      if (res) std::memcpy(res + d32, rb, size_t(n) * sizeof(T));
    }
    const float mean = total(acc) / float(d);
    const float inv = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean + a.eps)));
    const __m256 inv8 = _mm256_set1_ps(inv);
    const T* src = res ? res : x;  // out may be x: every element of x was read above
    for (int64_t i = 0; i < d8; i += 8) normalize8(src + i, w + i, out + i, inv8);
    if (const int64_t n = d - d8; n > 0) {
      T sb[8] = {}, ob[8] = {};
      W wb[8] = {};
      std::memcpy(sb, src + d8, size_t(n) * sizeof(T));
      std::memcpy(wb, w + d8, size_t(n) * sizeof(W));
      normalize8(sb, wb, ob, inv8);
      std::memcpy(out + d8, ob, size_t(n) * sizeof(T));
    }
  }
}

// 32 elements of a row: dot += (dout * w) * (x * inv), in the lanes of square_sum32.
template <class T, class W>
FLASHLM_AVX2_INLINE void grad_dot32(const T* x, const T* dout, const W* w, __m256 inv, __m256* dot) {
  for (int k = 0; k < 4; ++k) {
    const __m256 g = _mm256_mul_ps(load8(dout + 8 * k), load8(w + 8 * k));
    dot[k] = _mm256_add_ps(dot[k], _mm256_mul_ps(g, _mm256_mul_ps(load8(x + 8 * k), inv)));
  }
}

// 8 elements: dweight += dout * round(x * inv); dx = inv * (dout * w - x * inv * c).
template <class T, class W>
FLASHLM_AVX2_INLINE void grad8(const T* x, const T* dout, const W* w, T* dx, float* dweight, __m256 inv, __m256 c) {
  const __m256 dy = load8(dout), xh = _mm256_mul_ps(load8(x), inv);
  _mm256_storeu_ps(dweight, _mm256_add_ps(_mm256_loadu_ps(dweight), _mm256_mul_ps(dy, round8(xh, x))));
  store8(dx, _mm256_mul_ps(inv, _mm256_sub_ps(_mm256_mul_ps(dy, load8(w)), _mm256_mul_ps(xh, c))));
}

template <class T, class W>
void backward_rows(const RMSNormBackwardArgs& a, int64_t begin, int64_t end, float* dweight) {
  const auto* w = static_cast<const W*>(a.weight);
  const int64_t d = a.d;
  const int64_t d32 = d - d % 32, d8 = d - d % 8;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * d;
    const T* dout = static_cast<const T*>(a.dout) + r * d;
    T* dx = static_cast<T*>(a.dx) + r * d;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 dot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < d32; i += 32) square_sum32<T>(x + i, nullptr, acc);
    T xb[32] = {}, db[32] = {};  // the tail, zero-padded to 32
    W wb[32] = {};
    const int64_t n32 = d - d32;
    if (n32 > 0) {
      std::memcpy(xb, x + d32, size_t(n32) * sizeof(T));
      std::memcpy(db, dout + d32, size_t(n32) * sizeof(T));
      std::memcpy(wb, w + d32, size_t(n32) * sizeof(W));
      square_sum32<T>(xb, nullptr, acc);
    }
    const float mean = total(acc) / float(d);
    const float inv = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean + a.eps)));
    const __m256 inv8 = _mm256_set1_ps(inv);
    for (int64_t i = 0; i < d32; i += 32) grad_dot32(x + i, dout + i, w + i, inv8, dot);
    if (n32 > 0) grad_dot32(xb, db, wb, inv8, dot);
    const __m256 c8 = _mm256_set1_ps(total(dot) / float(d));
    for (int64_t i = 0; i < d8; i += 8) grad8(x + i, dout + i, w + i, dx + i, dweight + i, inv8, c8);
    if (const int64_t n = d - d8; n > 0) {
      T xt[8] = {}, dt[8] = {}, ot[8] = {};
      W wt[8] = {};
      float gt[8] = {};
      std::memcpy(xt, x + d8, size_t(n) * sizeof(T));
      std::memcpy(dt, dout + d8, size_t(n) * sizeof(T));
      std::memcpy(wt, w + d8, size_t(n) * sizeof(W));
      std::memcpy(gt, dweight + d8, size_t(n) * sizeof(float));
      grad8(xt, dt, wt, ot, gt, inv8, c8);
      std::memcpy(dx + d8, ot, size_t(n) * sizeof(T));
      std::memcpy(dweight + d8, gt, size_t(n) * sizeof(float));
    }
  }
}

}  // namespace

void rms_norm_backward_avx2(const RMSNormBackwardArgs& a, int64_t begin, int64_t end, float* dweight) {
  auto* fn = a.dtype == DType::F32 ? backward_rows<float, float>
             : a.weight_dtype == DType::F32 ? backward_rows<uint16_t, float> : backward_rows<uint16_t, uint16_t>;
  fn(a, begin, end, dweight);
}

void rms_norm_avx2(const RMSNormArgs& a, int64_t begin, int64_t end) {
  // F32 rows take an F32 weight; BF16 rows a BF16 or F32 one (the dispatcher checked).
  auto* fn = a.dtype == DType::F32 ? rows<float, float>
             : a.weight_dtype == DType::F32 ? rows<uint16_t, float> : rows<uint16_t, uint16_t>;
  fn(a, begin, end);
}

}  // namespace flashlm::norm::detail
