// AVX2 LayerNorm: the scalar kernels' operations (layer_norm_scalar.cpp) 8 elements per instruction, matching
// them bit for bit: every row sum runs in four 8-wide accumulators (element i in lane i % 32, lanes.h) added
// in the scalar kernels' order, without FMA. A row's ragged tail goes through the same vector code on a
// zero-padded copy, its padding masked out of the sums that it would not leave at zero. Compiled with -mavx2
// -mfma -mf16c and called only after the run-time CPU check (layer_norm.cpp). Memory-bound: at training
// widths (768 f32: 3 KiB) a row stays in L1 between its passes.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "lanes_avx2.h"
#include "layer_norm_kernels.h"

namespace flashlm::norm::detail {
namespace {

// Lanes of a 32-element block that hold elements of the row: all for full blocks, the first n of the tail.
struct Mask32 {
  __m256 m[4];
};
FLASHLM_AVX2_INLINE Mask32 mask32(int64_t n) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  Mask32 r;
  for (int k = 0; k < 4; ++k)
    r.m[k] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - 8 * k)), iota));
  return r;
}

FLASHLM_AVX2_INLINE void zero4(__m256* acc) {
  for (int k = 0; k < 4; ++k) acc[k] = _mm256_setzero_ps();
}

struct Stats {
  float mean, rstd;
};

// Full 32-element blocks, then the zero-padded tail `t` (n elements).
template <class T>
FLASHLM_AVX2_INLINE Stats stats(const T* x, int64_t d, const T* t, const Mask32& tail, float eps) {
  const int64_t d32 = d - d % 32;
  __m256 acc[4];
  zero4(acc);
  for (int64_t i = 0; i < d32; i += 32)
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_add_ps(acc[k], load8(x + i + 8 * k));
  if (d32 < d)  // zeros add nothing
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_add_ps(acc[k], load8(t + 8 * k));
  const float mean = total(acc) / float(d);
  const __m256 mean8 = _mm256_set1_ps(mean);
  zero4(acc);
  for (int64_t i = 0; i < d32; i += 32)
    for (int k = 0; k < 4; ++k) {
      const __m256 c = _mm256_sub_ps(load8(x + i + 8 * k), mean8);
      acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(c, c));
    }
  if (d32 < d)
    for (int k = 0; k < 4; ++k) {
      const __m256 c = _mm256_and_ps(_mm256_sub_ps(load8(t + 8 * k), mean8), tail.m[k]);
      acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(c, c));
    }
  const float var = total(acc) / float(d);
  return {mean, 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(var + eps)))};
}

// 8 outputs: out = ((x - mean) * rstd) * w (+ b).
template <class T, class W>
FLASHLM_AVX2_INLINE void normalize8(const T* x, const W* w, const W* b, T* out, __m256 mean, __m256 rstd) {
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(load8(x), mean), rstd), load8(w));
  if (b) y = _mm256_add_ps(y, load8(b));
  store8(out, y);
}

template <class T, class W>
void rows(const LayerNormArgs& a, int64_t begin, int64_t end) {
  const auto* w = static_cast<const W*>(a.weight);
  const auto* b = static_cast<const W*>(a.bias);
  const int64_t d = a.d, d32 = d - d % 32, d8 = d - d % 8;
  const Mask32 tail = mask32(d - d32);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * d;
    T* out = static_cast<T*>(a.out) + r * d;
    T t[32] = {};
    std::memcpy(t, x + d32, size_t(d - d32) * sizeof(T));
    const Stats s = stats(x, d, t, tail, a.eps);
    if (a.mean) a.mean[r] = s.mean, a.rstd[r] = s.rstd;
    const __m256 mean8 = _mm256_set1_ps(s.mean), rstd8 = _mm256_set1_ps(s.rstd);
    for (int64_t i = 0; i < d8; i += 8) normalize8(x + i, w + i, b ? b + i : nullptr, out + i, mean8, rstd8);
    if (const int64_t n = d - d8; n > 0) {
      T xt[8] = {}, ot[8] = {};
      W wt[8] = {}, bt[8] = {};
      std::memcpy(xt, x + d8, size_t(n) * sizeof(T));
      std::memcpy(wt, w + d8, size_t(n) * sizeof(W));
      if (b) std::memcpy(bt, b + d8, size_t(n) * sizeof(W));
      normalize8(xt, wt, b ? bt : nullptr, ot, mean8, rstd8);
      std::memcpy(out + d8, ot, size_t(n) * sizeof(T));
    }
  }
}

// 32 elements: sg += g, sgx += g * xhat with g = dout * w, xhat = (x - mean) * rstd (masked: the tail).
template <class T, class W>
FLASHLM_AVX2_INLINE void grad_sums32(const T* x, const T* dout, const W* w, __m256 mean, __m256 rstd,
                                     const __m256* mask, __m256* sg, __m256* sgx) {
  for (int k = 0; k < 4; ++k) {
    __m256 g = _mm256_mul_ps(load8(dout + 8 * k), load8(w + 8 * k));
    __m256 gx = _mm256_mul_ps(g, _mm256_mul_ps(_mm256_sub_ps(load8(x + 8 * k), mean), rstd));
    if (mask) {
      g = _mm256_and_ps(g, mask[k]);
      gx = _mm256_and_ps(gx, mask[k]);
    }
    sg[k] = _mm256_add_ps(sg[k], g);
    sgx[k] = _mm256_add_ps(sgx[k], gx);
  }
}

// 8 elements: dweight += dout * xhat, dbias += dout, dx = ((dout * w - c1) - xhat * c2) * rstd.
template <class T, class W>
FLASHLM_AVX2_INLINE void grad8(const T* x, const T* dout, const W* w, T* dx, float* dweight, float* dbias,
                               __m256 mean, __m256 rstd, __m256 c1, __m256 c2) {
  const __m256 dy = load8(dout), xh = _mm256_mul_ps(_mm256_sub_ps(load8(x), mean), rstd);
  _mm256_storeu_ps(dweight, _mm256_add_ps(_mm256_loadu_ps(dweight), _mm256_mul_ps(dy, xh)));
  _mm256_storeu_ps(dbias, _mm256_add_ps(_mm256_loadu_ps(dbias), dy));
  const __m256 g = _mm256_mul_ps(dy, load8(w));
  store8(dx, _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(g, c1), _mm256_mul_ps(xh, c2)), rstd));
}

template <class T, class W>
void backward_rows(const LayerNormArgs& a, int64_t begin, int64_t end, float* dweight, float* dbias) {
  const auto* w = static_cast<const W*>(a.weight);
  const int64_t d = a.d, d32 = d - d % 32, d8 = d - d % 8, n32 = d - d32;
  const Mask32 tail = mask32(n32);
  W wb[32] = {};  // the tail, zero-padded to 32
  std::memcpy(wb, w + d32, size_t(n32) * sizeof(W));
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * d;
    const T* dout = static_cast<const T*>(a.dout) + r * d;
    T* dx = static_cast<T*>(a.dx) + r * d;
    T xb[32] = {}, db[32] = {};
    std::memcpy(xb, x + d32, size_t(n32) * sizeof(T));
    std::memcpy(db, dout + d32, size_t(n32) * sizeof(T));
    const Stats s = a.mean ? Stats{a.mean[r], a.rstd[r]} : stats(x, d, xb, tail, a.eps);
    const __m256 mean8 = _mm256_set1_ps(s.mean), rstd8 = _mm256_set1_ps(s.rstd);
    __m256 sg[4], sgx[4];
    zero4(sg);
    zero4(sgx);
    for (int64_t i = 0; i < d32; i += 32) grad_sums32(x + i, dout + i, w + i, mean8, rstd8, nullptr, sg, sgx);
    if (n32 > 0) grad_sums32(xb, db, wb, mean8, rstd8, tail.m, sg, sgx);
    const __m256 c1 = _mm256_set1_ps(total(sg) / float(d)), c2 = _mm256_set1_ps(total(sgx) / float(d));
    for (int64_t i = 0; i < d8; i += 8)
      grad8(x + i, dout + i, w + i, dx + i, dweight + i, dbias + i, mean8, rstd8, c1, c2);
    if (const int64_t n = d - d8; n > 0) {
      T xt[8] = {}, dt[8] = {}, ot[8] = {};
      W wt[8] = {};
      float gw[8] = {}, gb[8] = {};
      std::memcpy(xt, x + d8, size_t(n) * sizeof(T));
      std::memcpy(dt, dout + d8, size_t(n) * sizeof(T));
      std::memcpy(wt, w + d8, size_t(n) * sizeof(W));
      std::memcpy(gw, dweight + d8, size_t(n) * sizeof(float));
      std::memcpy(gb, dbias + d8, size_t(n) * sizeof(float));
      grad8(xt, dt, wt, ot, gw, gb, mean8, rstd8, c1, c2);
      std::memcpy(dx + d8, ot, size_t(n) * sizeof(T));
      std::memcpy(dweight + d8, gw, size_t(n) * sizeof(float));
      std::memcpy(dbias + d8, gb, size_t(n) * sizeof(float));
    }
  }
}

}  // namespace

void layer_norm_avx2(const LayerNormArgs& a, int64_t begin, int64_t end) {
  // F32 rows take an F32 weight; BF16 rows a BF16 or F32 one (the dispatcher checked).
  auto* fn = a.dtype == DType::F32 ? rows<float, float>
             : a.weight_dtype == DType::F32 ? rows<uint16_t, float> : rows<uint16_t, uint16_t>;
  fn(a, begin, end);
}

void layer_norm_backward_avx2(const LayerNormArgs& a, int64_t begin, int64_t end, float* dweight, float* dbias) {
  auto* fn = a.dtype == DType::F32 ? backward_rows<float, float>
             : a.weight_dtype == DType::F32 ? backward_rows<uint16_t, float> : backward_rows<uint16_t, uint16_t>;
  fn(a, begin, end, dweight, dbias);
}

}  // namespace flashlm::norm::detail
