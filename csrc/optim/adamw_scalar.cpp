// The scalar AdamW kernel: the oracle for the AVX2 (adamw_avx2.cpp) and CUDA (adamw_cuda.cu) kernels, which
// do the same f32 operations in the same order (the library is compiled with -ffp-contract=off, so none is
// fused into an FMA) and match it bit for bit.
#include <cmath>
#include <cstdint>

#include "../core/half.h"
#include "adamw_kernels.h"

namespace flashlm::optim::detail {
namespace {

using core::bf16_to_f32;
using core::f32_to_bf16;

template <class T, class Load, class Store>
void adamw_loop(T* p, const T* g, float* m, float* v, int64_t n, const AdamWScalars& s, Load load, Store store) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = load(g[i]);
    if (s.maximize) gi = -gi;
    float pi = load(p[i]);
    if (s.apply_decay) pi = pi * s.decay;
    const float mi = m[i] + s.one_minus_beta1 * (gi - m[i]);
    const float vi = v[i] * s.beta2 + s.one_minus_beta2 * gi * gi;
    const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = store(pi + (s.neg_step_size * mi) / denom);
  }
}

}  // namespace

void adamw_scalar(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  switch (dtype) {
    case DType::F32:
      adamw_loop(static_cast<float*>(p), static_cast<const float*>(g), m, v, n, s, [](float x) { return x; },
                 [](float x) { return x; });
      break;
    case DType::BF16:
      adamw_loop(static_cast<uint16_t*>(p), static_cast<const uint16_t*>(g), m, v, n, s,
                 [](uint16_t h) { return bf16_to_f32(h); }, [](float x) { return f32_to_bf16(x); });
      break;
    default:
      break;  // the dispatcher checked the dtype
  }
}

}  // namespace flashlm::optim::detail
