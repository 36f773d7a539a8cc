// CUDA W4A16: y = x @ dequantize(W).T + bias, W int4 in the layout of int_gemm.h, x and y f16 or bf16.
// Reference: int4_gemm_scalar (int_gemm_scalar.cpp); tested by tests/test_int_gemm.py (CUDA-marked tests).
//
// - M <= 8 (decode), memory-bound: one warp per output column; each lane reads 16 weight bytes at a time
//   (32 elements of one group: 16 low nibbles at j0 .. j0+15 and 16 high nibbles at j0 + group/2 ..),
//   dequantizes them into registers once and multiplies them with every row of x, in f32.
// - M > 8: 64 x 64 tiles per block of 4 warps (each 32 x 32), K in steps of 32 (never across a group, as
//   groups are multiples of 32). W's tile is dequantized on its way from global memory into shared memory,
//   (u - z) * s rounded to x's dtype, and both tiles feed mma.sync m16n8k16 with f32 accumulators.
//   Fragment layout (PTX ISA, lane l: g = l / 4, t = l % 4):
//     A (16 x 16, row): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t ..], a2 = A[g][2t+8 ..], a3 = A[g+8][2t+8 ..]
//     B (16 x 8, col):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]   (= W[n0+g][k ..])
//     C (16 x 8, f32):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
//   Shared rows are 32 + 8 elements (80 bytes, 20 words apart): fragment loads hit 32 different banks.
#include <type_traits>

#include "../core/cuda_mma.cuh"
#include "int_gemm_cuda_common.cuh"
#include "int_gemm_kernels.h"

namespace flashlm::gemm {
namespace {

using namespace cuda;

constexpr int kGemvMaxM = 8, kGemvWarps = 4, kUnroll = 4;
constexpr int kTile = 64, kTileK = 32, kRowElems = kTileK + 8, kMmaThreads = 128;

// 16 consecutive elements of x (f16/bf16) as f32.
template <class T, bool kVec>
__device__ __forceinline__ void load_x16(const T* p, float (&v)[16]) {
  uint4 raw[2];
  raw[0] = load16<kVec>(p);
  raw[1] = load16<kVec>(p + 8);
  const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = to_float(e[i]);
}

// ---- M <= 8 ------------------------------------------------------------------------------------------------

// kVec: x and w 16-byte aligned (rows then are: K is a multiple of 32).
template <class T, bool kVec>
__global__ void __launch_bounds__(kGemvWarps * 32) int4_gemv_kernel(Int4Args a) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n >= a.N) return;
  const int M = static_cast<int>(a.M);
  const int64_t K = a.K, groups = K / a.group;
  // Offsets within a row fit 32 bits (checked on the host); group / 2 is a power of two: shifts, not divisions.
  const int half = static_cast<int>(a.group / 2), half_shift = __ffs(half) - 1, row_bytes = static_cast<int>(K / 2);
  const uint8_t* w = a.w + n * row_bytes;
  const T* x = static_cast<const T*>(a.x);
  float acc[kGemvMaxM] = {};
  // kUnroll chunks per lane are loaded before any is used: enough bytes in flight to cover the memory
  // latency (a 4096-wide row is exactly 4 chunks per lane).
  for (int o0 = lane * 16; o0 < row_bytes; o0 += kUnroll * 32 * 16) {
    uint4 raw[kUnroll];
    load16_unrolled<kUnroll, kVec>(w, o0, 32 * 16, row_bytes, raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int o = o0 + u * 32 * 16;
      if (o >= row_bytes) break;
      const int g = o >> half_shift, lo = g * 2 * half + (o & (half - 1));  // first low-nibble element
      const float s = a.scales[n * groups + g], z = a.zeros ? a.zeros[n * groups + g] : 8.f;
      const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw[u]);
      float wl[16], wh[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        wl[i] = float(b[i] & 15) - z;
        wh[i] = float(b[i] >> 4) - z;
      }
#pragma unroll
      for (int m = 0; m < kGemvMaxM; ++m) {
        if (m < M) {
          float xl[16], xh[16];
          load_x16<T, kVec>(x + m * K + lo, xl);
          load_x16<T, kVec>(x + m * K + lo + half, xh);
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < 16; ++i) dot += wl[i] * xl[i] + wh[i] * xh[i];
          acc[m] += dot * s;
        }
      }
    }
  }
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) {
    float v = acc[m];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < M) out[m * a.N + n] = from_float<T>(a.bias ? v + a.bias[n] : v);
  }
}

// ---- M > 8: tensor cores -----------------------------------------------------------------------------------

template <class T, bool kVec>
__global__ void __launch_bounds__(kMmaThreads) int4_gemm_mma_kernel(Int4Args a) {
  __shared__ alignas(16) T xs[kTile][kRowElems];
  __shared__ alignas(16) T ws[kTile][kRowElems];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
  const int64_t K = a.K, half = a.group / 2, groups = K / a.group;
  const T* x = static_cast<const T*>(a.x);
  float acc[2][4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    // x: 64 rows x 32 elements, 8 elements (16 bytes) per chunk.
    for (int i = tid; i < kTile * kTileK / 8; i += kMmaThreads) {
      const int r = i / (kTileK / 8), c = (i % (kTileK / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < a.M) v = load16<kVec>(x + (m0 + r) * K + k0 + c);
      *reinterpret_cast<uint4*>(&xs[r][c]) = v;
    }
    // W: thread -> row tid / 2, elements k0 + 16 (tid % 2) .. + 15, all from one group's low or high nibbles.
    {
      const int r = tid / 2, h = tid % 2;
      const int64_t n = n0 + r, g_idx = k0 / a.group, o = k0 % a.group + 16 * h;
      alignas(16) T v[16];
      if (n < a.N) {
        const bool high = o >= half;
        const uint4 raw = load16<kVec>(a.w + n * (K / 2) + g_idx * half + (high ? o - half : o));
        const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
        const float s = a.scales[n * groups + g_idx], z = a.zeros ? a.zeros[n * groups + g_idx] : 8.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = from_float<T>((float(high ? b[i] >> 4 : b[i] & 15) - z) * s);
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = from_float<T>(0.f);
      }
      *reinterpret_cast<uint4*>(&ws[r][16 * h]) = *reinterpret_cast<const uint4*>(v);
      *reinterpret_cast<uint4*>(&ws[r][16 * h + 8]) = *reinterpret_cast<const uint4*>(v + 8);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) warp_mma_32x32<kRowElems * 2>(xs, ws, kk * 2, wm, wn, acc, cuda_mma::mma_16816<std::is_same_v<T, __nv_bfloat16>>);
    __syncthreads();
  }
  T* out = static_cast<T*>(a.out);
  warp_for_each_32x32(acc, m0 + wm, n0 + wn, [&](int64_t m, int64_t n, float v) {
    if (m < a.M && n < a.N) out[m * a.N + n] = from_float<T>(a.bias ? v + a.bias[n] : v);
  });
}

template <class T, bool kVec>
void launch(const Int4Args& a, cudaStream_t s) {
  if (a.M <= kGemvMaxM) {
    int4_gemv_kernel<T, kVec><<<grid_dim((a.N + kGemvWarps - 1) / kGemvWarps, "int4_gemm"), kGemvWarps * 32, 0, s>>>(a);
  } else {
    const dim3 grid(grid_dim((a.N + kTile - 1) / kTile, "int4_gemm"), grid_dim((a.M + kTile - 1) / kTile, "int4_gemm", 65535));
    int4_gemm_mma_kernel<T, kVec><<<grid, kMmaThreads, 0, s>>>(a);
  }
}

}  // namespace

void int4_gemm_cuda(const Int4Args& a, int device, void* stream) {
  FLASHLM_CHECK(a.K < (int64_t(1) << 31), "x: K = ", a.K, " is too large for the CUDA int4 kernels (< 2^31)");
  CudaDeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned16(a.x) && aligned16(a.w);
  if (a.x_dtype == DType::F16) {
    vec ? launch<__half, true>(a, s) : launch<__half, false>(a, s);
  } else if (a.x_dtype == DType::BF16) {
    vec ? launch<__nv_bfloat16, true>(a, s) : launch<__nv_bfloat16, false>(a, s);
  } else {
    throw ValueError(std::string("x: the CUDA int4 kernels take float16 or bfloat16, got ") + dtype_name(a.x_dtype));
  }
  throw_on_cuda_error(cudaGetLastError(), "int4_gemm: kernel launch");
}

}  // namespace flashlm::gemm
