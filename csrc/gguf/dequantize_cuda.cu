// CUDA block dequantization. Each CTA owns a tile of 8192 output elements (256 blocks of 32, or 32 blocks
// of 256): it stages the tile's blocks into shared memory with 16-byte loads (blocks are 18, 34, 144, ...
// bytes, so they are not 16-byte aligned in global memory), then each thread decodes 8 consecutive
// elements at a time with the decoders shared with the CPU (dequantize_block.h) and writes them with one
// or two 16-byte stores, so a warp writes 512 contiguous bytes (f32) per instruction.
// Reference: the scalar CPU path (bit-exact: decoders use __fmul_rn/__fadd_rn, never contracted FMAs).
#include <cuda_runtime.h>

#include <string>

#include "dequantize_block.h"
#include "dequantize_kernels.h"
#include "flashlm/core/error.h"

namespace flashlm::gguf::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kTileElems = 8192;  // 32 elements per thread: enough bytes in flight per SM to saturate HBM

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("dequantize: ") + what + ": " + cudaGetErrorString(err));
}

template <DType Out>
struct OutType {
  using type = uint16_t;  // f16 / bf16 bits
};
template <>
struct OutType<DType::F32> {
  using type = float;
};

template <DType Out>
__device__ __forceinline__ void store8(typename OutType<Out>::type* dst, const float* y, bool vector) {
  if constexpr (Out == DType::F32) {
    if (vector) {
      reinterpret_cast<float4*>(dst)[0] = make_float4(y[0], y[1], y[2], y[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(y[4], y[5], y[6], y[7]);
    } else {
      for (int k = 0; k < 8; ++k) dst[k] = y[k];
    }
  } else {
    uint16_t h[8];
    for (int k = 0; k < 8; ++k) h[k] = Out == DType::F16 ? f32_to_f16(y[k]) : f32_to_bf16(y[k]);
    if (vector) {
      uint4 v;
      v.x = h[0] | (uint32_t(h[1]) << 16);
      v.y = h[2] | (uint32_t(h[3]) << 16);
      v.z = h[4] | (uint32_t(h[5]) << 16);
      v.w = h[6] | (uint32_t(h[7]) << 16);
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
      for (int k = 0; k < 8; ++k) dst[k] = h[k];
    }
  }
}

// Copies bytes [begin, end) of global memory into smem so that smem[lead + i] = begin[i], where lead is
// begin's offset inside its 16-byte line. Whole lines are read with 16-byte loads; a line that reaches
// outside [lo, hi) (the source buffer) is read byte by byte, so nothing outside the buffer is touched.
__device__ __forceinline__ void stage(uint8_t* smem, const uint8_t* begin, const uint8_t* end, const uint8_t* lo,
                                      const uint8_t* hi) {
  const uint8_t* first_line = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(15));
  const int lines = static_cast<int>((end - first_line + 15) / 16);
  for (int i = threadIdx.x; i < lines; i += blockDim.x) {
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
                                                                     typename OutType<Out>::type* __restrict__ dst,
                                                                     bool vector_stores) {
  constexpr int kBlocksPerTile = kTileElems / D::kBlock;
  constexpr int kTileBytes = kBlocksPerTile * D::kBytes;
  __shared__ __align__(16) uint8_t smem[kTileBytes + 32];

  const int64_t first_block = static_cast<int64_t>(blockIdx.x) * kBlocksPerTile;
  const int blocks = static_cast<int>(n_blocks - first_block < kBlocksPerTile ? n_blocks - first_block : kBlocksPerTile);
  const uint8_t* begin = src + first_block * D::kBytes;
  stage(smem, begin, begin + int64_t(blocks) * D::kBytes, src, src + n_blocks * D::kBytes);
  __syncthreads();

  const uint8_t* tile = smem + (reinterpret_cast<uintptr_t>(begin) & 15);
  const int chunks = blocks * D::kChunks;
  float y[8];
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    const int b = c / D::kChunks, sub = c % D::kChunks;
    D::chunk8(tile + b * D::kBytes, sub, y);
    store8<Out>(dst + (first_block + b) * D::kBlock + 8 * sub, y, vector_stores);
  }
}

// F32/F16/BF16 sources: one thread per 8 elements (the last thread of a ragged end takes fewer).
template <DType In, DType Out>
__global__ void __launch_bounds__(kThreads) convert_kernel(const uint8_t* __restrict__ src, int64_t n,
                                                           typename OutType<Out>::type* __restrict__ dst,
                                                           bool vector_stores) {
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 8;
  if (first >= n) return;
  const int count = static_cast<int>(n - first < 8 ? n - first : 8);
  float y[8];
  for (int k = 0; k < count; ++k) {
    const int64_t i = first + k;
    if constexpr (In == DType::F32) {
      y[k] = reinterpret_cast<const float*>(src)[i];
    } else {
      uint32_t bits = reinterpret_cast<const uint16_t*>(src)[i];
      y[k] = In == DType::F16 ? f16_to_f32(bits) : bf16_to_f32(bits);
    }
  }
  if (count == 8) {
    store8<Out>(dst + first, y, vector_stores);
  } else {
    for (int k = 0; k < count; ++k) {
      if constexpr (Out == DType::F32) dst[first + k] = y[k];
      else dst[first + k] = Out == DType::F16 ? f32_to_f16(y[k]) : f32_to_bf16(y[k]);
    }
  }
}

template <DType Out>
void launch(DType type, const uint8_t* src, int64_t n_blocks, void* dst, cudaStream_t stream) {
  using T = typename OutType<Out>::type;
  T* out = static_cast<T*>(dst);
  const bool vector_stores = reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (type == DType::F32 || type == DType::F16 || type == DType::BF16) {
    const unsigned grid = static_cast<unsigned>((n_blocks + 8 * kThreads - 1) / (8 * kThreads));
    // An F16 -> F16 (etc.) "dequantization" is a conversion kernel too: it keeps the vector stores.
    if (type == DType::F32) convert_kernel<DType::F32, Out><<<grid, kThreads, 0, stream>>>(src, n_blocks, out, vector_stores);
    if (type == DType::F16) convert_kernel<DType::F16, Out><<<grid, kThreads, 0, stream>>>(src, n_blocks, out, vector_stores);
    if (type == DType::BF16) convert_kernel<DType::BF16, Out><<<grid, kThreads, 0, stream>>>(src, n_blocks, out, vector_stores);
    return;
  }
  bool ok = dispatch_block_type(type, [&](auto decoder) {
    using D = decltype(decoder);
    constexpr int kBlocksPerTile = kTileElems / D::kBlock;
    const int64_t tiles = (n_blocks + kBlocksPerTile - 1) / kBlocksPerTile;
    if (tiles > 0x7FFFFFFF) throw ValueError("dequantize: tensor too large for one launch");
    dequantize_blocks_kernel<D, Out><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(src, n_blocks, out, vector_stores);
  });
  if (!ok) throw ValueError(std::string("dequantize: no CUDA kernel for ") + dtype_name(type));
}

}  // namespace

void dequantize_cuda(DType type, const uint8_t* src, int64_t n_blocks, void* dst, DType out, int device, void* stream) {
  int previous = -1;
  check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto s = static_cast<cudaStream_t>(stream);
  try {
    switch (out) {
      case DType::F32: launch<DType::F32>(type, src, n_blocks, dst, s); break;
      case DType::F16: launch<DType::F16>(type, src, n_blocks, dst, s); break;
      case DType::BF16: launch<DType::BF16>(type, src, n_blocks, dst, s); break;
      default: throw ValueError("dequantize: output dtype must be F32, F16 or BF16");
    }
    check_cuda(cudaGetLastError(), "kernel launch");
  } catch (...) {
    if (previous != device) cudaSetDevice(previous);
    throw;
  }
  if (previous != device) check_cuda(cudaSetDevice(previous), "cudaSetDevice");
}

}  // namespace flashlm::gguf::detail
