// Scalar silu_mul: the reference for the AVX2 kernel (bit for bit) and the CUDA kernel (to rounding).
#include <cstdint>
#include <cstring>
#include <limits>

#include "../core/half.h"
#include "silu_mul_kernels.h"

namespace flashlm::activation::detail {
namespace {

using core::bf16_to_f32;
using core::f32_to_bf16;

float exp_cephes(float x) {
  if (x != x) return x;
  if (x > kExpHi) return std::numeric_limits<float>::infinity();
  x = x < kExpLo ? kExpLo : x;
  // round to nearest even (|x * log2e| < 2^22): the 1.5 * 2^23 trick, as _mm256_round_ps does it
  const float k = (x * kLog2e + 12582912.0f) - 12582912.0f;
  float r = x - k * kLn2Hi;
  r = r - k * kLn2Lo;
  const float z = r * r;
  float p = kExpP[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpP[i];
  p = p * z + r;
  p = p + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

float silu(float g) { return g / (1.0f + exp_cephes(-g)); }

}  // namespace

void silu_mul_scalar(const SiluMulArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == DType::F32) {
    const auto* g = static_cast<const float*>(a.gate);
    const auto* u = static_cast<const float*>(a.up);
    auto* o = static_cast<float*>(a.out);
    for (int64_t i = begin; i < end; ++i) o[i] = silu(g[i]) * u[i];
    return;
  }
  const auto* g = static_cast<const uint16_t*>(a.gate);
  const auto* u = static_cast<const uint16_t*>(a.up);
  auto* o = static_cast<uint16_t*>(a.out);
  for (int64_t i = begin; i < end; ++i) {
    const float s = bf16_to_f32(f32_to_bf16(silu(bf16_to_f32(g[i]))));
    o[i] = f32_to_bf16(s * bf16_to_f32(u[i]));
  }
}

}  // namespace flashlm::activation::detail
