// The training rope's AVX2 kernel: the scalar kernel (rope_train_scalar.cpp) 8 pairs per instruction, bit
// for bit (the same FMA; bf16 rounded to nearest even). Rows whose half head dimension is not
// a multiple of 8 run through the scalar kernel. Compiled with -mavx2 -mfma -mf16c, called after the run-time
// CPU check.
#include <immintrin.h>

#include <cstdint>

#include "../core/half_avx2.h"
#include "rope_train_kernels.h"

namespace flashlm::runtime::detail {
namespace {

FLASHLM_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FLASHLM_AVX2_INLINE __m256 load8(const uint16_t* p) { return core::load_bf16x8(p); }
FLASHLM_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FLASHLM_AVX2_INLINE void store8(uint16_t* p, __m256 v) { core::store_bf16x8(p, v); }

template <class T>
void rows(const RopeArgs& a, int64_t begin, int64_t end) {
  const int64_t hd = a.hd, half = hd / 2;
  const int64_t s_lo = a.transpose ? half : 0, s_hi = a.transpose ? 0 : half;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = (r / a.heads) % a.T;
    const T* x = static_cast<const T*>(a.x) + r * hd;
    T* out = static_cast<T*>(a.out) + r * hd;
    const T* c = static_cast<const T*>(a.cos) + t * hd;
    const T* s = static_cast<const T*>(a.sin) + t * hd;
    for (int64_t i = 0; i < half; i += 8) {
      const __m256 lo = load8(x + i), hi = load8(x + half + i);
      const __m256 new_lo = _mm256_fmadd_ps(hi, load8(s + s_lo + i), _mm256_mul_ps(lo, load8(c + i)));
      const __m256 new_hi = _mm256_fmadd_ps(lo, load8(s + s_hi + i), _mm256_mul_ps(hi, load8(c + half + i)));
      store8(out + i, new_lo);
      store8(out + half + i, new_hi);
    }
  }
}

}  // namespace

void rope_rows_avx2(const RopeArgs& a, int64_t begin, int64_t end) {
  if ((a.hd / 2) % 8 != 0) return rope_rows_scalar(a, begin, end);
  if (a.dtype == DType::F32) rows<float>(a, begin, end);
  else rows<uint16_t>(a, begin, end);
}

}  // namespace flashlm::runtime::detail
