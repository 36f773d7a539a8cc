// CUDA AdamW: the scalar kernel's f32 operations (adamw_scalar.cpp) in the same order, each explicitly
// rounded (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn: never contracted into an FMA), so it matches the CPU
// kernels bit for bit. Memory-bound: each thread takes 4 elements per iteration with 16-byte loads and
// stores of the moments (and 16- or 8-byte ones of param and grad) where every pointer is 16-byte aligned,
// and one element at a time otherwise, in a grid-stride loop sized to the device. Param and grad are F32,
// F16 or BF16; the moments F32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "../core/cuda_elementwise.cuh"
#include "adamw_kernels.h"

namespace flashlm::optim::detail {
namespace {

constexpr int kThreads = 256;

void check(cudaError_t err, const char* what) { throw_on_cuda_error(err, std::string("adamw_step: ") + what); }

using cuda_elementwise::Elem;

// One element: updates m and v and returns the new param value.
__device__ __forceinline__ float update(float p, float g, float& m, float& v, const AdamWScalars& s) {
  if (s.maximize) g = -g;
  if (s.apply_decay) p = __fmul_rn(p, s.decay);
  m = __fadd_rn(m, __fmul_rn(s.one_minus_beta1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
  return __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, m), denom));
}

// Four elements per thread and iteration; every pointer 16-byte aligned (launch checked).
template <DType T>
__global__ void __launch_bounds__(kThreads) adamw_vec4_kernel(typename Elem<T>::type* __restrict__ p,
                                                              const typename Elem<T>::type* __restrict__ g,
                                                              float* __restrict__ m, float* __restrict__ v,
                                                              int64_t groups, AdamWScalars s) {
  using E = typename Elem<T>::type;
  struct alignas(4 * sizeof(E)) Vec4 {
    E x[4];
  };
  for (int64_t k = blockIdx.x * int64_t(kThreads) + threadIdx.x; k < groups; k += int64_t(gridDim.x) * kThreads) {
    Vec4 pv = reinterpret_cast<const Vec4*>(p)[k];
    const Vec4 gv = reinterpret_cast<const Vec4*>(g)[k];
    float4 mv = reinterpret_cast<const float4*>(m)[k], vv = reinterpret_cast<const float4*>(v)[k];
    float* mf = &mv.x;
    float* vf = &vv.x;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      pv.x[j] = Elem<T>::store(update(Elem<T>::load(pv.x[j]), Elem<T>::load(gv.x[j]), mf[j], vf[j], s));
    reinterpret_cast<Vec4*>(p)[k] = pv;
    reinterpret_cast<float4*>(m)[k] = mv;
    reinterpret_cast<float4*>(v)[k] = vv;
  }
}

template <DType T>
__global__ void __launch_bounds__(kThreads) adamw_scalar_kernel(typename Elem<T>::type* __restrict__ p,
                                                                const typename Elem<T>::type* __restrict__ g,
                                                                float* __restrict__ m, float* __restrict__ v, int64_t n,
                                                                AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    float mi = m[i], vi = v[i];
    p[i] = Elem<T>::store(update(Elem<T>::load(p[i]), Elem<T>::load(g[i]), mi, vi, s));
    m[i] = mi;
    v[i] = vi;
  }
}

unsigned grid_for(int64_t work, int device) { return cuda_elementwise::grid_for(work, kThreads, device, "adamw_step"); }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <DType T>
void launch(void* param, const void* grad, float* m, float* v, int64_t n, const AdamWScalars& s, int device,
            cudaStream_t stream) {
  using E = typename Elem<T>::type;
  auto* p = static_cast<E*>(param);
  auto* g = static_cast<const E*>(grad);
  // A 4-element group of a 16-bit type is 8 bytes: param and grad then need only 8-byte alignment, but
  // requiring 16 of every pointer keeps one rule (torch's allocations are 256-byte aligned).
  int64_t head = 0;
  if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
    const int64_t groups = n / 4;
    if (groups > 0) adamw_vec4_kernel<T><<<grid_for(groups, device), kThreads, 0, stream>>>(p, g, m, v, groups, s);
    head = groups * 4;
  }
  if (head < n)
    adamw_scalar_kernel<T><<<grid_for(n - head, device), kThreads, 0, stream>>>(p + head, g + head, m + head, v + head,
                                                                                n - head, s);
}

}  // namespace

void adamw_cuda(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const AdamWScalars& s, int device,
                void* stream) {
  CudaDeviceGuard guard(device);
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32: launch<DType::F32>(p, g, m, v, n, s, device, st); break;
    case DType::F16: launch<DType::F16>(p, g, m, v, n, s, device, st); break;
    case DType::BF16: launch<DType::BF16>(p, g, m, v, n, s, device, st); break;
    default: throw ValueError("adamw_step: param dtype must be F32, F16 or BF16");
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace flashlm::optim::detail
