// Helpers shared by the CUDA integer GEMM kernels (int8_gemm_cuda.cu, int4_gemm_cuda.cu): element types and
// conversions, the f32 epilogue, 16-byte loads that fall back to byte loads where a pointer is not aligned,
// and the host-side launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/cuda_guard.h"
#include "flashlm/core/dtype.h"
#include "flashlm/core/error.h"

namespace flashlm::gemm::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes from p: one vector load where p is 16-byte aligned (kAligned), else byte by byte.
template <bool kAligned>
__device__ __forceinline__ uint4 load16(const void* p) {
  if constexpr (kAligned) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    uint4 v;
    auto* d = reinterpret_cast<uint8_t*>(&v);
    const auto* s = static_cast<const uint8_t*>(p);
#pragma unroll
    for (int i = 0; i < 16; ++i) d[i] = s[i];
    return v;
  }
}

// One warp's 32 x 32 output tile (2 x 4 fragments of 16 x 8) over one 32-byte slice of K, at byte `kb` of
// the rows of two shared tiles, x [64][kRowBytes] and w [64][kRowBytes] (w's rows are B's columns). The int8
// m16n8k32 and the f16/bf16 m16n8k16 fragments take the same bytes: lane (g = l / 4, t = l % 4) holds the
// 32-bit words at bytes 4t and 16 + 4t of A rows g and g + 8 (a0 a1 a2 a3 = row g, row g+8 at 4t, then at
// 16 + 4t) and of B column g (b0, b1). `mma(c, a, b0, b1)` is the instruction.
template <int kRowBytes, class Acc, class Mma>
__device__ __forceinline__ void warp_mma_32x32(const void* x_tile, const void* w_tile, int kb, int wm, int wn,
                                               Acc (&acc)[2][4][4], Mma&& mma) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const auto* xs = static_cast<const uint8_t*>(x_tile) + kb + 4 * t;
  const auto* ws = static_cast<const uint8_t*>(w_tile) + kb + 4 * t;
  auto word = [](const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); };
  uint32_t a[2][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
    const uint8_t* r = xs + (wm + mi * 16 + g) * kRowBytes;
    a[mi][0] = word(r);
    a[mi][1] = word(r + 8 * kRowBytes);
    a[mi][2] = word(r + 16);
    a[mi][3] = word(r + 8 * kRowBytes + 16);
  }
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const uint8_t* c = ws + (wn + ni * 8 + g) * kRowBytes;
    const uint32_t b0 = word(c), b1 = word(c + 16);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) mma(acc[mi][ni], a[mi], b0, b1);
  }
}

// Calls fn(m, n, value) for every accumulator of a warp's 32 x 32 tile at (m0 + wm, n0 + wn) (C fragment:
// c0, c1 = row g, columns 2t, 2t + 1; c2, c3 = row g + 8), in bounds or not.
template <class Acc, class Fn>
__device__ __forceinline__ void warp_for_each_32x32(const Acc (&acc)[2][4][4], int64_t m0, int64_t n0, Fn&& fn) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) fn(m0 + mi * 16 + g + (i / 2) * 8, n0 + ni * 8 + 2 * t + (i % 2), acc[mi][ni][i]);
}

// The GEMV kernels' prefetch: out[u] = the 16 bytes at p + o0 + u * step for every u with o0 + u * step < end
// (zeros past it), all loads issued before any is used.
template <int kUnroll, bool kAligned>
__device__ __forceinline__ void load16_unrolled(const void* p, int o0, int step, int end, uint4 (&out)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int o = o0 + u * step;
    out[u] = o < end ? load16<kAligned>(static_cast<const uint8_t*>(p) + o) : make_uint4(0, 0, 0, 0);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Calls fn(T{}) with T the CUDA element type of `dtype` (F32, F16 or BF16).
template <class Fn>
void dispatch_float(DType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); break;
    case DType::F16: fn(__half{}); break;
    case DType::BF16: fn(__nv_bfloat16{}); break;
    default: throw ValueError(std::string(name) + ": no CUDA kernel for " + dtype_name(dtype));
  }
}

inline unsigned grid_dim(int64_t blocks, const char* op, int64_t limit = 0x7FFFFFFF) {
  FLASHLM_CHECK(blocks <= limit, op, ": too large for one launch (", blocks, " blocks)");
  return static_cast<unsigned>(blocks);
}

}  // namespace flashlm::gemm::cuda
