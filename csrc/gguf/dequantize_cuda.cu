// CUDA block dequantization. Each CTA owns a tile of 4096 output elements (128 blocks of 32, or 16 blocks
// of 256): it stages the tile's blocks into shared memory with 16-byte loads (blocks are 18, 34, 144, ...
// bytes, so they are not 16-byte aligned in global memory), then each thread decodes 8 consecutive
// elements at a time with the decoders shared with the CPU (shared_decoders.h).
//
// The stores decide the speed. With f32 output a thread's 8 elements are two 16-byte stores, and a warp
// storing "first halves" then "second halves" touches 32 half-filled sectors per instruction: 67% of copy
// bandwidth on an H100 for Q4_0. Exchanging halves between lanes with shuffles first makes every store
// instruction cover 512 contiguous bytes: 95-96% for Q4_0, Q8_0, Q4_K and Q6_K (bench/cuda/
// dequantize_dev.cu, versions v1-v5, figures in bench/results/dequant.md). A persistent, cp.async double-buffered
// grid (v5) was slower (87-90%).
// Reference: the scalar CPU path, bit for bit (the decoders use __fmul_rn/__fadd_rn, never fused FMAs).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "../core/cuda_guard.h"
#include "shared_decoders.h"
#include "dequantize_kernels.h"
#include "flashlm/core/error.h"

namespace flashlm::gguf::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kTileElems = 4096;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("dequantize: ") + what + ": " + cudaGetErrorString(err));
}

template <DType Out>
using OutT = std::conditional_t<Out == DType::F32, float, uint16_t>;  // f16/bf16 as bits

// Two floats -> packed f16/bf16 with one paired conversion (F2FP), round to nearest even.
template <DType Out>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (Out == DType::F16) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// One thread's 8 elements, stored on their own (used where the output is not 16-byte aligned).
template <DType Out>
__device__ __forceinline__ void store8_scalar(OutT<Out>* dst, const float* y, int count) {
  for (int k = 0; k < count; ++k) {
    if constexpr (Out == DType::F32) dst[k] = y[k];
    else if constexpr (Out == DType::F16) dst[k] = __half_as_ushort(__float2half_rn(y[k]));
    else dst[k] = __bfloat16_as_ushort(__float2bfloat16_rn(y[k]));
  }
}

// A warp's 32 chunks of 8 elements (lane l holds chunk base + l in y; `chunks` bounds them), written to
// out + 8 * base with 16-byte stores that each cover 512 contiguous bytes.
template <DType Out>
__device__ __forceinline__ void store_warp(OutT<Out>* out, int base, int chunks, const float* y, int lane) {
  if constexpr (Out == DType::F32) {
    // Float4 number l of the warp's 256 floats is half (l % 2) of chunk l / 2; float4 number 32 + l is
    // half (l % 2) of chunk 16 + l / 2.
    float a[4], b[4];
    const bool odd = lane & 1;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float lo0 = __shfl_sync(0xffffffffu, y[k], lane / 2), hi0 = __shfl_sync(0xffffffffu, y[k + 4], lane / 2);
      float lo1 = __shfl_sync(0xffffffffu, y[k], 16 + lane / 2), hi1 = __shfl_sync(0xffffffffu, y[k + 4], 16 + lane / 2);
      a[k] = odd ? hi0 : lo0;
      b[k] = odd ? hi1 : lo1;
    }
    float4* o = reinterpret_cast<float4*>(out + 8 * base);
    if (base + lane / 2 < chunks) o[lane] = make_float4(a[0], a[1], a[2], a[3]);
    if (base + 16 + lane / 2 < chunks) o[32 + lane] = make_float4(b[0], b[1], b[2], b[3]);
  } else {
    if (base + lane < chunks) {  // 8 halves are one 16-byte store already
      uint4 v = make_uint4(pack2<Out>(y[0], y[1]), pack2<Out>(y[2], y[3]), pack2<Out>(y[4], y[5]), pack2<Out>(y[6], y[7]));
      *reinterpret_cast<uint4*>(out + 8 * (base + lane)) = v;
    }
  }
}

// Copies bytes [begin, end) into smem so that smem[lead + i] = begin[i], lead being begin's offset in its
// 16-byte line. Whole lines move with 16-byte loads; a line reaching outside [lo, hi) (the source
// buffer) is copied byte by byte, so nothing outside the buffer is read.
__device__ __forceinline__ void stage(uint8_t* smem, const uint8_t* begin, const uint8_t* end, const uint8_t* lo,
                                      const uint8_t* hi) {
  const uint8_t* first_line = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(15));
  const int lines = static_cast<int>((end - first_line + 15) / 16);
  for (int i = threadIdx.x; i < lines; i += kThreads) {
    const uint8_t* line = first_line + 16 * i;
    if (line >= lo && line + 16 <= hi) {
      *reinterpret_cast<uint4*>(smem + 16 * i) = __ldg(reinterpret_cast<const uint4*>(line));
    } else {
      for (int k = 0; k < 16; ++k)
        if (line + k >= begin && line + k < end) smem[16 * i + k] = line[k];
    }
  }
}

template <class D, DType Out>
__global__ void __launch_bounds__(kThreads) dequantize_blocks_kernel(const uint8_t* __restrict__ src, int64_t n_blocks,
                                                                     OutT<Out>* __restrict__ dst, bool aligned) {
  constexpr int kBlocksPerTile = kTileElems / D::kBlock;
  __shared__ __align__(16) uint8_t smem[kBlocksPerTile * D::kBytes + 32];

  const int64_t first_block = static_cast<int64_t>(blockIdx.x) * kBlocksPerTile;
  const int blocks = static_cast<int>(n_blocks - first_block < kBlocksPerTile ? n_blocks - first_block : kBlocksPerTile);
  const uint8_t* begin = src + first_block * D::kBytes;
  stage(smem, begin, begin + int64_t(blocks) * D::kBytes, src, src + n_blocks * D::kBytes);
  __syncthreads();

  const uint8_t* tile = smem + (reinterpret_cast<uintptr_t>(begin) & 15);
  OutT<Out>* out = dst + first_block * D::kBlock;
  const int chunks = blocks * D::kChunks, lane = threadIdx.x & 31;
  float y[8];
  for (int base = threadIdx.x - lane; base < chunks; base += kThreads) {  // whole warps, for the shuffles
    const int c = base + lane;
    if (c < chunks) D::chunk8(tile + (c / D::kChunks) * D::kBytes, c % D::kChunks, y);
    if (aligned) store_warp<Out>(out, base, chunks, y, lane);
    else if (c < chunks) store8_scalar<Out>(out + 8 * c, y, 8);
  }
}

// F32/F16/BF16 sources: a thread per 8 elements (the last one of a ragged end takes fewer). A source
// that does not start at a multiple of its element size (a byte view into a larger buffer) is read byte by
// byte: a typed load from there faults on the GPU.
template <DType In, DType Out>
__global__ void __launch_bounds__(kThreads) convert_kernel(const uint8_t* __restrict__ src, int64_t n,
                                                           OutT<Out>* __restrict__ dst, bool src_aligned,
                                                           bool aligned) {
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 8;
  const int count = first < n ? static_cast<int>(n - first < 8 ? n - first : 8) : 0;
  float y[8] = {};
  for (int k = 0; k < count; ++k) {
    if constexpr (In == DType::F32) {
      y[k] = src_aligned ? reinterpret_cast<const float*>(src)[first + k] : bits_to_f32(ld_u32(src + 4 * (first + k)));
    } else {
      uint32_t bits = src_aligned ? reinterpret_cast<const uint16_t*>(src)[first + k] : ld_u16(src + 2 * (first + k));
      y[k] = In == DType::F16 ? f16_to_f32(bits) : bf16_to_f32(bits);
    }
  }
  // The whole block's range is full (and aligned): use the coalesced warp store.
  const int64_t block_first = static_cast<int64_t>(blockIdx.x) * kThreads * 8;
  if (aligned && block_first + kThreads * 8 <= n) {
    const int lane = threadIdx.x & 31;
    store_warp<Out>(dst + block_first, threadIdx.x - lane, kThreads, y, lane);
  } else if (count > 0) {
    store8_scalar<Out>(dst + first, y, count);
  }
}

template <DType Out>
void launch(DType type, const uint8_t* src, int64_t n_blocks, void* dst, cudaStream_t stream) {
  auto* out = static_cast<OutT<Out>*>(dst);
  const bool aligned = reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (type == DType::F32 || type == DType::F16 || type == DType::BF16) {
    const int64_t grid = (n_blocks + 8 * kThreads - 1) / (8 * kThreads);
    FLASHLM_CHECK(grid <= 0x7FFFFFFF, "dequantize: tensor too large for one launch");
    const unsigned g = static_cast<unsigned>(grid);
    const bool src_aligned = reinterpret_cast<uintptr_t>(src) % dtype_info(type).block_bytes == 0;
    if (type == DType::F32) convert_kernel<DType::F32, Out><<<g, kThreads, 0, stream>>>(src, n_blocks, out, src_aligned, aligned);
    if (type == DType::F16) convert_kernel<DType::F16, Out><<<g, kThreads, 0, stream>>>(src, n_blocks, out, src_aligned, aligned);
    if (type == DType::BF16) convert_kernel<DType::BF16, Out><<<g, kThreads, 0, stream>>>(src, n_blocks, out, src_aligned, aligned);
    return;
  }
  bool ok = dispatch_block_type(type, [&](auto decoder) {
    using D = decltype(decoder);
    constexpr int kBlocksPerTile = kTileElems / D::kBlock;
    const int64_t tiles = (n_blocks + kBlocksPerTile - 1) / kBlocksPerTile;
    FLASHLM_CHECK(tiles <= 0x7FFFFFFF, "dequantize: tensor too large for one launch");
    dequantize_blocks_kernel<D, Out><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(src, n_blocks, out, aligned);
  });
  FLASHLM_CHECK(ok, "dequantize: no CUDA kernel for ", dtype_name(type));
}

}  // namespace

void dequantize_cuda(DType type, const uint8_t* src, int64_t n_blocks, void* dst, DType out, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  switch (out) {
    case DType::F32: launch<DType::F32>(type, src, n_blocks, dst, s); break;
    case DType::F16: launch<DType::F16>(type, src, n_blocks, dst, s); break;
    case DType::BF16: launch<DType::BF16>(type, src, n_blocks, dst, s); break;
    default: throw ValueError("dequantize: output dtype must be F32, F16 or BF16");
  }
  check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace flashlm::gguf::detail
