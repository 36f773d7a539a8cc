// CUDA W8A8: the per-token activation quantizer and the int8 GEMM, y = (x_q @ w.T) * x_scales * w_scales + bias.
// Reference: int_gemm_scalar.cpp (the quantizer and the epilogue use the same float operations, written
// with __fmul_rn/__fadd_rn so that nvcc cannot contract them into FMAs). Tested by tests/test_int_gemm.py
// (CUDA-marked tests).
//
// Two GEMM kernels:
// - M <= 8 (decode): one warp per output column; lanes stride along K, 16 bytes at a time, with __dp4a
//   (four int8 products added into an int32), so W is read exactly once, at full width.
// - M > 8: 64 x 64 tiles per block of 4 warps (each 32 x 32), K in steps of 64 staged in shared memory, int8
//   tensor cores (mma.sync m16n8k32, sm_80+). Fragment layout (PTX ISA, lane l: g = l / 4, t = l % 4):
//     A (16 x 32, row): a0 = A[g][4t .. 4t+3], a1 = A[g+8][4t ..], a2 = A[g][16+4t ..], a3 = A[g+8][16+4t ..]
//     B (32 x 8, col):  b0 = B[4t .. 4t+3][g], b1 = B[16+4t ..][g]   (= W[n0+g][k ..]: W rows are B's columns)
//     C (16 x 8, s32):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
//   (warp_mma_32x32 in int_gemm_cuda_common.cuh). Shared rows are 64 + 16 bytes: 20 words apart, so the
//   8 rows (g) x 4 words (t) of a fragment load fall in 32 different banks.
#include "int_gemm_cuda_common.cuh"
#include "int_gemm_kernels.h"

namespace flashlm::gemm {
namespace {

using namespace cuda;

constexpr int kQuantThreads = 256;
constexpr int kGemvMaxM = 8, kGemvWarps = 4, kUnroll = 4;
constexpr int kTile = 64, kTileK = 64, kRowBytes = kTileK + 16, kMmaThreads = 128;

// ---- quantize_per_token ---------------------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                                                 float* __restrict__ scales, int64_t K) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * K;
  // The largest |x| bit pattern, as the CPU quantizers take it: NaN sorts above infinity, so a row with a NaN
  // gets a NaN scale (fmaxf would drop the NaN).
  unsigned max_bits = 0;
  for (int64_t k = threadIdx.x; k < K; k += kQuantThreads)
    max_bits = umax(max_bits, __float_as_uint(to_float(row[k])) & 0x7FFFFFFFu);
  for (int off = 16; off > 0; off /= 2) max_bits = umax(max_bits, __shfl_xor_sync(0xffffffffu, max_bits, off));
  __shared__ unsigned warp_max[kQuantThreads / 32];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = max_bits;
  __syncthreads();
  max_bits = 0;
#pragma unroll
  for (int i = 0; i < kQuantThreads / 32; ++i) max_bits = umax(max_bits, warp_max[i]);
  const float amax = __uint_as_float(max_bits);
  const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
  if (threadIdx.x == 0) scales[m] = __fdiv_rn(amax, 127.f);
  for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) {
    float r = rintf(__fmul_rn(to_float(row[k]), inv));  // round half to even, as nearbyint
    r = r >= -127.f ? (r <= 127.f ? r : 127.f) : -127.f;
    q[m * K + k] = static_cast<int8_t>(r);
  }
}

// quantize_static: one given scale (read on the device) for every row, x / scale rounded as above.
template <class T>
__global__ void __launch_bounds__(kQuantThreads) quantize_static_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                                                        float* __restrict__ scales,
                                                                        const float* __restrict__ scale, int64_t K) {
  const int64_t m = blockIdx.x;
  const float s = *scale;
  if (threadIdx.x == 0) scales[m] = s;
  for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) {
    float r = rintf(__fdiv_rn(to_float(x[m * K + k]), s));
    r = r >= -127.f ? (r <= 127.f ? r : 127.f) : -127.f;
    q[m * K + k] = static_cast<int8_t>(r);
  }
}

// ---- the epilogue ------------------------------------------------------------------------------------------

template <class Out>
__device__ __forceinline__ void store_y(Out* out, int64_t i, int32_t acc, float sx, float sw, const float* bias,
                                        int64_t n) {
  float y = __fmul_rn(__fmul_rn(__int2float_rn(acc), sx), sw);
  if (bias) y = __fadd_rn(y, bias[n]);
  out[i] = from_float<Out>(y);
}

// ---- M <= 8: dp4a ------------------------------------------------------------------------------------------

// kVec: K % 16 == 0 and x, w 16-byte aligned (every row then is).
template <class Out, bool kVec>
__global__ void __launch_bounds__(kGemvWarps * 32) int8_gemv_kernel(Int8Args a, Out* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n >= a.N) return;
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K);  // K <= kInt8GemmMaxK
  const int8_t* w = a.w + n * K;
  int32_t acc[kGemvMaxM] = {};
  if constexpr (kVec) {
    // kUnroll chunks of W per lane are loaded before any is used: more bytes in flight against the latency.
    for (int k0 = lane * 16; k0 < K; k0 += kUnroll * 32 * 16) {
      uint4 wv[kUnroll];
      load16_unrolled<kUnroll, true>(w, k0, 32 * 16, K, wv);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = k0 + u * 32 * 16;
        if (k >= K) break;
#pragma unroll
        for (int m = 0; m < kGemvMaxM; ++m) {
          if (m < M) {
            const uint4 xv = load16<true>(a.x + int64_t(m) * K + k);
            acc[m] = __dp4a(int(xv.x), int(wv[u].x), acc[m]);
            acc[m] = __dp4a(int(xv.y), int(wv[u].y), acc[m]);
            acc[m] = __dp4a(int(xv.z), int(wv[u].z), acc[m]);
            acc[m] = __dp4a(int(xv.w), int(wv[u].w), acc[m]);
          }
        }
      }
    }
  } else {
    for (int k = lane; k < K; k += 32) {
      const int32_t wk = w[k];
#pragma unroll
      for (int m = 0; m < kGemvMaxM; ++m)
        if (m < M) acc[m] += int32_t(a.x[int64_t(m) * K + k]) * wk;
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) {
    int32_t v = acc[m];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < M) store_y(out, m * a.N + n, v, a.x_scales[m], a.w_scales[n], a.bias, n);
  }
}

// ---- M > 8: tensor cores -----------------------------------------------------------------------------------

// Row `row` (of `rows`), bytes [k, k + 16) of a [rows, K] int8 matrix into dst, zeros outside it.
template <bool kVec>
__device__ __forceinline__ void load_chunk(int8_t* dst, const int8_t* src, int64_t row, int64_t rows, int64_t k,
                                           int64_t K) {
  if (row < rows && kVec && k + 16 <= K) {
    *reinterpret_cast<uint4*>(dst) = load16<true>(src + row * K + k);
    return;
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) dst[i] = (row < rows && k + i < K) ? src[row * K + k + i] : int8_t(0);
}

__device__ __forceinline__ void mma_16832(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class Out, bool kVec>
__global__ void __launch_bounds__(kMmaThreads) int8_gemm_mma_kernel(Int8Args a, Out* __restrict__ out) {
  __shared__ alignas(16) int8_t xs[kTile][kRowBytes];
  __shared__ alignas(16) int8_t ws[kTile][kRowBytes];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
  int32_t acc[2][4][4] = {};
  for (int64_t k0 = 0; k0 < a.K; k0 += kTileK) {
    for (int i = tid; i < kTile * kTileK / 16; i += kMmaThreads) {
      const int r = i / (kTileK / 16), c = (i % (kTileK / 16)) * 16;
      load_chunk<kVec>(&xs[r][c], a.x, m0 + r, a.M, k0 + c, a.K);
      load_chunk<kVec>(&ws[r][c], a.w, n0 + r, a.N, k0 + c, a.K);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 32) warp_mma_32x32<kRowBytes>(xs, ws, kk, wm, wn, acc, mma_16832);
    __syncthreads();
  }
  warp_for_each_32x32(acc, m0 + wm, n0 + wn, [&](int64_t m, int64_t n, int32_t v) {
    if (m < a.M && n < a.N) store_y(out, m * a.N + n, v, a.x_scales[m], a.w_scales[n], a.bias, n);
  });
}

}  // namespace

void quantize_per_token_cuda(const QuantizeArgs& a, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = grid_dim(a.M, "quantize_per_token");
  dispatch_float(a.x_dtype, "x", [&](auto t) {
    using T = decltype(t);
    if (a.static_scale) {
      quantize_static_kernel<T><<<grid, kQuantThreads, 0, s>>>(static_cast<const T*>(a.x), a.q, a.scales,
                                                               a.static_scale, a.K);
    } else {
      quantize_kernel<T><<<grid, kQuantThreads, 0, s>>>(static_cast<const T*>(a.x), a.q, a.scales, a.K);
    }
  });
  throw_on_cuda_error(cudaGetLastError(), "quantize_per_token: kernel launch");
}

void int8_gemm_cuda(const Int8Args& a, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = a.K % 16 == 0 && aligned16(a.x) && aligned16(a.w);
  dispatch_float(a.out_dtype, "out", [&](auto t) {
    using Out = decltype(t);
    auto* out = static_cast<Out*>(a.out);
    if (a.M <= kGemvMaxM) {
      const unsigned grid = grid_dim((a.N + kGemvWarps - 1) / kGemvWarps, "int8_gemm");
      if (vec) {
        int8_gemv_kernel<Out, true><<<grid, kGemvWarps * 32, 0, s>>>(a, out);
      } else {
        int8_gemv_kernel<Out, false><<<grid, kGemvWarps * 32, 0, s>>>(a, out);
      }
      return;
    }
    const dim3 grid(grid_dim((a.N + kTile - 1) / kTile, "int8_gemm"), grid_dim((a.M + kTile - 1) / kTile, "int8_gemm", 65535));
    if (vec) {
      int8_gemm_mma_kernel<Out, true><<<grid, kMmaThreads, 0, s>>>(a, out);
    } else {
      int8_gemm_mma_kernel<Out, false><<<grid, kMmaThreads, 0, s>>>(a, out);
    }
  });
  throw_on_cuda_error(cudaGetLastError(), "int8_gemm: kernel launch");
}

}  // namespace flashlm::gemm
