// The CPU activation kernels' exp, scalar form: Cephes' expf with the constants of silu_mul_kernels.h, each
// step one rounded f32 operation in the AVX2 form's order (cephes_exp_avx2.h), so both give the same bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "silu_mul_kernels.h"

namespace flashlm::activation::detail {
namespace {

inline float exp_cephes(float x) {
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

}  // namespace
}  // namespace flashlm::activation::detail
