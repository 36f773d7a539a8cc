// Integer GEMMs for quantized linear layers, y = x @ W.T (+ bias), x [M, K], W [N, K], y [M, N]:
//
// - quantize_per_token: x (f32/bf16 on the CPU, f16/bf16/f32 on CUDA) -> int8 q [M, K] and f32 scales [M],
//   symmetric: scale = absmax(row) / 127, q = round_half_even(x * (127 / absmax)) in [-127, 127] (never
//   -128, which the CPU kernels' sign trick cannot take). A row of zeros gets scale 0 and q 0.
// - quantize_static: the same with one given scale for every row (W8A8 with a calibrated activation
//   scale): q = clamp(round_half_even(x / scale), -127, 127), scales[m] = scale (NaN -> -127).
// - int8_gemm (W8A8): int8 activations with per-row scales, int8 weights with per-output-channel f32
//   scales, exact int32 accumulation, y[m, n] = acc[m, n] * x_scales[m] * w_scales[n] + bias[n].
//   x_q must lie in [-127, 127] (checked on the CPU); K <= 131072 so that the int32 sums cannot overflow.
//   out: f32 or bf16 on the CPU, f32/f16/bf16 on CUDA.
// - int4_gemm (W4A16): int4 weights, group-wise along K with f32 scales [N, K / group] and, for asymmetric
//   weights, f32 zero points [N, K / group]: w = (u - z) * s, u the stored nibble in [0, 15]. Symmetric
//   weights (no zeros tensor) have z = 8, i.e. w = q * s with q = u - 8 in [-8, 7]. x and out: f32 or
//   bf16 on the CPU, f16 or bf16 on CUDA (out has x's dtype).
//
// int4 layout: W is uint8 [N, K / 2], row-major, each row a run of groups of group/2 bytes. Byte j of a
// group holds element j of the group in its low nibble and element j + group/2 in its high nibble (as
// ggml's Q4_0 does within a block), so 16 bytes unpack into two runs of 16 consecutive elements with one
// AND and one shift. group is 32, 64 or 128 and must divide K.
//
// bias (optional, data == nullptr for none) is f32 [N]. Every tensor is contiguous and on one device.
// CPU work runs on the library's thread pool; CUDA work is queued on `stream` (a cudaStream_t).
#pragma once

#include <cstdint>

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

struct QuantizePerTokenParams {
  TensorView x;       // [M, K]
  TensorView q;       // output, int8 [M, K]
  TensorView scales;  // output, f32 [M]
  TensorView scale;   // quantize_static only: f32, one element (on x's device), finite and > 0
};

struct Int8GemmParams {
  TensorView x;         // int8 [M, K], values in [-127, 127]
  TensorView x_scales;  // f32 [M]
  TensorView w;         // int8 [N, K]
  TensorView w_scales;  // f32 [N]
  TensorView bias;      // f32 [N], optional
  TensorView out;       // [M, N]
};

struct Int4GemmParams {
  TensorView x;       // [M, K]
  TensorView w;       // uint8 [N, K / 2], the layout above
  TensorView scales;  // f32 [N, K / group_size]
  TensorView zeros;   // f32 [N, K / group_size], optional (none: symmetric)
  TensorView bias;    // f32 [N], optional
  TensorView out;     // [M, N], x's dtype
  int64_t group_size = 128;
};

FLASHLM_API void quantize_per_token(const QuantizePerTokenParams& params, void* stream = nullptr);
FLASHLM_API void quantize_static(const QuantizePerTokenParams& params, void* stream = nullptr);
FLASHLM_API void int8_gemm(const Int8GemmParams& params, void* stream = nullptr);
FLASHLM_API void int4_gemm(const Int4GemmParams& params, void* stream = nullptr);

// Largest K int8_gemm takes: 127 * 127 * K must fit an int32.
constexpr int64_t kInt8GemmMaxK = 131072;

}  // namespace flashlm
