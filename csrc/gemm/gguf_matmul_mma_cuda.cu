// A plain tensor-core GEMM for the GGUF matmul's large-M path: c[m, n] = a[m, k] @ b[n, k].T (+ bias), f16 or
// bf16 in and out, float32 accumulation, with mma.sync.m16n8k16 (sm_80+).
//
// A CTA of 4 warps computes a 64 x 64 tile of c, a warp a 32 x 32 quarter (2 x 4 mma tiles). Each step
// stages a 64 x 32 slice of a and of b in shared memory with 16-byte loads (rows past m or n read as zeros;
// k is a multiple of 32, every GGUF block type's size divides it), and each warp reads its fragments with
// 32-bit loads. Rows are padded to 40 elements (80 bytes, 20 banks): the 8 rows x 4 words of one fragment
// load hit 32 different banks.
// Fragment layouts (PTX ISA, mma.m16n8k16 with .f16/.bf16): lane l has g = l / 4, t = l % 4;
//   A (row major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (column major, i.e. b's rows): b0 = B^T[g][2t..2t+1], b1 = B^T[g][2t+8..]
//   C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// Reference: tests/test_gguf_matmul.py (CUDA tests against float64 torch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "../core/cuda_mma.cuh"
#include "flashlm/core/error.h"
#include "gguf_matmul_kernels.h"

namespace flashlm::gemm::detail {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kThreads = 128;
constexpr int kStride = kTileK + 8;  // padded shared-memory row, in elements

using cuda_mma::mma_16816;

// A 64 x 32 slice (rows [row0, row0 + 64), columns [k0, k0 + 32)) of a [rows, k] matrix into shared memory;
// rows at or past `rows` become zeros.
template <class T>
__device__ __forceinline__ void stage(T (*dst)[kStride], const T* src, int64_t row0, int64_t rows, int64_t k, int64_t k0) {
  for (int i = threadIdx.x; i < kTileM * kTileK / 8; i += kThreads) {
    const int r = i / (kTileK / 8), c = (i % (kTileK / 8)) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * k + k0 + c);
    *reinterpret_cast<uint4*>(&dst[r][c]) = v;
  }
}

template <class T>
__device__ __forceinline__ uint32_t ld32(const T* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <class T>
__global__ void __launch_bounds__(kThreads) gemm_nt_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                           const T* __restrict__ bias, T* __restrict__ c, int64_t m,
                                                           int64_t n, int64_t k) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  __shared__ __align__(16) T sa[kTileM][kStride];
  __shared__ __align__(16) T sb[kTileN][kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // the warp's quarter of the tile
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  float acc[2][4][4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    stage(sa, a, m0, m, k, k0);
    stage(sb, b, n0, n, k, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      uint32_t fa[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = wm + 16 * i + g;
        fa[i][0] = ld32(&sa[r][kk + 2 * t]);
        fa[i][1] = ld32(&sa[r + 8][kk + 2 * t]);
        fa[i][2] = ld32(&sa[r][kk + 2 * t + 8]);
        fa[i][3] = ld32(&sa[r + 8][kk + 2 * t + 8]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = wn + 8 * j + g;
        const uint32_t b0 = ld32(&sb[col][kk + 2 * t]), b1 = ld32(&sb[col][kk + 2 * t + 8]);
#pragma unroll
        for (int i = 0; i < 2; ++i) mma_16816<kBf16>(acc[i][j], fa[i], b0, b1);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int h = 0; h < 4; ++h) {  // c0, c1: row g; c2, c3: row g + 8
        const int64_t row = m0 + wm + 16 * i + g + (h / 2) * 8, col = n0 + wn + 8 * j + 2 * t + h % 2;
        if (row < m && col < n) {
          float v = acc[i][j][h];
          if (bias) v += static_cast<float>(bias[col]);
          c[row * n + col] = static_cast<T>(v);
        }
      }
    }
  }
}

template <class T>
void launch(const void* a, const void* b, const void* bias, void* c, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  const int64_t grid_x = (n + kTileN - 1) / kTileN;
  FLASHLM_CHECK(grid_x <= 0x7FFFFFFF, "gguf_matmul: N (", n, ") is too large for one GEMM launch");
  // gridDim.y is at most 65535: taller outputs take several launches of 65535 row tiles.
  constexpr int64_t kRowsPerLaunch = 65535 * int64_t(kTileM);
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerLaunch) {
    const int64_t rows = m - r0 < kRowsPerLaunch ? m - r0 : kRowsPerLaunch;
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>((rows + kTileM - 1) / kTileM));
    gemm_nt_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a) + r0 * k, static_cast<const T*>(b),
                                                     static_cast<const T*>(bias), static_cast<T*>(c) + r0 * n, rows, n, k);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw Error(std::string("gguf_matmul: GEMM launch: ") + cudaGetErrorString(err));
  }
}

}  // namespace

void gemm_nt_mma_cuda(const void* a, const void* b, const void* bias, void* c, DType dtype, int64_t m, int64_t n,
                      int64_t k, void* stream) {
  FLASHLM_CHECK(k % kTileK == 0, "gguf_matmul: GEMM needs K a multiple of ", kTileK, ", got ", k);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::BF16) launch<__nv_bfloat16>(a, b, bias, c, m, n, k, s);
  else if (dtype == DType::F16) launch<__half>(a, b, bias, c, m, n, k, s);
  else throw ValueError("gguf_matmul: the tensor-core GEMM takes float16 or bfloat16");
}

}  // namespace flashlm::gemm::detail
