// The scalar MoE kernels: routing (softmax and top-k per row), the float expert rows (the oracle of the
// AVX2 version) and the gate activation.
#include <cmath>
#include <string>

#include "../core/half.h"
#include "flashlm/core/error.h"
#include "moe_kernels.h"

namespace flashlm::moe::detail {

namespace {

float load(const void* p, DType dtype, int64_t i) {
  if (dtype == DType::BF16) return core::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

}  // namespace

void route_scalar(const RouteArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t base = t * a.e;
    float mx = -INFINITY;
    for (int64_t j = 0; j < a.e; ++j) {
      const float v = load(a.logits, a.dtype, base + j);
      if (std::isnan(v)) throw ValueError("router_logits: row " + std::to_string(t) + " holds a NaN");
      mx = v > mx ? v : mx;
    }
    float* w = a.weights + t * a.k;
    int32_t* ex = a.experts + t * a.k;
    // Top k by repeated selection: the first largest value not taken yet, so ties go to the lower index.
    // k is small (1-8 in today's models) and E at most a few hundred.
    for (int64_t i = 0; i < a.k; ++i) {
      int64_t best = -1;
      float bv = 0.f;
      for (int64_t j = 0; j < a.e; ++j) {
        bool taken = false;
        for (int64_t p = 0; p < i && !taken; ++p) taken = ex[p] == j;
        if (taken) continue;
        const float v = load(a.logits, a.dtype, base + j);
        if (best < 0 || v > bv) best = j, bv = v;
      }
      ex[i] = static_cast<int32_t>(best);
      w[i] = bv;
    }
    // Softmax over all E (the kept ones' probabilities) or over the kept k; both relative to the largest logit,
    // which is kept in either case.
    float denom = 0.f;
    if (a.softmax_first) {
      for (int64_t j = 0; j < a.e; ++j) denom += std::exp(load(a.logits, a.dtype, base + j) - mx);
    } else {
      for (int64_t i = 0; i < a.k; ++i) denom += std::exp(w[i] - mx);
    }
    float kept = 0.f;
    for (int64_t i = 0; i < a.k; ++i) {
      w[i] = std::exp(w[i] - mx) / denom;
      kept += w[i];
    }
    if (a.softmax_first && a.renormalize)
      for (int64_t i = 0; i < a.k; ++i) w[i] /= kept;
  }
}

void float_rows_scalar(const FloatRowsArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t i = 0; i < a.m; ++i) {
      const float* x = a.x + i * a.k;
      float acc = 0.f;
      if (a.type == DType::BF16) {
        const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * a.k;
        for (int64_t j = 0; j < a.k; ++j) acc += x[j] * core::bf16_to_f32(w[j]);
      } else {
        const float* w = static_cast<const float*>(a.w) + n * a.k;
        for (int64_t j = 0; j < a.k; ++j) acc += x[j] * w[j];
      }
      a.y[i * a.ldy + n] = acc;
    }
  }
}

void activation_mul(int activation, float* g, const float* u, int64_t n) {
  if (activation == 0) {
    for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  } else {  // gelu with the tanh approximation, as torch's gelu(approximate="tanh")
    constexpr float kSqrt2OverPi = 0.7978845608028654f, kCoeff = 0.044715f;
    for (int64_t i = 0; i < n; ++i) {
      const float v = g[i];
      g[i] = 0.5f * v * (1.f + std::tanh(kSqrt2OverPi * (v + kCoeff * v * v * v))) * u[i];
    }
  }
}

}  // namespace flashlm::moe::detail
