// Scalar silu_mul: the reference for the AVX2 kernel (bit for bit) and the CUDA kernel (to rounding).
#include <cstdint>

#include "../core/half.h"
#include "cephes_exp.h"
#include "silu_mul_kernels.h"

namespace flashlm::activation::detail {
namespace {

using core::bf16_to_f32;
using core::f32_to_bf16;

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
