// The scalar LayerNorm kernels: the oracle for the AVX2 kernels (layer_norm_avx2.cpp), which match them bit
// for bit, and for the CUDA kernels (layer_norm_cuda.cu), which sum in another order. Per row: the mean and
// then the variance of (x - mean) in lanes.h's lanes (two passes: no cancellation of E[x^2] - mean^2),
// rstd = 1 / sqrt(var + eps), out = ((x - mean) * rstd) * w + b rounded once to the dtype. The library is
// compiled with -ffp-contract=off: no step is fused into an FMA.
#include <cmath>
#include <cstdint>

#include "../core/half.h"
#include "layer_norm_kernels.h"

namespace flashlm::norm::detail {
namespace {

using core::bf16_or_f32::load;
using core::bf16_or_f32::store;

struct Stats {
  float mean, rstd;
};

template <class T>
Stats stats(const T* x, int64_t d, float eps) {
  float acc[kSumLanes] = {};
  for (int64_t i = 0; i < d; ++i) acc[i % kSumLanes] += load(x[i]);
  const float mean = sum_lanes(acc) / float(d);
  float sq[kSumLanes] = {};
  for (int64_t i = 0; i < d; ++i) {
    const float c = load(x[i]) - mean;
    sq[i % kSumLanes] += c * c;
  }
  return {mean, 1.0f / std::sqrt(sum_lanes(sq) / float(d) + eps)};
}

// T: the row's element type (float or bf16 bits); W: the weight's and bias's.
template <class T, class W>
void rows(const LayerNormArgs& a, int64_t begin, int64_t end) {
  const auto* w = static_cast<const W*>(a.weight);
  const auto* b = static_cast<const W*>(a.bias);
  const int64_t d = a.d;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * d;
    T* out = static_cast<T*>(a.out) + r * d;
    const Stats s = stats(x, d, a.eps);
    if (a.mean) a.mean[r] = s.mean, a.rstd[r] = s.rstd;
    for (int64_t i = 0; i < d; ++i) {
      float y = ((load(x[i]) - s.mean) * s.rstd) * load(w[i]);
      if (b) y = y + load(b[i]);
      out[i] = store<T>(y);
    }
  }
}

template <class T, class W>
void backward_rows(const LayerNormArgs& a, int64_t begin, int64_t end, float* dweight, float* dbias) {
  const auto* w = static_cast<const W*>(a.weight);
  const int64_t d = a.d;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * d;
    const T* dout = static_cast<const T*>(a.dout) + r * d;
    T* dx = static_cast<T*>(a.dx) + r * d;
    const Stats s = a.mean ? Stats{a.mean[r], a.rstd[r]} : stats(x, d, a.eps);
    float sg[kSumLanes] = {}, sgx[kSumLanes] = {};
    for (int64_t i = 0; i < d; ++i) {
      const float g = load(dout[i]) * load(w[i]), xh = (load(x[i]) - s.mean) * s.rstd;
      sg[i % kSumLanes] += g;
      sgx[i % kSumLanes] += g * xh;
    }
    const float c1 = sum_lanes(sg) / float(d), c2 = sum_lanes(sgx) / float(d);
    for (int64_t i = 0; i < d; ++i) {  // dx may be dout: each element is read before it is written
      const float dy = load(dout[i]), xh = (load(x[i]) - s.mean) * s.rstd;
      dweight[i] += dy * xh;
      dbias[i] += dy;
      dx[i] = store<T>(((dy * load(w[i]) - c1) - xh * c2) * s.rstd);
    }
  }
}

}  // namespace

void layer_norm_scalar(const LayerNormArgs& a, int64_t begin, int64_t end) {
  // F32 rows take an F32 weight; BF16 rows a BF16 or F32 one (the dispatcher checked).
  auto* fn = a.dtype == DType::F32 ? rows<float, float>
             : a.weight_dtype == DType::F32 ? rows<uint16_t, float> : rows<uint16_t, uint16_t>;
  fn(a, begin, end);
}

void layer_norm_backward_scalar(const LayerNormArgs& a, int64_t begin, int64_t end, float* dweight, float* dbias) {
  auto* fn = a.dtype == DType::F32 ? backward_rows<float, float>
             : a.weight_dtype == DType::F32 ? backward_rows<uint16_t, float> : backward_rows<uint16_t, uint16_t>;
  fn(a, begin, end, dweight, dbias);
}

}  // namespace flashlm::norm::detail
