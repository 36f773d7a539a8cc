// Building blocks of the CUDA attention kernels (attention_fwd_cuda.cu, attention_fwd_v1_cuda.cu,
// attention_bwd_cuda.cu), shared with the paged attention kernels (kvcache/): tensor-core mma.sync, ldmatrix and cp.async wrappers, tile loads into padded shared
// memory, fragment-level helpers, and the host side (device guard, error checks, launch checks).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). A warp computes
// D[16x8] += A[16x16] * B[16x8] with f16/bf16 inputs and f32 accumulators. Lane l has g = l / 4 (the
// "groupID") and t = l % 4 ("threadID_in_group"); a .b32 register holds two consecutive-column elements.
//   A (row major): a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]
//                  a[2] = A[g][2t+8, +9]   a[3] = A[g+8][2t+8, +9]
//   B ("col", i.e. k contiguous per column n): b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C/D (f32):     c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix.x4 reads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses (16 bytes each) of matrix
// i, and register i of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (.trans: row and
// column swapped, i.e. column l/4, rows 2(l%4), 2(l%4)+1).
// What the kernels build from that:
//   * A from a [rows][k] smem tile (Q, dO, K or V rows): lane l points at row (l % 16), column (l / 16) * 8 of
//     the 16x16 block, so matrices 0..3 are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
//     (rows 8-15, k 8-15) = a[0..3].
//   * B = X^T from a [n][k] smem tile (K in Q.K^T): lane l points at row n = (l % 8) + (l / 16) * 8,
//     column k = ((l / 8) % 2) * 8, so r[0], r[1] are b[0], b[1] of the n-block n0..n0+7 and r[2], r[3] those
//     of n0+8..n0+15.
//   * B = X from a [k][n] smem tile (V in P.V), with .trans: lane l points at row k = (l % 8) + ((l / 8) % 2)
//     * 8, column n = (l / 16) * 8, so r[0], r[1] are b[0], b[1] of the n-block n0..n0+7 and r[2], r[3] those
//     of n0+8..n0+15.
//   * A from an accumulator: the C fragments of n-blocks 2k and 2k+1 of a 16-row tile are, packed in pairs,
//     exactly a[0..3] of the 16x16 A block k (c[0..1] of 2k -> a[0], c[2..3] of 2k -> a[1], c[0..1] of 2k+1 ->
//     a[2], c[2..3] of 2k+1 -> a[3]): P (or dS) goes from one mma's output to the next one's input in
//     registers.
//
// Shared memory tiles are [rows][kHeadDim + 8] elements: the 16-byte pad shifts each row by 4 banks, so the
// 8 rows of one ldmatrix phase hit 8 different 16-byte bank groups whenever kHeadDim is a multiple of 16
// (every instantiated head dim is).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "attention_params.h"
#include "shared_tiles.h"
#include "../core/cuda_mma.cuh"
#include "flashlm/core/error.h"

namespace flashlm::attention::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = 8;  // elements of padding per smem row

template <bool kBf16>
using Elem = std::conditional_t<kBf16, __nv_bfloat16, __half>;

// ---------------------------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

using cuda_mma::mma_16816;

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16 bytes global -> shared, bypassing L1; src-size 0 (!pred) reads nothing and zero-fills the 16 bytes.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(__cvta_generic_to_global(src)),
               "r"(pred ? 16 : 0));
}
// 4 bytes (one f32 of lse/delta), zero-filled when !pred.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(__cvta_generic_to_global(src)),
               "r"(pred ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x on the SFU (ex2.approx: relative error ~2^-22; exp2(-inf) = +0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The larger of a and b, NaN if either is (max.NaN, sm_80): one instruction like fmaxf, which drops NaN, so
// the online softmax's running max turns NaN at a NaN score at no cost (see shared_softmax.h).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (kBf16) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&h);
  }
  return r;
}

template <bool kBf16>
__device__ __forceinline__ float to_f32(uint16_t bits) {
  if constexpr (kBf16) return __bfloat162float(__ushort_as_bfloat16(bits));
  else return __half2float(__ushort_as_half(bits));
}

// x rounded to the input type and back, as pack2 rounds P for the P V product.
template <bool kBf16>
__device__ __forceinline__ float round_to_elem(float x) {
  if constexpr (kBf16) return __bfloat162float(__float2bfloat16_rn(x));
  else return __half2float(__float2half_rn(x));
}

// The A fragment of 16x16 block k from the C fragments of n-blocks 2k, 2k+1 of a 16-row accumulator.
template <bool kBf16>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<kBf16>(c0[0], c0[1]);
  a[1] = pack2<kBf16>(c0[2], c0[3]);
  a[2] = pack2<kBf16>(c1[0], c1[1]);
  a[3] = pack2<kBf16>(c1[2], c1[3]);
}

// Sum / max over the 4 lanes of a quad (the lanes holding one accumulator row); the max is NaN if any is.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
__device__ __forceinline__ float quad_max(float x) {
  x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

// ---------------------------------------------------------------------------------------------------------
// Warp-level matrix products on smem tiles ([rows][kStride] elements, kStride = kHeadDim + kPad).

// Per-lane byte offsets of the three ldmatrix patterns above, within a 16x16 block at (0, 0).
__device__ __forceinline__ uint32_t lane_off_a(int lane, int stride) {
  return uint32_t(((lane & 15) * stride + (lane >> 4) * 8) * 2);
}
__device__ __forceinline__ uint32_t lane_off_bt(int lane, int stride) {  // B = X^T from X[n][k]
  return uint32_t((((lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8) * 2);
}
__device__ __forceinline__ uint32_t lane_off_b(int lane, int stride) {  // B = X from X[k][n], .trans
  return uint32_t((((lane & 7) + (((lane >> 3) & 1) << 3)) * stride + (lane >> 4) * 8) * 2);
}

// acc[mt][nt] (kMT 16-row tiles x kNT 8-column blocks) += A[rows a_row0 + 16 mt .., k 0..kK) * X[n 0..8 kNT,
// k 0..kK)^T with A and X in smem (both k-contiguous). a_base/x_base: smem addresses of row 0 of the warp's
// A rows and of X; kK is a multiple of 16, kNT even.
template <bool kBf16, int kMT, int kNT, int kK, int kStrideA, int kStrideX>
__device__ __forceinline__ void mma_abt(float (&acc)[kMT][kNT][4], uint32_t a_base, uint32_t x_base, int lane) {
  const uint32_t a_lane = a_base + lane_off_a(lane, kStrideA), x_lane = x_base + lane_off_bt(lane, kStrideX);
#pragma unroll
  for (int kt = 0; kt < kK / 16; ++kt) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], a_lane + (mt * 16 * kStrideA + kt * 16) * 2);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, x_lane + (np * 16 * kStrideX + kt * 16) * 2);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<kBf16>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<kBf16>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// P (or dS) as A operands: the accumulator tile p[mt][nt] (16 rows x 8 kNT columns) packed into the
// A fragments of its 16x16 blocks, a[mt][kt] (kt = 0 .. kNT / 2).
template <bool kBf16, int kMT, int kNT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[kMT][kNT / 2][4], const float (&p)[kMT][kNT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int kt = 0; kt < kNT / 2; ++kt) acc_to_a<kBf16>(a[mt][kt], p[mt][2 * kt], p[mt][2 * kt + 1]);
}

// acc[mt][nt] (kMT x kNT 8-column blocks, columns from c0) += P[mt] * Y[k 0..16 kKT, columns c0 .. c0 + 8 kNT)
// where P is held in registers as A fragments a[mt][kt] (16 rows x 16 kKT columns, see acc_to_a) and Y is a
// smem tile [k][kStride]; y_base: smem address of Y[0][c0]. kNT even.
template <bool kBf16, int kMT, int kKT, int kNT, int kStrideY>
__device__ __forceinline__ void mma_pv(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKT][4], uint32_t y_base,
                                       int lane) {
  const uint32_t y_lane = y_base + lane_off_b(lane, kStrideY);
#pragma unroll
  for (int kt = 0; kt < kKT; ++kt) {
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, y_lane + (kt * 16 * kStrideY + np * 16) * 2);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<kBf16>(acc[mt][2 * np], a[mt][kt], b[0], b[1]);
        mma_16816<kBf16>(acc[mt][2 * np + 1], a[mt][kt], b[2], b[3]);
      }
    }
  }
}

template <int kMT, int kNT>
__device__ __forceinline__ void zero(float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// ---------------------------------------------------------------------------------------------------------
// Tile loads and stores.

// One 16-byte chunk (8 elements) global -> shared, zero-filled when !pred (src must still be a valid address).
// `aligned`: src and dst are 16-byte aligned and the copy is an asynchronous cp.async; otherwise the chunk is
// read element by element and stored synchronously.
template <class T>
__device__ __forceinline__ void load_chunk(T* dst, const T* src, bool pred, bool aligned) {
  if (aligned) {
    cp_async_16(smem_addr(dst), src, pred);
  } else {
    uint16_t u[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (pred) {
      const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
#pragma unroll
      for (int k = 0; k < 8; ++k) u[k] = s16[k];
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(u[0] | (uint32_t(u[1]) << 16), u[2] | (uint32_t(u[3]) << 16),
                                                u[4] | (uint32_t(u[5]) << 16), u[6] | (uint32_t(u[7]) << 16));
  }
}

// Copies rows [0, rows) x columns [0, d) of a tile (row r at src + r * row_stride) into smem [kRows][kHeadDim
// + kPad] and zero-fills the rest of the kRows x kHeadDim tile, so padding rows and columns contribute 0 to
// every product. `aligned`: src and row_stride allow 16-byte cp.async (see check_alignment); otherwise the
// chunk is read element by element and stored synchronously. `fallback` is any valid address (cp.async
// gets one even when it reads nothing). Issues no commit.
template <int kRows, int kHeadDim, int kThreads, class T>
__device__ __forceinline__ void load_tile(T* smem, const T* src, int64_t row_stride, int rows, int d, bool aligned,
                                          const T* fallback) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "tile chunks must spread evenly over the threads");
  // Not unrolled: unrolled, the compiler hoists every chunk's 64-bit address out of the main loop and the
  // kernels run out of registers; the loop costs a few integer ops per 16-byte chunk.
#pragma unroll 1
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + int(threadIdx.x);
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool pred = r < rows && c < d;
    load_chunk(smem + r * (kHeadDim + kPad) + c, pred ? src + r * row_stride + c : fallback, pred, aligned);
  }
}

// Whether a chunk that load_tile (or kvcache's load_paged_tiles, which deals chunks out the same way) gave
// this thread to copy into a [kRows][kHeadDim + kPad] tile holds an inf or NaN. Call it once the thread's
// copies have landed (they are visible to it then, before any barrier).
template <int kRows, int kHeadDim, int kThreads, bool kBf16>
__device__ __forceinline__ bool own_chunks_nonfinite(const Elem<kBf16>* smem) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr uint32_t kExp = kBf16 ? 0x7F80u : 0x7C00u;  // the exponent field: all ones for inf and NaN
  uint32_t bad = 0;
#pragma unroll 1
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + int(threadIdx.x);
    const uint4 x = *reinterpret_cast<const uint4*>(smem + (idx / kChunks) * (kHeadDim + kPad) + (idx % kChunks) * 8);
    const uint32_t words[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
      bad |= uint32_t((words[i] & kExp) == kExp) | uint32_t(((words[i] >> 16) & kExp) == kExp);
  }
  return bad != 0;
}

// Stores columns c, c+1 of a row (c even, c + 1 < d). `aligned` (16-byte aligned base and strides that are
// multiples of 8) makes the pair 4-byte aligned; otherwise two 2-byte stores.
template <bool kBf16>
__device__ __forceinline__ void store_pair(Elem<kBf16>* dst, float lo, float hi, bool aligned) {
  const uint32_t v = pack2<kBf16>(lo, hi);
  if (aligned) {
    *reinterpret_cast<uint32_t*>(dst) = v;
  } else {
    reinterpret_cast<uint16_t*>(dst)[0] = uint16_t(v & 0xffffu);
    reinterpret_cast<uint16_t*>(dst)[1] = uint16_t(v >> 16);
  }
}

// Writes an accumulator tile acc[mt][dt] (rows row0 + 16 mt + g (+8), columns col0 + 8 dt + 2t (+1)) to
// global memory row by row (row r at dst + r * row_stride), for rows < rows and columns < d, times `scale`
// per row (scale[mt][h], h = 0 for row g, 1 for row g + 8).
template <bool kBf16, int kMT, int kDT>
__device__ __forceinline__ void store_acc(Elem<kBf16>* dst, int64_t row_stride, const float (&acc)[kMT][kDT][4],
                                          const float (&scale)[kMT][2], int row0, int col0, int rows, int d,
                                          bool aligned, int lane) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + mt * 16 + (lane >> 2) + 8 * h;
      if (r >= rows) continue;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const int c = col0 + dt * 8 + 2 * (lane & 3);
        if (c < d)
          store_pair<kBf16>(dst + r * row_stride + c, acc[mt][dt][2 * h] * scale[mt][h], acc[mt][dt][2 * h + 1] * scale[mt][h],
                            aligned);
      }
    }
}

// The rows of sequence b (cu_seqlens clamped, see shared_tiles.h).
__device__ __forceinline__ tiles::SeqRows sequence_rows(const Params& p, int b) {
  return tiles::sequence_rows(p.cu_seqlens_q, p.cu_seqlens_k, b, p.total_q, p.total_k, p.seqlen_q, p.seqlen_k);
}
__device__ __forceinline__ tiles::Band band_of(const Params& p, const tiles::SeqRows& s) {
  return {s.sq, s.sk, p.window_left, p.window_right};
}

// ALiBi in the log2 domain: the slope of head h of sequence b times log2(e) (0: no bias), and the bias of
// query i and key j, -slope2 |i + sk - sq - j| (attention_params.h).
__device__ __forceinline__ float alibi_slope2(const Params& p, int b, int h) {
  return p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] * kLog2e : 0.f;
}
__device__ __forceinline__ float alibi_log2(float slope2, const tiles::Band& band, int64_t i, int64_t j) {
  return -slope2 * fabsf(float(band.diag(i) - j));
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("attention: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for its lifetime and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// The tile loads use 16-byte cp.async when every tensor they touch starts on a 16-byte boundary and all its
// row/head/batch strides are multiples of 8 elements (every row then starts on one). Other layouts (odd
// strides, offset views) are still supported: the kernels then load element by element (slower, same
// results), so no layout the contract allows is rejected.
inline bool vector_ok(const void* ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && batch_stride % 8 == 0 && row_stride % 8 == 0 &&
         head_stride % 8 == 0;
}

// q, k and v of both passes: all three take 16-byte loads.
inline bool qkv_vector_ok(const Params& p) {
  return vector_ok(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
         vector_ok(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
         vector_ok(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
}

// Sets the dynamic shared memory limit of `kernel` when it needs more than the default 48 KiB.
template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

inline dim3 make_grid(int64_t x, int64_t y, int64_t z, const char* what) {
  FLASHLM_CHECK(x <= 0x7fffffff && y <= 65535 && z <= 65535, what, ": grid (", x, ", ", y, ", ", z,
                ") exceeds the CUDA limits (2^31 - 1 query/key tiles, 65535 heads, 65535 sequences)");
  return dim3(unsigned(x), unsigned(y), unsigned(z));
}

// Calls f(std::integral_constant<int, D>) for the smallest instantiated head dimension D >= d; a head dim
// between two instantiations runs on the larger one with zero-filled columns.
template <int... kDims, class F>
void dispatch_head_dim(int d, F&& f) {
  bool done = false;
  ((!done && d <= kDims ? (f(std::integral_constant<int, kDims>{}), done = true) : false), ...);
  FLASHLM_CHECK(done, "attention: no CUDA kernel for head_dim ", d);
}

template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  if (dtype == DType::BF16) f(std::true_type{});
  else if (dtype == DType::F16) f(std::false_type{});
  else throw ValueError("attention: CUDA kernels take float16 or bfloat16");
}

}  // namespace flashlm::attention::cuda
