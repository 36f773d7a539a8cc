// MoE kernels on CUDA.
//   Routing: one thread per row of logits (E and k are small): the k largest by repeated selection (ties to the
//   lower index), then the softmax as the scalar kernel computes it. A row with a NaN gets expert -1 (the
//   caller refuses NaN logits before the launch).
//   Expert matmul, grouped by expert as on the CPU (moe.cpp): one CTA counts the rows per expert, scans the
//   counts into offsets and writes the permutation `order` (each expert's rows contiguous, in increasing
//   order) into stream-ordered scratch; then a grouped product whose CTAs take (a tile of kWarps output
//   columns, an expert). Each warp reads row n of its expert's weight (float, or GGML blocks decoded in
//   registers by the decoders shared with the CPU, csrc/gguf/shared_decoders.h) once per kRows of that
//   expert's rows, lane l taking 8-element chunks l, l + 32, ...; a butterfly of shuffles sums the lanes.
//   x is read and y written through `order`, so nothing is gathered or scattered in memory.
// Reference: float64 torch loops per expert (tests/test_moe_kernels.py, CUDA cases).
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
constexpr int kRows = 8;   // rows of one expert that share each decoded chunk of a weight row
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

// Grouping by expert, as the CPU dispatcher's counting sort (moe.cpp): offsets[ex] .. offsets[ex + 1] are
// expert ex's places in the sorted order, order[p] the row at place p (rows of one expert in increasing order).
// One CTA: each thread owns experts threadIdx.x, + blockDim.x, ... and walks all rows twice (count, then
// place); thread 0 scans the counts in between. Rows whose expert is outside [0, E) get no place.
__global__ void group_by_expert_kernel(const int32_t* experts, int64_t r, int64_t e, int64_t* offsets,
                                       int32_t* order) {
  for (int64_t ex = threadIdx.x; ex < e; ex += blockDim.x) {
    int64_t count = 0;
    for (int64_t row = 0; row < r; ++row) count += experts[row] == ex;
    offsets[ex + 1] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int64_t ex = 0; ex < e; ++ex) offsets[ex + 1] += offsets[ex];
  }
  __syncthreads();
  for (int64_t ex = threadIdx.x; ex < e; ex += blockDim.x) {
    int64_t place = offsets[ex];
    for (int64_t row = 0; row < r; ++row)
      if (experts[row] == ex) order[place++] = static_cast<int32_t>(row);
  }
}

// acc[i] += (weight row) . (x row i) over this lane's share of K, for kRows rows of x.
// GGML blocks: lane l decodes chunks l, l + 32, ... of 8 values in registers, once for all the rows.
template <DType X, class D>
struct BlockDot {
  __device__ void operator()(const uint8_t* wrow, const typename Elem<X>::type* const* xr, int64_t k, int lane,
                             float* acc) const {
    for (int64_t c = lane; c < k / 8; c += 32) {
      float wv[8];
      D::chunk8(wrow + (c / D::kChunks) * D::kBytes, static_cast<int>(c % D::kChunks), wv);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[i] += wv[q] * Elem<X>::load(xr[i][c * 8 + q]);
    }
  }
};

// Float weights (any K): lane l takes elements l, l + 32, ...
template <DType X, DType W>
struct FloatDot {
  __device__ void operator()(const uint8_t* wbytes, const typename Elem<X>::type* const* xr, int64_t k, int lane,
                             float* acc) const {
    const auto* wrow = reinterpret_cast<const typename Elem<W>::type*>(wbytes);
    for (int64_t j = lane; j < k; j += 32) {
      const float wv = Elem<W>::load(wrow[j]);
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] += wv * Elem<X>::load(xr[i][j]);
    }
  }
};

// The grouped product: y[order[p], col] = W[ex][col] . x[order[p]] for every place p of expert ex.
// col = blockIdx.x * kWarps + warp; experts blockIdx.y, blockIdx.y + gridDim.y, ...; each warp takes its
// expert's rows kRows at a time (a short last batch repeats its last row and stores only the real ones).
template <DType X, class Dot>
__global__ void grouped_matmul_kernel(const typename Elem<X>::type* x, const int64_t* offsets, const int32_t* order,
                                      const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k, int64_t e,
                                      typename Elem<X>::type* y, Dot dot) {
  using T = typename Elem<X>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = blockIdx.x * static_cast<int64_t>(kWarps) + warp;
  if (col >= n) return;
  for (int64_t ex = blockIdx.y; ex < e; ex += gridDim.y) {
    const uint8_t* wrow = w + (ex * n + col) * row_bytes;
    const int64_t p1 = offsets[ex + 1];
    for (int64_t p = offsets[ex]; p < p1; p += kRows) {
      const int m = static_cast<int>(p1 - p < kRows ? p1 - p : kRows);
      const T* xr[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) xr[i] = x + static_cast<int64_t>(order[p + (i < m ? i : m - 1)]) * k;
      float acc[kRows] = {};
      dot(wrow, xr, k, lane, acc);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int off = 16; off > 0; off /= 2) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
      if (lane == 0)
        for (int i = 0; i < m; ++i) y[static_cast<int64_t>(order[p + i]) * n + col] = Elem<X>::store(acc[i]);
    }
  }
}

// Groups the rows of `a` by expert into scratch, then runs the grouped product; rows with no expert stay zero.
template <DType X, class Dot>
void launch_matmul(const CudaMatmulArgs& a, int64_t row_bytes, Dot dot) {
  const auto stream = static_cast<cudaStream_t>(a.stream);
  StreamScratch scratch{nullptr, stream};
  const size_t offsets_bytes = static_cast<size_t>(a.e + 1) * sizeof(int64_t);
  throw_on_cuda_error(cudaMallocAsync(&scratch.ptr, offsets_bytes + static_cast<size_t>(a.r) * sizeof(int32_t), stream),
                      "moe_expert_matmul: cudaMallocAsync of the grouping");
  auto* offsets = static_cast<int64_t*>(scratch.ptr);
  auto* order = reinterpret_cast<int32_t*>(static_cast<char*>(scratch.ptr) + offsets_bytes);
  using T = typename Elem<X>::type;
  throw_on_cuda_error(cudaMemsetAsync(a.y, 0, static_cast<size_t>(a.r * a.n) * sizeof(T), stream),
                      "moe_expert_matmul: cudaMemsetAsync of y");
  group_by_expert_kernel<<<1, 256, 0, stream>>>(a.experts, a.r, a.e, offsets, order);
  throw_on_cuda_error(cudaGetLastError(), "moe_expert_matmul: grouping kernel launch");
  const dim3 grid(static_cast<unsigned>((a.n + kWarps - 1) / kWarps),
                  static_cast<unsigned>(a.e < kMaxGridY ? a.e : kMaxGridY));
  grouped_matmul_kernel<X><<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(a.x), offsets, order, a.w,
                                                            row_bytes, a.n, a.k, a.e, static_cast<T*>(a.y), dot);
  throw_on_cuda_error(cudaGetLastError(), "moe_expert_matmul: kernel launch");
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
