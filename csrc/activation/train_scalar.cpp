// Scalar training kernels (train_kernels.h): the oracle for the AVX2 kernels (train_avx2.cpp, bit for bit:
// the same f32 operations in the same order, no FMA as the library is compiled with -ffp-contract=off) and for
// CUDA (to rounding). Each element is read, computed in f32 and rounded once to the dtype.
#include <cstdint>

#include "../core/half.h"
#include "cephes_exp.h"
#include "train_kernels.h"

namespace flashlm::activation::detail {
namespace {

using core::bf16_or_f32::load;
using core::bf16_or_f32::store;

// tanh(z) = 1 - 2 / (1 + exp(2z)): +-1 where exp saturates, NaN for NaN.
float tanh_exp(float z) { return 1.0f - 2.0f / (1.0f + exp_cephes(2.0f * z)); }

float gelu(float x) {
  const float t = tanh_exp(kGeluA * (x + kGeluB * ((x * x) * x)));
  return (0.5f * x) * (1.0f + t);
}

float gelu_grad(float x, float dout) {
  const float x2 = x * x;
  const float t = tanh_exp(kGeluA * (x + kGeluB * (x2 * x)));
  const float left = 0.5f * (1.0f + t);
  const float slope = kGeluA * (1.0f + (3.0f * kGeluB) * x2);
  const float right = (0.5f * x) * ((1.0f - t * t) * slope);
  return dout * (left + right);
}

template <class T>
void run(const TrainArgs& a, int64_t begin, int64_t end) {
  const T* in0 = static_cast<const T*>(a.in0);
  const T* in1 = static_cast<const T*>(a.in1);
  const T* in2 = static_cast<const T*>(a.in2);
  T* out = static_cast<T*>(a.out);
  T* out2 = static_cast<T*>(a.out2);
  switch (a.op) {
    case TrainOp::GeluTanh:
      for (int64_t i = begin; i < end; ++i) out[i] = store<T>(gelu(load(in0[i])));
      break;
    case TrainOp::GeluTanhBackward:
      for (int64_t i = begin; i < end; ++i) out[i] = store<T>(gelu_grad(load(in0[i]), load(in1[i])));
      break;
    case TrainOp::SiluMulBackward:
      for (int64_t i = begin; i < end; ++i) {
        const float g = load(in0[i]), u = load(in1[i]), dy = load(in2[i]);
        const float s = 1.0f / (1.0f + exp_cephes(-g));
        const float dg = (dy * u) * (s * (1.0f + g * (1.0f - s)));
        const float du = dy * (g * s);
        out[i] = store<T>(dg);
        out2[i] = store<T>(du);
      }
      break;
  }
}

}  // namespace

void train_scalar(const TrainArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == DType::F32) run<float>(a, begin, end);
  else run<uint16_t>(a, begin, end);
}

}  // namespace flashlm::activation::detail
