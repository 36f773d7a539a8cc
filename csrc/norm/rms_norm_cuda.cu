// CUDA RMSNorm: the scalar kernel's per-element steps (rms_norm_scalar.cpp: residual add rounded to the
// row's dtype, f32 sum of squares, y = h * (1 / sqrt(mean + eps)) rounded to the dtype, times the weight,
// rounded again), with the sum taken in another order (a warp or block tree), so it agrees with the CPU to
// f32 rounding of the mean, not bit for bit. Rows of d <= kWarpRowMax elements get one warp each (8 rows per
// block, no shared memory); longer rows a block of kThreads. Each thread reads 16 bytes at a time where
// every pointer, row stride and d allow it, one element at a time otherwise; a row is read twice, the second
// time mostly from L1/L2, and written once. x, out, residual: F32, F16 or BF16; the weight x's dtype or F32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../core/cuda_elementwise.cuh"
#include "common_cuda.cuh"
#include "rms_norm_kernels.h"

namespace flashlm::norm::detail {
namespace {

using cuda_elementwise::Elem;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWarpRowMax = 1024;

template <class E, int kVec>
struct alignas(sizeof(E) * kVec) Pack {
  E v[kVec];
};

// One row, handled by `lanes` threads numbered `lane`; kVec elements per access (d % kVec == 0 and every
// pointer aligned to its pack when kVec > 1: the launch checks). Returns this thread's part of the sum of
// squares; with a residual, res = round(res + x) is written back and summed.
template <DType T, DType W, int kVec>
__device__ __forceinline__ float square_sum(const typename Elem<T>::type* x, typename Elem<T>::type* res,
                                            int64_t d, int lane, int lanes) {
  using E = typename Elem<T>::type;
  using P = Pack<E, kVec>;
  float sum = 0.0f;
  for (int64_t i = int64_t(lane) * kVec; i < d; i += int64_t(lanes) * kVec) {
    const P xv = *reinterpret_cast<const P*>(x + i);
    P rv;
    if (res) rv = *reinterpret_cast<const P*>(res + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float h = Elem<T>::load(xv.v[j]);
      if (res) {
        rv.v[j] = Elem<T>::store(__fadd_rn(Elem<T>::load(rv.v[j]), h));
        h = Elem<T>::load(rv.v[j]);
      }
      sum = __fadd_rn(sum, __fmul_rn(h, h));
    }
    if (res) *reinterpret_cast<P*>(res + i) = rv;
  }
  return sum;
}

// out = round(w * round(src * inv)) over the same elements square_sum visited (a thread reads back only
// what it wrote itself).
template <DType T, DType W, int kVec>
__device__ __forceinline__ void normalize(const typename Elem<T>::type* src, const typename Elem<W>::type* w,
                                          typename Elem<T>::type* out, int64_t d, float inv, int lane, int lanes) {
  using E = typename Elem<T>::type;
  using WE = typename Elem<W>::type;
  for (int64_t i = int64_t(lane) * kVec; i < d; i += int64_t(lanes) * kVec) {
    const Pack<E, kVec> sv = *reinterpret_cast<const Pack<E, kVec>*>(src + i);
    const Pack<WE, kVec> wv = *reinterpret_cast<const Pack<WE, kVec>*>(w + i);
    Pack<E, kVec> ov;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float y = Elem<T>::load(Elem<T>::store(__fmul_rn(Elem<T>::load(sv.v[j]), inv)));
      ov.v[j] = Elem<T>::store(__fmul_rn(Elem<W>::load(wv.v[j]), y));
    }
    *reinterpret_cast<Pack<E, kVec>*>(out + i) = ov;
  }
}

__device__ __forceinline__ float inv_rms(float sum, int64_t d, float eps) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(sum, float(d)), eps)));
}

// kBlockRow: a block of kThreads per row; else a warp per row, kWarps rows per block. Grid-stride over rows.
template <DType T, DType W, int kVec, bool kBlockRow>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(RMSNormArgs a) {
  using E = typename Elem<T>::type;
  using WE = typename Elem<W>::type;
  __shared__ float warp_sums[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows_per_block = kBlockRow ? 1 : kWarps;
  const int64_t first = blockIdx.x * rows_per_block + (kBlockRow ? 0 : warp);
  const int row_lane = kBlockRow ? int(threadIdx.x) : lane;
  const int row_lanes = kBlockRow ? kThreads : 32;
  for (int64_t r = first; r < a.rows; r += int64_t(gridDim.x) * rows_per_block) {  // uniform per warp/block
    const E* x = static_cast<const E*>(a.x) + r * a.x_stride;
    E* out = static_cast<E*>(a.out) + r * a.out_stride;
    E* res = a.residual ? static_cast<E*>(a.residual) + r * a.residual_stride : nullptr;
    const float part = square_sum<T, W, kVec>(x, res, a.d, row_lane, row_lanes);
    // A block's sum ends with a barrier: warp_sums is rewritten by the next row, and x is fully read before out
    // (maybe x) is written.
    const float sum = kBlockRow ? block_sum<kWarps>(part, warp_sums) : warp_sum(part);
    normalize<T, W, kVec>(res ? res : x, static_cast<const WE*>(a.weight), out, a.d, inv_rms(sum, a.d, a.eps),
                          row_lane, row_lanes);
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

template <DType T, DType W, int kVec>
void launch_rows(const RMSNormArgs& a, int device, cudaStream_t stream) {
  if (a.d > kWarpRowMax) {
    const unsigned grid = cuda_elementwise::grid_for(a.rows, 1, device, "rms_norm");
    rms_norm_kernel<T, W, kVec, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    const unsigned grid = cuda_elementwise::grid_for(a.rows, kWarps, device, "rms_norm");
    rms_norm_kernel<T, W, kVec, false><<<grid, kThreads, 0, stream>>>(a);
  }
}

// 16-byte accesses where every row of every view starts on its pack's alignment, else one element at a time.
template <DType T, DType W>
void launch(const RMSNormArgs& a, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(typename Elem<T>::type);
  const int64_t tb = kVec * sizeof(typename Elem<T>::type), wb = kVec * sizeof(typename Elem<W>::type);
  const bool vec = a.d % kVec == 0 && a.x_stride % kVec == 0 && a.out_stride % kVec == 0 &&
                   a.residual_stride % kVec == 0 && aligned(a.x, tb) && aligned(a.out, tb) &&
                   (!a.residual || aligned(a.residual, tb)) && aligned(a.weight, wb);
  if (vec)
    launch_rows<T, W, kVec>(a, device, stream);
  else
    launch_rows<T, W, 1>(a, device, stream);
}

// Backward: a block of kThreads per row (grid-stride), one element at a time. The two row sums (x^2, then
// (dout * w) * y) are block trees; dweight gathers dout * y of every row by atomicAdd (its order varies).
template <DType T, DType W>
__global__ void __launch_bounds__(kThreads) rms_norm_backward_kernel(RMSNormBackwardArgs a, float* dweight) {
  using E = typename Elem<T>::type;
  using WE = typename Elem<W>::type;
  __shared__ float warp_sums[kWarps];
  const auto* w = static_cast<const WE*>(a.weight);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const E* x = static_cast<const E*>(a.x) + r * a.d;
    const E* dout = static_cast<const E*>(a.dout) + r * a.d;
    E* dx = static_cast<E*>(a.dx) + r * a.d;
    float part = 0.0f;
    for (int64_t i = threadIdx.x; i < a.d; i += kThreads) {
      const float h = Elem<T>::load(x[i]);
      part = __fadd_rn(part, __fmul_rn(h, h));
    }
    const float inv = inv_rms(block_sum<kWarps>(part, warp_sums), a.d, a.eps);
    part = 0.0f;
    for (int64_t i = threadIdx.x; i < a.d; i += kThreads)
      part += (Elem<T>::load(dout[i]) * Elem<W>::load(w[i])) * (Elem<T>::load(x[i]) * inv);
    const float c = block_sum<kWarps>(part, warp_sums) / float(a.d);
    for (int64_t i = threadIdx.x; i < a.d; i += kThreads) {
      const float dy = Elem<T>::load(dout[i]), xh = Elem<T>::load(x[i]) * inv;
      atomicAdd(dweight + i, dy * Elem<T>::load(Elem<T>::store(xh)));
      dx[i] = Elem<T>::store(inv * (dy * Elem<W>::load(w[i]) - xh * c));
    }
  }
}

template <DType T, DType W>
void launch_backward(const RMSNormBackwardArgs& a, float* dweight, int device, cudaStream_t stream) {
  throw_on_cuda_error(cudaMemsetAsync(dweight, 0, size_t(a.d) * sizeof(float), stream), "rms_norm_backward: memset");
  if (a.rows == 0) return;
  const unsigned grid = cuda_elementwise::grid_for(a.rows, 1, device, "rms_norm_backward");
  rms_norm_backward_kernel<T, W><<<grid, kThreads, 0, stream>>>(a, dweight);
}

}  // namespace

void rms_norm_backward_cuda(const RMSNormBackwardArgs& a, float* dweight, int device, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  launch_norm("rms_norm_backward", a.dtype, a.weight_dtype, device, [&](auto types) {
    using Types = decltype(types);
    launch_backward<Types::kX, Types::kWeight>(a, dweight, device, st);
  });
}

void rms_norm_cuda(const RMSNormArgs& a, int device, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  launch_norm("rms_norm", a.dtype, a.weight_dtype, device, [&](auto types) {
    using Types = decltype(types);
    launch<Types::kX, Types::kWeight>(a, device, st);
  });
}

}  // namespace flashlm::norm::detail
