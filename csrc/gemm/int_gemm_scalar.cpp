// Scalar references of the integer GEMM kernels (int_gemm_kernels.h): the oracle for the AVX2 and CUDA
// kernels. Plain loops, float32 (int32 for W8A8) accumulation; the epilogues use the same float operations
// in the same order as the AVX2 kernels, so W8A8 and the quantizer match them bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../core/half.h"
#include "int_gemm_kernels.h"

namespace flashlm::gemm {
namespace {

using core::bf16_to_f32;
using core::f32_to_bf16;

float load(const void* p, DType dtype, int64_t i) {
  if (dtype == DType::F32) return static_cast<const float*>(p)[i];
  return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

uint32_t abs_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits & 0x7FFFFFFFu;
}

void store(void* p, DType dtype, int64_t i, float v) {
  if (dtype == DType::F32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  }
}

// round_half_even(v) clamped to [-127, 127]; NaN -> -127, as the AVX2 kernel.
int8_t to_code(float v) {
  const float r = std::nearbyint(v);
  return static_cast<int8_t>(r >= -127.f ? (r <= 127.f ? r : 127.f) : -127.f);
}

void quantize_static_scalar(const QuantizeArgs& a, int64_t m_begin, int64_t m_end) {
  const float s = *a.static_scale;
  for (int64_t m = m_begin; m < m_end; ++m) {
    a.scales[m] = s;
    for (int64_t k = 0; k < a.K; ++k) a.q[m * a.K + k] = to_code(load(a.x, a.x_dtype, m * a.K + k) / s);
  }
}

}  // namespace

// The row's absolute maximum as the largest |x| bit pattern: for floats without their sign bit the integer order
// is the float order, with NaN above infinity, so a NaN anywhere in the row becomes the maximum (fmax would drop
// it) and the row's scale is NaN, as absmax / 127 is in float arithmetic; the GEMM epilogues then write NaN
// for every output of the row. The AVX2 and CUDA quantizers take the same maximum.
void quantize_per_token_scalar(const QuantizeArgs& a, int64_t m_begin, int64_t m_end) {
  if (a.static_scale) return quantize_static_scalar(a, m_begin, m_end);
  for (int64_t m = m_begin; m < m_end; ++m) {
    uint32_t max_bits = 0;
    for (int64_t k = 0; k < a.K; ++k) max_bits = std::max(max_bits, abs_bits(load(a.x, a.x_dtype, m * a.K + k)));
    float absmax;
    std::memcpy(&absmax, &max_bits, 4);
    const float inv = absmax > 0.f ? 127.f / absmax : 0.f;  // NaN: 0, the row's q are 0 (-127 at the NaN)
    a.scales[m] = absmax / 127.f;
    for (int64_t k = 0; k < a.K; ++k) a.q[m * a.K + k] = to_code(load(a.x, a.x_dtype, m * a.K + k) * inv);
  }
}

void int8_gemm_scalar(const Int8Args& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* w = a.w + n * a.K;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.x + m * a.x_stride;
      int32_t acc = 0;
      for (int64_t k = 0; k < a.K; ++k) acc += int32_t(x[k]) * int32_t(w[k]);
      float y = float(acc) * a.x_scales[m] * a.w_scales[n];
      if (a.bias) y = y + a.bias[n];
      store(a.out, a.out_dtype, m * a.N + n, y);
    }
  }
}

void int4_gemm_scalar(const Int4Args& a, int64_t n_begin, int64_t n_end) {
  const int64_t groups = a.K / a.group, half = a.group / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w = a.w + n * (a.K / 2);
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = a.scales[n * groups + g], z = a.zeros ? a.zeros[n * groups + g] : 8.f;
        const uint8_t* b = w + g * half;
        float dot = 0.f;
        for (int64_t j = 0; j < half; ++j) {
          const int64_t k = m * a.K + g * a.group + j;
          dot += (float(b[j] & 15) - z) * load(a.x, a.x_dtype, k);
          dot += (float(b[j] >> 4) - z) * load(a.x, a.x_dtype, k + half);
        }
        acc += dot * s;
      }
      if (a.bias) acc += a.bias[n];
      store(a.out, a.out_dtype, m * a.N + n, acc);
    }
  }
}

}  // namespace flashlm::gemm
