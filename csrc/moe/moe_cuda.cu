// MoE kernels on CUDA.
//   Routing: one thread per row of logits (E and k are small): the k largest by repeated selection (ties to the
//   lower index), then the softmax as the scalar kernel computes it. A row with a NaN gets expert -1 (the
//   caller refuses NaN logits before the launch).
//   Expert matmul: one warp per output y[r, n], reading row n of W[experts[r]] (float, or GGML blocks decoded
//   in registers by the decoders shared with the CPU, csrc/gguf/shared_decoders.h) in 8-element chunks, lane l
//   taking chunks l, l + 32, ...; a butterfly of shuffles sums the lanes. Rows are not grouped by expert here
//   yet: each row reads its expert's weight on its own.
// Reference: the scalar CPU kernels and float64 torch references (tests/test_moe_kernels.py, CUDA cases).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "../core/cuda_elementwise.cuh"
#include "../core/cuda_guard.h"
#include "../gguf/shared_decoders.h"
#include "flashlm/core/error.h"
#include "moe_kernels.h"

namespace flashlm::moe::detail {
namespace {

using cuda_elementwise::Elem;

constexpr int kWarps = 4;  // warps (outputs) per CTA of the matmul
constexpr int64_t kMaxGridY = 65535;

template <DType L>
__global__ void route_kernel(const typename Elem<L>::type* logits, int64_t t, int64_t e, int64_t k, bool softmax_first, bool renormalize,
                             float* weights, int32_t* experts) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= t) return;
  const auto* l = logits + row * e;
  float* w = weights + row * k;
  int32_t* ex = experts + row * k;
  float mx = -INFINITY;
  bool nan = false;
  for (int64_t j = 0; j < e; ++j) {
    const float v = Elem<L>::load(l[j]);
    nan |= isnan(v);
    mx = fmaxf(mx, v);
  }
  if (nan) {
    for (int64_t i = 0; i < k; ++i) ex[i] = -1, w[i] = 0.f;
    return;
  }
  for (int64_t i = 0; i < k; ++i) {
    int64_t best = -1;
    float bv = 0.f;
    for (int64_t j = 0; j < e; ++j) {
      bool taken = false;
      for (int64_t p = 0; p < i && !taken; ++p) taken = ex[p] == j;
      if (taken) continue;
      const float v = Elem<L>::load(l[j]);
      if (best < 0 || v > bv) best = j, bv = v;
    }
    ex[i] = static_cast<int32_t>(best);
    w[i] = bv;
  }
  float denom = 0.f;
  if (softmax_first) {
    for (int64_t j = 0; j < e; ++j) denom += expf(Elem<L>::load(l[j]) - mx);
  } else {
    for (int64_t i = 0; i < k; ++i) denom += expf(w[i] - mx);
  }
  float kept = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    w[i] = expf(w[i] - mx) / denom;
    kept += w[i];
  }
  if (softmax_first && renormalize)
    for (int64_t i = 0; i < k; ++i) w[i] /= kept;
}

// A weight row's dot product with x's row, summed over the warp's lanes (every lane holds the sum).
// GGML blocks: lane l decodes chunks l, l + 32, ... of 8 values in registers.
template <DType X, class D>
__device__ __forceinline__ float dot_blocks(const uint8_t* wrow, const typename Elem<X>::type* xr, int64_t k, int lane) {
  float acc = 0.f;
  const int64_t chunks = k / 8;
  for (int64_t c = lane; c < chunks; c += 32) {
    float wv[8];
    D::chunk8(wrow + (c / D::kChunks) * D::kBytes, static_cast<int>(c % D::kChunks), wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += wv[i] * Elem<X>::load(xr[c * 8 + i]);
  }
  return acc;
}

// Float weights (any K): lane l takes elements l, l + 32, ...
template <DType X, DType W>
__device__ __forceinline__ float dot_float(const typename Elem<W>::type* wrow, const typename Elem<X>::type* xr, int64_t k, int lane) {
  float acc = 0.f;
  for (int64_t j = lane; j < k; j += 32) acc += Elem<W>::load(wrow[j]) * Elem<X>::load(xr[j]);
  return acc;
}

// y[row, col]: col = blockIdx.x * kWarps + warp, rows blockIdx.y, blockIdx.y + gridDim.y, ...
// `Dot(wrow, xr, k, lane)` is one of the two above; row_bytes is the size of one weight row.
template <DType X, class Dot>
__global__ void expert_matmul_kernel(const typename Elem<X>::type* x, const int32_t* experts, const uint8_t* w, int64_t row_bytes,
                                     int64_t r, int64_t n, int64_t k, int64_t e, typename Elem<X>::type* y, Dot dot) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = blockIdx.x * static_cast<int64_t>(kWarps) + warp;
  if (col >= n) return;
  for (int64_t row = blockIdx.y; row < r; row += gridDim.y) {
    const int32_t ex = experts[row];
    float acc = 0.f;
    if (ex >= 0 && ex < e) acc = dot(w + (static_cast<int64_t>(ex) * n + col) * row_bytes, x + row * k, k, lane);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) y[row * n + col] = Elem<X>::store(acc);
  }
}

template <DType X, DType W>
struct FloatDot {
  __device__ float operator()(const uint8_t* wrow, const typename Elem<X>::type* xr, int64_t k, int lane) const {
    return dot_float<X, W>(reinterpret_cast<const typename Elem<W>::type*>(wrow), xr, k, lane);
  }
};

template <DType X, class D>
struct BlockDot {
  __device__ float operator()(const uint8_t* wrow, const typename Elem<X>::type* xr, int64_t k, int lane) const {
    return dot_blocks<X, D>(wrow, xr, k, lane);
  }
};

template <DType X, class Dot>
void launch_matmul(const CudaMatmulArgs& a, int64_t row_bytes, Dot dot) {
  const dim3 grid(static_cast<unsigned>((a.n + kWarps - 1) / kWarps),
                  static_cast<unsigned>(a.r < kMaxGridY ? a.r : kMaxGridY));
  using T = typename Elem<X>::type;
  expert_matmul_kernel<X><<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), a.experts, a.w, row_bytes, a.r, a.n, a.k, a.e, static_cast<T*>(a.y), dot);
}

template <DType X>
void matmul_for_x(const CudaMatmulArgs& a) {
  switch (a.w_type) {
    case DType::F32: launch_matmul<X>(a, a.k * 4, FloatDot<X, DType::F32>{}); return;
    case DType::F16: launch_matmul<X>(a, a.k * 2, FloatDot<X, DType::F16>{}); return;
    case DType::BF16: launch_matmul<X>(a, a.k * 2, FloatDot<X, DType::BF16>{}); return;
    default: break;
  }
  const bool known = gguf::detail::dispatch_block_type(a.w_type, [&](auto decoder) {
    using D = decltype(decoder);
    launch_matmul<X>(a, a.k / D::kBlock * D::kBytes, BlockDot<X, D>{});
  });
  if (!known) throw NotImplementedError(std::string("moe_expert_matmul: no CUDA kernel for ") + dtype_name(a.w_type));
}

template <DType L>
void launch_route(const RouteArgs& a, void* stream) {
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((a.t + threads - 1) / threads);
  route_kernel<L><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const typename Elem<L>::type*>(a.logits), a.t, a.e, a.k, a.softmax_first, a.renormalize, a.weights, a.experts);
}

}  // namespace

void route_cuda(const RouteArgs& a, int device, void* stream) {
  CudaDeviceGuard guard(device);
  if (a.dtype == DType::F32) launch_route<DType::F32>(a, stream);
  else if (a.dtype == DType::F16) launch_route<DType::F16>(a, stream);
  else launch_route<DType::BF16>(a, stream);
  throw_on_cuda_error(cudaGetLastError(), "moe_route: kernel launch");
}

void expert_matmul_cuda(const CudaMatmulArgs& a) {
  CudaDeviceGuard guard(a.device);
  if (a.x_dtype == DType::F32) matmul_for_x<DType::F32>(a);
  else if (a.x_dtype == DType::F16) matmul_for_x<DType::F16>(a);
  else matmul_for_x<DType::BF16>(a);
  throw_on_cuda_error(cudaGetLastError(), "moe_expert_matmul: kernel launch");
}

}  // namespace flashlm::moe::detail
