// Scalar kernels of the quantized linear layers' input gradient (backward_input_kernels.h): the reference
// the AVX2 ones are tested against. int8 and int4 decode as the forward kernels read them (w = q * s and
// w = (u - z) * s); GGUF blocks go through gguf's decoders (backward_input.cpp).
#include "backward_input_kernels.h"

namespace flashlm::gemm::detail {

void decode_rows_scalar(const BackwardWeight& w, int64_t r0, int rows, int64_t b0, int64_t b1, float* out) {
  const int64_t width = (b1 - b0) * w.block, groups = w.k / w.block;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    const uint8_t* src = w.w + row * w.row_bytes;
    float* dst = out + r * width;
    if (w.kind == WeightKind::Int8) {
      const auto* q = reinterpret_cast<const int8_t*>(src);
      const float s = w.scales[row];
      for (int64_t j = 0; j < width; ++j) dst[j] = float(q[b0 * w.block + j]) * s;
      continue;
    }
    // Int4: byte j of a group holds element j (low nibble) and element j + group / 2 (high nibble).
    const int64_t half = w.block / 2;
    for (int64_t b = b0; b < b1; ++b, dst += w.block) {
      const float s = w.scales[row * groups + b], z = w.zeros ? w.zeros[row * groups + b] : 8.f;
      const uint8_t* q = src + b * half;
      for (int64_t j = 0; j < half; ++j) {
        dst[j] = (float(q[j] & 15) - z) * s;
        dst[j + half] = (float(q[j] >> 4) - z) * s;
      }
    }
  }
}

void accumulate_scalar(const float* wt, int rows, int64_t width, const float* dyt, int64_t m, float* dx, int64_t ldx) {
  for (int64_t i = 0; i < m; ++i) {
    float* out = dx + i * ldx;
    for (int r = 0; r < rows; ++r) {
      const float a = dyt[r * m + i];
      const float* w = wt + r * width;
      for (int64_t j = 0; j < width; ++j) out[j] += a * w[j];
    }
  }
}

}  // namespace flashlm::gemm::detail
