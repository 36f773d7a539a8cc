// AVX2 kernels of the quantized linear layers' input gradient (backward_input_kernels.h). The decoders
// compute exactly the scalar ones' values (the same float multiply and subtract, no fused operations); the
// accumulation fuses each multiply-add, so sums differ from the scalar kernel's by float32 rounding only.
#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"
#include "backward_input_kernels.h"

namespace flashlm::gemm::detail {
namespace {

// 8 bytes as 8 floats: signed (int8 weights) or unsigned (nibbles already masked).
FLASHLM_AVX2_INLINE __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
FLASHLM_AVX2_INLINE __m256 u8x8(__m128i x) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x)); }

FLASHLM_AVX2_INLINE void decode_int8_row(const int8_t* q, float s, int64_t width, float* dst) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) _mm256_storeu_ps(dst + j, _mm256_mul_ps(i8x8(q + j), vs));
  for (; j < width; ++j) dst[j] = float(q[j]) * s;
}

// One int4 group: byte j holds element j (low nibble) and element j + half (high nibble); half >= 16.
FLASHLM_AVX2_INLINE void decode_int4_group(const uint8_t* q, int64_t half, float s, float z, float* dst) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t j = 0; j < half; j += 8) {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
    const __m128i lo = _mm_and_si128(x, mask), hi = _mm_and_si128(_mm_srli_epi16(x, 4), mask);
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_sub_ps(u8x8(lo), vz), vs));
    _mm256_storeu_ps(dst + j + half, _mm256_mul_ps(_mm256_sub_ps(u8x8(hi), vz), vs));
  }
}

// out[0 .. width) += sum_r a[r] * w[r * width + j] for ROWS rows, 16 columns per step.
template <int ROWS>
FLASHLM_AVX2_INLINE void accumulate_row(const float* wt, int64_t width, const float* a, float* out) {
  __m256 va[ROWS];
  for (int r = 0; r < ROWS; ++r) va[r] = _mm256_set1_ps(a[r]);
  int64_t j = 0;
  for (; j + 16 <= width; j += 16) {
    __m256 acc0 = _mm256_loadu_ps(out + j), acc1 = _mm256_loadu_ps(out + j + 8);
    for (int r = 0; r < ROWS; ++r) {
      acc0 = _mm256_fmadd_ps(va[r], _mm256_loadu_ps(wt + r * width + j), acc0);
      acc1 = _mm256_fmadd_ps(va[r], _mm256_loadu_ps(wt + r * width + j + 8), acc1);
    }
    _mm256_storeu_ps(out + j, acc0);
    _mm256_storeu_ps(out + j + 8, acc1);
  }
  for (; j < width; ++j) {
    float acc = out[j];
    for (int r = 0; r < ROWS; ++r) acc = __builtin_fmaf(a[r], wt[r * width + j], acc);
    out[j] = acc;
  }
}

}  // namespace

bool decode_rows_avx2(const BackwardWeight& w, int64_t r0, int rows, int64_t b0, int64_t b1, float* out) {
  if (w.kind == WeightKind::Gguf) return false;
  const int64_t width = (b1 - b0) * w.block, groups = w.k / w.block;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    const uint8_t* src = w.w + row * w.row_bytes;
    if (w.kind == WeightKind::Int8) {
      decode_int8_row(reinterpret_cast<const int8_t*>(src) + b0 * w.block, w.scales[row], width, out + r * width);
      continue;
    }
    float* dst = out + r * width;
    for (int64_t b = b0; b < b1; ++b, dst += w.block)
      decode_int4_group(src + b * w.block_bytes, w.block / 2, w.scales[row * groups + b],
                        w.zeros ? w.zeros[row * groups + b] : 8.f, dst);
  }
  return true;
}

void accumulate_avx2(const float* wt, int rows, int64_t width, const float* dyt, int64_t m, float* dx, int64_t ldx) {
  float a[kRowGroup];
  for (int64_t i = 0; i < m; ++i) {
    for (int r = 0; r < rows; ++r) a[r] = dyt[r * m + i];
    float* out = dx + i * ldx;
    switch (rows) {
      case 4: accumulate_row<4>(wt, width, a, out); break;
      case 3: accumulate_row<3>(wt, width, a, out); break;
      case 2: accumulate_row<2>(wt, width, a, out); break;
      default: accumulate_row<1>(wt, width, a, out); break;
    }
  }
}

}  // namespace flashlm::gemm::detail
