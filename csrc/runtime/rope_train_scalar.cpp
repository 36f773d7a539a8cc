// The training rope's scalar kernel (rope_train_kernels.h): the oracle for AVX2 (bit for bit) and CUDA. Per
// row and pair (i, i + half), each output fma(x[j], sin, x[i] * cos) in f32, rounded once to the dtype: in f32
// the roundings of torch's addcmul in apply_rope (as the decoder's rope, rope_kernels.h).
#include <cmath>
#include <cstdint>

#include "../core/half.h"
#include "rope_train_kernels.h"

namespace flashlm::runtime::detail {
namespace {

using core::bf16_or_f32::load;
using core::bf16_or_f32::put;

template <class T>
void rows(const RopeArgs& a, int64_t begin, int64_t end) {
  const int64_t hd = a.hd, half = hd / 2;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = (r / a.heads) % a.T;
    const T* x = static_cast<const T*>(a.x) + r * hd;
    T* out = static_cast<T*>(a.out) + r * hd;
    const T* c = static_cast<const T*>(a.cos) + t * hd;
    const T* s = static_cast<const T*>(a.sin) + t * hd;
    // the forward pairs x[i + half] with sin[i] and x[i] with sin[i + half]; the transpose the other way round
    const int64_t s_lo = a.transpose ? half : 0, s_hi = a.transpose ? 0 : half;
    for (int64_t i = 0; i < half; ++i) {  // out may be x: both of a pair are read before either is written
      const float lo = load(x[i]), hi = load(x[i + half]);
      const float new_lo = std::fma(hi, load(s[s_lo + i]), lo * load(c[i]));
      const float new_hi = std::fma(lo, load(s[s_hi + i]), hi * load(c[half + i]));
      put(out + i, new_lo);
      put(out + half + i, new_hi);
    }
  }
}

}  // namespace

void rope_rows_scalar(const RopeArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == DType::F32) rows<float>(a, begin, end);
  else rows<uint16_t>(a, begin, end);
}

}  // namespace flashlm::runtime::detail
