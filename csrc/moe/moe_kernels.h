// Internal entry points of the MoE kernels (moe.cpp checks the arguments, groups rows by expert and routes
// between them).
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::moe::detail {

// Routing of rows [t0, t1) of logits [T, E]; see moe_route. Throws ValueError for a row with a NaN.
struct RouteArgs {
  const void* logits;
  DType dtype;
  int64_t t, e, k;
  bool softmax_first, renormalize;
  float* weights;    // [T, k]
  int32_t* experts;  // [T, k]
};
void route_scalar(const RouteArgs& a, int64_t t0, int64_t t1);
void route_cuda(const RouteArgs& a, int device, void* stream);

// One expert's float weight w [N, K] (F32 or BF16) times m rows of x (f32, K apart): y[i * ldy + n] for
// i < m, n in [n0, n1), accumulated in f32.
struct FloatRowsArgs {
  DType type;
  const void* w;
  int64_t k;
  const float* x;
  int64_t m;
  float* y;
  int64_t ldy;
};
void float_rows_scalar(const FloatRowsArgs& a, int64_t n0, int64_t n1);
// Returns false where the build has no AVX2 kernels (the caller falls back to scalar).
bool float_rows_avx2(const FloatRowsArgs& a, int64_t n0, int64_t n1);

// act(g) * u in place of g, n values (f32).
void activation_mul(int activation, float* g, const float* u, int64_t n);

// CUDA: y[r] = W[experts[r]] @ x[r] for r < R (R < 2^31), the rows grouped by expert on the device; rows
// whose expert is outside [0, E) are left at zero.
struct CudaMatmulArgs {
  const void* x;
  DType x_dtype;  // F32, F16 or BF16; y has it too
  const int32_t* experts;
  const uint8_t* w;  // E * N rows of K values of w_type (float or GGML blocks)
  DType w_type;
  int64_t r, n, k, e;
  void* y;
  int device;
  void* stream;
};
void expert_matmul_cuda(const CudaMatmulArgs& a);

}  // namespace flashlm::moe::detail
