// GGUF matmul on CUDA.
//   Small M (<= 8 rows of x per launch row): a GEMV kernel, one warp per output column n (a row of W). The
//   warp walks the row's blocks in 8-element chunks, lane l taking chunks l, l + 32, ...: consecutive lanes
//   read consecutive bytes of the blocks and consecutive 16-byte pieces of x, so both streams coalesce.
//   Each chunk is decoded in registers by the decoders shared with the CPU (csrc/gguf/shared_decoders.h)
//   and multiplied with up to 8 rows of x; a butterfly of shuffles sums the lanes.
//   Larger M with f16/bf16 x: the blocks are dequantized into a scratch W (cudaMallocAsync on the stream,
//   flashlm's CUDA dequantizer) and multiplied by the tensor-core GEMM of gguf_matmul_mma_cuda.cu.
//   f32 x at any M (and x that is not 16-byte aligned) takes the GEMV kernel in groups of 8 rows.
// Reference: the CPU path and a float64 torch reference (tests/test_gguf_matmul.py, CUDA tests).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "../core/cuda_guard.h"
#include "../gguf/shared_decoders.h"
#include "flashlm/core/error.h"
#include "flashlm/gguf/dequantize.h"
#include "gguf_matmul_kernels.h"

namespace flashlm::gemm::detail {
namespace {

using gguf::detail::Decoder;

constexpr int kWarps = 4;        // warps (output columns) per CTA
constexpr int kMaxRows = 8;      // rows of x per GEMV launch row
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kGemvMaxM = 8;  // above this, f16/bf16 x goes through dequantize + tensor-core GEMM

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("gguf_matmul: ") + what + ": " + cudaGetErrorString(err));
}

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}

template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

// 8 consecutive elements of x as floats. kVec: x is 16-byte aligned (k is a multiple of 32, so every chunk
// of 8 is too for 2-byte types; f32 chunks are two 16-byte loads).
template <class T, bool kVec>
__device__ __forceinline__ void load8(const T* p, float* v) {
  if constexpr (kVec && sizeof(T) == 2) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
  } else if constexpr (kVec) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(p[i]);
  }
}

// y[m0 + r, col] = sum_k x[m0 + r, k] * W[col, k] (+ bias[col]) for r < rows (<= kRows); grid (ceil(n /
// kWarps), row groups), block kWarps * 32 threads.
template <DType Type, class T, int kRows, bool kVec>
__global__ void __launch_bounds__(kWarps * 32) gguf_gemv_kernel(const uint8_t* __restrict__ w, const T* __restrict__ x,
                                                                const T* __restrict__ bias, T* __restrict__ y,
                                                                int64_t m, int64_t n, int64_t k, int64_t m_base) {
  using D = Decoder<Type>;
  const int lane = threadIdx.x % 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t m0 = m_base + static_cast<int64_t>(blockIdx.y) * kRows;
  if (col >= n || m0 >= m) return;  // whole warps leave together: no shuffle below misses a lane
  const int rows = static_cast<int>(m - m0 < kRows ? m - m0 : kRows);
  const int64_t nb = k / D::kBlock, chunks = nb * D::kChunks;
  const uint8_t* wrow = w + col * nb * D::kBytes;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  for (int64_t c = lane; c < chunks; c += 32) {
    float wv[8];
    D::chunk8(wrow + (c / D::kChunks) * D::kBytes, static_cast<int>(c % D::kChunks), wv);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) {
        float xv[8];
        load8<T, kVec>(x + (m0 + r) * k + 8 * c, xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r] = fmaf(wv[i], xv[i], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  }
  if (lane == 0) {
    const float b = bias ? to_float(bias[col]) : 0.0f;
    for (int r = 0; r < rows; ++r) y[(m0 + r) * n + col] = from_float<T>(acc[r] + b);
  }
}

template <DType Type, class T, int kRows, bool kVec>
void launch_gemv(const CudaArgs& a, cudaStream_t stream) {
  const int64_t row_groups = (a.m + kRows - 1) / kRows;
  const dim3 block(kWarps * 32);
  const int64_t grid_x = (a.n + kWarps - 1) / kWarps;
  FLASHLM_CHECK(grid_x <= 0x7FFFFFFF, "gguf_matmul: N (", a.n, ") is too large for one launch");
  // gridDim.y is at most 65535: larger M is covered by several launches.
  for (int64_t g0 = 0; g0 < row_groups; g0 += kMaxGridY) {
    const int64_t gy = std::min<int64_t>(kMaxGridY, row_groups - g0);
    gguf_gemv_kernel<Type, T, kRows, kVec><<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(gy)), block, 0, stream>>>(
        a.w, static_cast<const T*>(a.x), static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.m, a.n, a.k, g0 * kRows);
    check_cuda(cudaGetLastError(), "GEMV launch");
  }
}

// Rows of x per launch row: the smallest power of two >= M (up to 8), so small M wastes no registers.
template <DType Type, class T, bool kVec>
void gemv_rows(const CudaArgs& a, cudaStream_t stream) {
  if (a.m <= 1) launch_gemv<Type, T, 1, kVec>(a, stream);
  else if (a.m <= 2) launch_gemv<Type, T, 2, kVec>(a, stream);
  else if (a.m <= 4) launch_gemv<Type, T, 4, kVec>(a, stream);
  else launch_gemv<Type, T, kMaxRows, kVec>(a, stream);
}

template <DType Type>
void gemv(const CudaArgs& a, bool aligned, cudaStream_t stream) {
  auto by_dtype = [&](auto vec) {
    constexpr bool kVec = decltype(vec)::value;
    if (a.dtype == DType::F16) gemv_rows<Type, __half, kVec>(a, stream);
    else if (a.dtype == DType::BF16) gemv_rows<Type, __nv_bfloat16, kVec>(a, stream);
    else gemv_rows<Type, float, kVec>(a, stream);
  };
  if (aligned) by_dtype(std::true_type{});
  else by_dtype(std::false_type{});
}

void gemv_any(const CudaArgs& a, bool aligned, cudaStream_t stream) {
  switch (a.type) {
    case DType::Q4_0: gemv<DType::Q4_0>(a, aligned, stream); break;
    case DType::Q4_1: gemv<DType::Q4_1>(a, aligned, stream); break;
    case DType::Q5_0: gemv<DType::Q5_0>(a, aligned, stream); break;
    case DType::Q5_1: gemv<DType::Q5_1>(a, aligned, stream); break;
    case DType::Q8_0: gemv<DType::Q8_0>(a, aligned, stream); break;
    case DType::Q4_K: gemv<DType::Q4_K>(a, aligned, stream); break;
    case DType::Q5_K: gemv<DType::Q5_K>(a, aligned, stream); break;
    case DType::Q6_K: gemv<DType::Q6_K>(a, aligned, stream); break;
    default: throw ValueError(std::string("gguf_matmul: no CUDA kernel for ") + dtype_name(a.type));
  }
}

}  // namespace

void gguf_matmul_cuda(const CudaArgs& a) {
  CudaDeviceGuard guard(a.device);
  auto stream = static_cast<cudaStream_t>(a.stream);
  const bool aligned = reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  const bool half = a.dtype == DType::F16 || a.dtype == DType::BF16;
  if (a.m <= kGemvMaxM || !half || !aligned || a.k == 0) {
    gemv_any(a, aligned, stream);
    return;
  }
  // Dequantize W [n, k] into a scratch of x's dtype, then the tensor-core GEMM.
  void* scratch = nullptr;
  check_cuda(cudaMallocAsync(&scratch, static_cast<size_t>(a.n * a.k * 2), stream), "cudaMallocAsync");
  try {
    const Device device{DeviceType::CUDA, a.device};
    dequantize(TensorView::contiguous(const_cast<uint8_t*>(a.w), a.type, {a.n, a.k}, device),
               TensorView::contiguous(scratch, a.dtype, {a.n, a.k}, device), stream);
    gemm_nt_mma_cuda(a.x, scratch, a.bias, a.y, a.dtype, a.m, a.n, a.k, stream);
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check_cuda(cudaFreeAsync(scratch, stream), "cudaFreeAsync");
}

}  // namespace flashlm::gemm::detail
