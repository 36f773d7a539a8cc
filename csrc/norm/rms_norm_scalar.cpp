// The scalar RMSNorm kernel: the oracle for the AVX2 kernel (rms_norm_avx2.cpp), which matches it bit for
// bit, and for the CUDA kernel (rms_norm_cuda.cu), which sums in another order. Per row: an optional
// residual add rounded to the row's dtype, the sum of squares in 32 f32 lanes (rms_norm_kernels.h), then
// y = h * (1 / sqrt(sum / d + eps)) rounded to the dtype, times the weight, rounded again. The library is
// compiled with -ffp-contract=off: no step is fused into an FMA.
#include <cmath>
#include <cstdint>

#include "../core/half.h"
#include "rms_norm_kernels.h"

namespace flashlm::norm::detail {
namespace {

using core::bf16_or_f32::load;
using core::bf16_or_f32::store;

// T: the row's element type (float or bf16 bits); W: the weight's.
template <class T, class W>
void rows(const RMSNormArgs& a, int64_t begin, int64_t end) {
  const auto* w = static_cast<const W*>(a.weight);
  const int64_t d = a.d;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    T* out = static_cast<T*>(a.out) + r * a.out_stride;
    T* res = a.residual ? static_cast<T*>(a.residual) + r * a.residual_stride : nullptr;
    float acc[kSumLanes] = {};
    for (int64_t i = 0; i < d; ++i) {
      float h = load(x[i]);
      if (res) {
        res[i] = store<T>(load(res[i]) + h);
        h = load(res[i]);
      }
      acc[i % kSumLanes] += h * h;
    }
    const float inv = 1.0f / std::sqrt(sum_lanes(acc) / float(d) + a.eps);
    const T* src = res ? res : x;  // out may be x: every element of x was read above
    for (int64_t i = 0; i < d; ++i) {
      const float y = load(store<T>(load(src[i]) * inv));
      out[i] = store<T>(load(w[i]) * y);
    }
  }
}

template <class T, class W>
void backward_rows(const RMSNormBackwardArgs& a, int64_t begin, int64_t end, float* dweight) {
  const auto* w = static_cast<const W*>(a.weight);
  const int64_t d = a.d;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * d;
    const T* dout = static_cast<const T*>(a.dout) + r * d;
    T* dx = static_cast<T*>(a.dx) + r * d;
    float acc[kSumLanes] = {};
    for (int64_t i = 0; i < d; ++i) {
      const float h = load(x[i]);
      acc[i % kSumLanes] += h * h;
    }
    const float inv = 1.0f / std::sqrt(sum_lanes(acc) / float(d) + a.eps);
    float dot[kSumLanes] = {};
    for (int64_t i = 0; i < d; ++i) dot[i % kSumLanes] += (load(dout[i]) * load(w[i])) * (load(x[i]) * inv);
    const float c = sum_lanes(dot) / float(d);
    for (int64_t i = 0; i < d; ++i) {  // dx may be dout: each element is read before it is written
      const float dy = load(dout[i]), xh = load(x[i]) * inv;
      dweight[i] += dy * load(store<T>(xh));
      dx[i] = store<T>(inv * ((dy * load(w[i])) - xh * c));
    }
  }
}

}  // namespace

void rms_norm_backward_scalar(const RMSNormBackwardArgs& a, int64_t begin, int64_t end, float* dweight) {
  auto* fn = a.dtype == DType::F32 ? backward_rows<float, float>
             : a.weight_dtype == DType::F32 ? backward_rows<uint16_t, float> : backward_rows<uint16_t, uint16_t>;
  fn(a, begin, end, dweight);
}

void rms_norm_scalar(const RMSNormArgs& a, int64_t begin, int64_t end) {
  // F32 rows take an F32 weight; BF16 rows a BF16 or F32 one (the dispatcher checked).
  auto* fn = a.dtype == DType::F32 ? rows<float, float>
             : a.weight_dtype == DType::F32 ? rows<uint16_t, float> : rows<uint16_t, uint16_t>;
  fn(a, begin, end);
}

}  // namespace flashlm::norm::detail
