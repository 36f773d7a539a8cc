// Internal entry points of the quantizers: one function per type that quantizes one row of `n` floats
// (a whole number of blocks) into consecutive blocks. Without importance weights (qw == nullptr) the
// bytes are those of ggml's quantize_row_*_ref (IQ4_NL and IQ4_XS: of quantize_iq4_nl / quantize_iq4_xs,
// which llama.cpp's quantize tool calls); with them (qw[i] weighs column i of the row, an imatrix entry)
// those of ggml's quantize_<type>(src, dst, 1, n, qw). Q8_0 ignores the weights, as ggml does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::gguf::detail {

void quantize_row_q4_0(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q4_1(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q5_0(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q5_1(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q8_0(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q2_k(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q3_k(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q4_k(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q5_k(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_q6_k(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_iq4_nl(const float* x, void* y, int64_t n, const float* qw);
void quantize_row_iq4_xs(const float* x, void* y, int64_t n, const float* qw);

// A group whose largest magnitude is below this is all zero (ggml's GROUP_MAX_EPS).
constexpr float kGroupMaxEps = 1e-15f;

inline int clamp(int v, int lo, int hi) { return std::max(lo, std::min(hi, v)); }

// The scale searches (quantize_search.cpp), ggml's helpers of the same names, operation for operation.
// make_qx_quants: symmetric levels in [-nmax, nmax - 1] (L gets l + nmax) with weights qw, or x^2 where
// qw is null. make_q3_quants: Q3_K's x^2-weighted search with single-element moves. make_qkx2_quants:
// asymmetric levels in [0, nmax] as scale * l - the_min (ggml's make_qkx3_quants is the same search).
// make_qp_quants: non-negative levels in [0, nmax] for the sub-block scales of Q2_K/Q4_K/Q5_K under an
// imatrix (L is uint8, so a negative level wraps as in ggml).
float make_qx_quants(int n, int nmax, const float* x, int8_t* L, const float* qw);
float make_q3_quants(int n, int nmax, const float* x, int8_t* L);
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min, uint8_t* Laux,
                       float rmin, float rdelta, int nstep, bool use_mad);
float make_qp_quants(int n, int nmax, const float* x, uint8_t* L, const float* qw);

// make_qkx2_quants (quantize_k.cpp) on 8 sub-blocks of n <= 32 values at once, bit-identical, in AVX2:
// x8[8 * i + k] and w8[8 * i + k] are value and weight i of sub-block k; writes levels L8[8 * i + k],
// the_min8[k] and scale8[k]. Only in builds with AVX2 kernels, and only to be called on AVX2 CPUs.
void make_qkx2_quants_x8(int n, int nmax, const float* x8, const float* w8, int32_t* L8, float* the_min8, float* scale8,
                         float rmin, float rdelta, int nstep, bool use_mad);

// make_qx_quants with x^2 weights (Q6_K's search) on 8 sub-blocks of n <= 32 values, likewise; writes
// L8[8 * i + k] = level + nmax and scale8[k].
void make_qx_quants_x8(int n, int nmax, const float* x8, int32_t* L8, float* scale8);

using QuantizeRowFn = void (*)(const float*, void*, int64_t, const float*);

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
