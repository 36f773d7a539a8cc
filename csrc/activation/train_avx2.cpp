// AVX2 training kernels: the scalar kernels (train_scalar.cpp) 8 elements per instruction, bit for bit (the
// same operations in the same order, without FMA; bf16 rounded to nearest even). The ragged tail runs through
// the scalar kernel. Compiled with -mavx2 -mfma -mf16c, called after the run-time CPU check.
#include <immintrin.h>

#include <cstdint>

#include "cephes_exp_avx2.h"
#include "train_kernels.h"

namespace flashlm::activation::detail {
namespace {

FLASHLM_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FLASHLM_AVX2_INLINE __m256 load8(const uint16_t* p) { return load_bf16(p); }
FLASHLM_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FLASHLM_AVX2_INLINE void store8(uint16_t* p, __m256 v) { store_bf16(p, v); }

FLASHLM_AVX2_INLINE __m256 tanh8(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(2.0f), z));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(one, e)));
}

// tanh(a (x + b x^3)) from x and x^2.
FLASHLM_AVX2_INLINE __m256 gelu_tanh8(__m256 x, __m256 x2) {
  const __m256 cube = _mm256_mul_ps(_mm256_set1_ps(kGeluB), _mm256_mul_ps(x2, x));
  return tanh8(_mm256_mul_ps(_mm256_set1_ps(kGeluA), _mm256_add_ps(x, cube)));
}

FLASHLM_AVX2_INLINE __m256 gelu8(__m256 x) {
  const __m256 t = gelu_tanh8(x, _mm256_mul_ps(x, x));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), t));
}

FLASHLM_AVX2_INLINE __m256 gelu_grad8(__m256 x, __m256 dout) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 x2 = _mm256_mul_ps(x, x);
  const __m256 t = gelu_tanh8(x, x2);
  const __m256 left = _mm256_mul_ps(half, _mm256_add_ps(one, t));
  const __m256 slope =
      _mm256_mul_ps(_mm256_set1_ps(kGeluA), _mm256_add_ps(one, _mm256_mul_ps(_mm256_set1_ps(3.0f * kGeluB), x2)));
  const __m256 right =
      _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_mul_ps(_mm256_sub_ps(one, _mm256_mul_ps(t, t)), slope));
  return _mm256_mul_ps(dout, _mm256_add_ps(left, right));
}

template <class T>
int64_t run(const TrainArgs& a, int64_t begin, int64_t end) {
  const T* in0 = static_cast<const T*>(a.in0);
  const T* in1 = static_cast<const T*>(a.in1);
  const T* in2 = static_cast<const T*>(a.in2);
  T* out = static_cast<T*>(a.out);
  T* out2 = static_cast<T*>(a.out2);
  int64_t i = begin;
  switch (a.op) {
    case TrainOp::GeluTanh:
      for (; i + 8 <= end; i += 8) store8(out + i, gelu8(load8(in0 + i)));
      break;
    case TrainOp::GeluTanhBackward:
      for (; i + 8 <= end; i += 8) store8(out + i, gelu_grad8(load8(in0 + i), load8(in1 + i)));
      break;
    case TrainOp::SiluMulBackward: {
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= end; i += 8) {
        const __m256 g = load8(in0 + i), u = load8(in1 + i), dy = load8(in2 + i);
        const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)))));
        const __m256 ds = _mm256_mul_ps(s, _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, s))));
        const __m256 dg = _mm256_mul_ps(_mm256_mul_ps(dy, u), ds);
        const __m256 du = _mm256_mul_ps(dy, _mm256_mul_ps(g, s));
        store8(out + i, dg);
        store8(out2 + i, du);
      }
      break;
    }
  }
  return i;
}

}  // namespace

void train_avx2(const TrainArgs& a, int64_t begin, int64_t end) {
  const int64_t done = a.dtype == DType::F32 ? run<float>(a, begin, end) : run<uint16_t>(a, begin, end);
  train_scalar(a, done, end);
}

}  // namespace flashlm::activation::detail
