// Internal entry points of the quantizers: one function per type that quantizes `n` floats (a whole
// number of blocks) into consecutive blocks, exactly as ggml's quantize_row_*_ref does.
#pragma once

#include <cmath>
#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::gguf::detail {

void quantize_row_q4_0(const float* x, void* y, int64_t n);
void quantize_row_q4_1(const float* x, void* y, int64_t n);
void quantize_row_q5_0(const float* x, void* y, int64_t n);
void quantize_row_q5_1(const float* x, void* y, int64_t n);
void quantize_row_q8_0(const float* x, void* y, int64_t n);
void quantize_row_q2_k(const float* x, void* y, int64_t n);
void quantize_row_q3_k(const float* x, void* y, int64_t n);
void quantize_row_q4_k(const float* x, void* y, int64_t n);
void quantize_row_q5_k(const float* x, void* y, int64_t n);
void quantize_row_q6_k(const float* x, void* y, int64_t n);

// make_qkx2_quants (quantize_k.cpp) on 8 sub-blocks of n <= 32 values at once, bit-identical, in AVX2:
// x8[8 * i + k] and w8[8 * i + k] are value and weight i of sub-block k; writes levels L8[8 * i + k],
// the_min8[k] and scale8[k]. Only in builds with AVX2 kernels, and only to be called on AVX2 CPUs.
void make_qkx2_quants_x8(int n, int nmax, const float* x8, const float* w8, int32_t* L8, float* the_min8, float* scale8,
                         float rmin, float rdelta, int nstep, bool use_mad);

// make_qx_quants with x^2 weights (Q6_K's search) on 8 sub-blocks of n <= 32 values, likewise; writes
// L8[8 * i + k] = level + nmax and scale8[k].
void make_qx_quants_x8(int n, int nmax, const float* x8, int32_t* L8, float* scale8);

using QuantizeRowFn = void (*)(const float*, void*, int64_t);

// The row quantizer of a block type, or nullptr where there is none.
QuantizeRowFn quantize_row_fn(DType type);

// ggml's nearest_int: round to nearest (ties to even) by adding 1.5 * 2^23 and reading the mantissa
// bits. Exact for |v| < 2^22, which the quantizers guarantee; for larger values (never reached by
// finite inputs) it returns ggml's result bit for bit rather than the mathematically nearest integer.
inline int nearest_int(float v) {
  float shifted = v + 12582912.f;
  int32_t bits;
  static_assert(sizeof bits == sizeof shifted, "float is 32-bit");
  __builtin_memcpy(&bits, &shifted, 4);
  return (bits & 0x007fffff) - 0x00400000;
}

// The element of largest magnitude, with its sign (the first one on ties), as ggml picks it; its
// magnitude goes to *amax.
inline float signed_absmax(const float* x, int n, float* amax) {
  float max = 0;
  *amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > *amax) {
      *amax = ax;
      max = x[i];
    }
  }
  return max;
}

}  // namespace flashlm::gguf::detail
