// The quantized linear layers' input gradient on CUDA: dx = dy @ W. Thread t owns columns [8t, 8t + 8) of
// dx for up to kRows rows of dy and walks all N weight rows, decoding its 8 elements of each in registers
// (GGUF: the decoders shared with the CPU, csrc/gguf/shared_decoders.h) and adding dy[m, row] times them
// in float32. Neighbouring threads read neighbouring bytes of a weight row, and all threads of a CTA read
// the same dy values, so both loads coalesce. No thread shares an output with another: no atomics.
// Reference: the CPU kernels and float64 dy @ dequantize(W) (tests/test_backward_input.py, CUDA cases).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "../core/cuda_guard.h"
#include "../gguf/shared_decoders.h"
#include "backward_input_kernels.h"
#include "flashlm/core/error.h"
#include "int_gemm_cuda_common.cuh"

namespace flashlm::gemm::detail {
namespace {

using cuda::from_float;
using cuda::to_float;

constexpr int kThreads = 128;
constexpr int64_t kMaxGridY = 65535;

// Elements [8c, 8c + 8) of weight row `row` (columns past K are never read or written).
template <class D>  // a gguf::detail::Decoder
struct GgufChunk {
  const uint8_t* w;
  int64_t row_bytes;
  __device__ void operator()(int64_t row, int64_t c, int64_t, float* v) const {
    D{}.chunk8(w + row * row_bytes + (c / D::kChunks) * D::kBytes, static_cast<int>(c % D::kChunks), v);
  }
};

struct Int8Chunk {
  const int8_t* w;
  const float* scales;
  int64_t k;
  __device__ void operator()(int64_t row, int64_t c, int64_t width, float* v) const {
    const float s = scales[row];
    for (int j = 0; j < width; ++j) v[j] = static_cast<float>(w[row * k + 8 * c + j]) * s;
  }
};

// int4_gemm's layout: byte i of a group holds element i (low nibble) and element i + group / 2 (high).
struct Int4Chunk {
  const uint8_t* w;
  const float* scales;
  const float* zeros;
  int64_t k, group;
  __device__ void operator()(int64_t row, int64_t c, int64_t, float* v) const {
    const int64_t e = 8 * c, g = e / group, i = e % group, half = group / 2, groups = k / group;
    const float s = scales[row * groups + g], z = zeros ? zeros[row * groups + g] : 8.0f;
    const uint8_t* q = w + row * (k / 2) + g * half + i % half;
    const int shift = i < half ? 0 : 4;
    for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(__fsub_rn(static_cast<float>((q[j] >> shift) & 15), z), s);
  }
};

template <class Chunk, class T, int kRows>
__global__ void backward_input_kernel(Chunk chunk, const T* __restrict__ dy, T* __restrict__ dx, int64_t m,
                                      int64_t n, int64_t k, int64_t m0) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (8 * c >= k) return;
  const int64_t r0 = m0 + static_cast<int64_t>(blockIdx.y) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), m - r0));
  const int64_t width = min(static_cast<int64_t>(8), k - 8 * c);
  float acc[kRows][8] = {};
  float v[8] = {};
  for (int64_t row = 0; row < n; ++row) {
    chunk(row, c, width, v);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      const float a = to_float(dy[(r0 + r) * n + row]);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r][j] = fmaf(a, v[j], acc[r][j]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < width; ++j) dx[(r0 + r) * k + 8 * c + j] = from_float<T>(acc[r][j]);
}

template <class Chunk, class T>
void launch(const Chunk& chunk, const BackwardWeight& w, const void* dy, void* dx, int64_t m, cudaStream_t stream) {
  constexpr int kRows = 4;
  const int64_t grid_x = ((w.k + 7) / 8 + kThreads - 1) / kThreads;
  FLASHLM_CHECK(grid_x <= 0x7FFFFFFF, "backward_input: K (", w.k, ") is too large for one launch");
  const int64_t groups = (m + kRows - 1) / kRows;
  for (int64_t g0 = 0; g0 < groups; g0 += kMaxGridY) {  // gridDim.y is at most 65535
    const int64_t gy = std::min<int64_t>(kMaxGridY, groups - g0);
    backward_input_kernel<Chunk, T, kRows><<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(gy)), kThreads, 0,
                                             stream>>>(chunk, static_cast<const T*>(dy), static_cast<T*>(dx), m, w.n,
                                                       w.k, g0 * kRows);
    throw_on_cuda_error(cudaGetLastError(), "backward_input: kernel launch");
  }
}

template <class Chunk>
void by_dtype(const Chunk& chunk, const BackwardWeight& w, const void* dy, void* dx, DType dtype, int64_t m,
              cudaStream_t stream) {
  if (dtype == DType::F16) launch<Chunk, __half>(chunk, w, dy, dx, m, stream);
  else if (dtype == DType::BF16) launch<Chunk, __nv_bfloat16>(chunk, w, dy, dx, m, stream);
  else launch<Chunk, float>(chunk, w, dy, dx, m, stream);
}

}  // namespace

void backward_input_cuda(const BackwardWeight& w, const void* dy, void* dx, DType dtype, int64_t m, int device,
                         void* stream) {
  CudaDeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  if (w.n == 0) {  // an empty sum: zeros
    const size_t bytes = static_cast<size_t>(m * w.k) * (dtype == DType::F32 ? 4 : 2);
    throw_on_cuda_error(cudaMemsetAsync(dx, 0, bytes, s), "backward_input: cudaMemsetAsync");
    return;
  }
  if (w.kind == WeightKind::Int8) {
    by_dtype(Int8Chunk{reinterpret_cast<const int8_t*>(w.w), w.scales, w.k}, w, dy, dx, dtype, m, s);
    return;
  }
  if (w.kind == WeightKind::Int4) {
    by_dtype(Int4Chunk{w.w, w.scales, w.zeros, w.k, w.block}, w, dy, dx, dtype, m, s);
    return;
  }
  const bool ok = gguf::detail::dispatch_block_type(w.type, [&](auto decoder) {
    by_dtype(GgufChunk<decltype(decoder)>{w.w, w.row_bytes}, w, dy, dx, dtype, m, s);
  });
  if (!ok) throw ValueError(std::string("backward_input: no CUDA kernel for ") + dtype_name(w.type));
}

}  // namespace flashlm::gemm::detail
