// The AdamW kernels' shared internals: the per-step scalars (computed once in double, then rounded to
// f32, as torch rounds its Python-float scalars for f32 tensors) and the kernel entry points. Every kernel
// does the same f32 operations in the same order without contraction, so the scalar, AVX2 and CUDA
// kernels agree bit for bit.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::optim::detail {

struct AdamWScalars {
  float decay = 1.0f;           // 1 - lr * weight_decay
  bool apply_decay = false;     // weight_decay != 0
  float one_minus_beta1 = 0.1f;
  float beta2 = 0.999f;
  float one_minus_beta2 = 0.001f;
  float neg_step_size = 0.0f;   // -lr / (1 - beta1^step)
  float bc2_sqrt = 1.0f;        // sqrt(1 - beta2^step)
  float eps = 1e-8f;
  bool maximize = false;
};

// n elements of one parameter: p and g of `dtype`, m and v f32.
void adamw_scalar(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const AdamWScalars& s);
void adamw_avx2(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const AdamWScalars& s);
void adamw_cuda(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const AdamWScalars& s, int device,
                void* stream);

}  // namespace flashlm::optim::detail
