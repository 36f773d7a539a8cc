// Quantizers of the 32-element block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: ggml's quantize_row_*_ref,
// operation for operation (same float expressions, same truncating conversions), so the bytes match
// ggml's and gguf-py's. With an imatrix, ggml's quantize_row_*_impl instead: each block's scale (and
// min) comes from a weighted search (make_qx_quants, or make_qkx2_quants as ggml's make_qkx3_quants),
// weights qw[j] * sqrt(sigma2 + x[j]^2) with sigma2 the mean square of the whole row. Each block is built in a local struct and copied out: rows in a caller's buffer
// need not be aligned.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "shared_decoders.h"
#include "quantize_rows.h"

namespace flashlm::gguf::detail {
namespace {

// Q4_1/Q5_1: the block's min and the step (max - min) / levels, stored as f16; returns 1 / step (0 for a
// constant block).
template <class Block>
float min_and_step(const float* x, int levels, Block& b, float* min) {
  float max = -FLT_MAX;
  *min = FLT_MAX;
  for (int j = 0; j < 32; ++j) {
    if (x[j] < *min) *min = x[j];
    if (x[j] > max) max = x[j];
  }
  const float d = (max - *min) / levels;
  b.d = f32_to_f16(d);
  b.m = f32_to_f16(*min);
  return d != 0.0f ? 1.0f / d : 0.0f;
}

// Q4_0/Q5_0: the step max / -half_levels from the signed largest magnitude, stored as f16; returns 1 / step.
template <class Block>
float signed_step(const float* x, int half_levels, Block& b) {
  float amax;
  const float d = signed_absmax(x, 32, &amax) / -half_levels;
  b.d = f32_to_f16(d);
  return d != 0.0f ? 1.0f / d : 0.0f;
}

// roundf (half away from zero) as an int8, without a libm call: truncate, then step away from zero when
// the dropped fraction is at least one half; v - trunc(v) is exact below 2^22. Larger values and NaN
// (never reached by finite inputs) take roundf itself, so the result is always ggml's.
int8_t round_to_int8(float v) {
  if (!(std::fabs(v) < 4194304.f)) return static_cast<int8_t>(std::round(v));
  const int t = static_cast<int>(v);
  const float frac = v - static_cast<float>(t);
  return static_cast<int8_t>(t + (frac >= 0.5f) - (frac <= -0.5f));
}

template <class Block, class Fn>
void for_each_block(const float* x, void* y, int64_t n, int block, Fn&& fn) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t b = 0; b < n / block; ++b) {
    Block blk;
    fn(x + b * block, blk);
    std::memcpy(out + b * sizeof(Block), &blk, sizeof(Block));
  }
}

// Q5_x: low nibbles in qs as Q4_x, bit 4 of element j in bit j of the 32-bit qh.
template <class Block>
void pack5(const uint8_t* q, Block& b) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    b.qs[j] = static_cast<uint8_t>((q[j] & 0x0F) | ((q[16 + j] & 0x0F) << 4));
    qh |= ((q[j] & 0x10u) >> 4) << j;
    qh |= ((q[16 + j] & 0x10u) >> 4) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) b.qh[k] = static_cast<uint8_t>(qh >> (8 * k));  // little-endian, as ggml
}

// The imatrix path of Q4_0/Q4_1/Q5_0/Q5_1: fn(block values, block weights, block) per block, the weights
// ggml's qw[j] * sqrt(sigma2 + x[j]^2) with sigma2 the row's mean square.
template <class Block, class Fn>
void for_each_weighted_block(const float* x, void* y, int64_t n, const float* qw, Fn&& fn) {
  float sum_x2 = 0;
  for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
  const float sigma2 = sum_x2 / n;
  for_each_block<Block>(x, y, n, 32, [&, b = int64_t{0}](const float* v, Block& blk) mutable {
    const float* w = qw + 32 * b++;
    float weight[32];
    for (int j = 0; j < 32; ++j) weight[j] = w[j] * std::sqrt(sigma2 + v[j] * v[j]);
    fn(v, weight, blk);
  });
}

// Q4_1/Q5_1 under an imatrix: the asymmetric search to [0, nmax] (ggml's make_qkx3_quants), d and m as f16.
template <class Block>
void fit_min_scale(const float* v, const float* weight, int nmax, Block& b, uint8_t* L) {
  uint8_t Laux[32];
  float min;
  const float d = make_qkx2_quants(32, nmax, v, weight, L, &min, Laux, -0.9f, 0.05f, 36, false);
  b.d = f32_to_f16(d);
  b.m = f32_to_f16(-min);
}

}  // namespace

void quantize_row_q4_0(const float* x, void* y, int64_t n, const float* qw) {
  if (qw) {
    for_each_weighted_block<block_q4_0>(x, y, n, qw, [](const float* v, const float* weight, block_q4_0& b) {
      int8_t L[QK4_0];
      b.d = f32_to_f16(make_qx_quants(QK4_0, 8, v, L, weight));
      for (int j = 0; j < QK4_0 / 2; ++j) b.qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
    });
    return;
  }
  for_each_block<block_q4_0>(x, y, n, QK4_0, [](const float* v, block_q4_0& b) {
    const float id = signed_step(v, 8, b);
    for (int j = 0; j < QK4_0 / 2; ++j) {
      const float x0 = v[j] * id, x1 = v[QK4_0 / 2 + j] * id;
      // ggml truncates x + 8.5 through int8_t, then clamps to 15.
      const uint8_t q0 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x0 + 8.5f)));
      const uint8_t q1 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x1 + 8.5f)));
      b.qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  });
}

void quantize_row_q4_1(const float* x, void* y, int64_t n, const float* qw) {
  if (qw) {
    for_each_weighted_block<block_q4_1>(x, y, n, qw, [](const float* v, const float* weight, block_q4_1& b) {
      uint8_t L[QK4_1];
      fit_min_scale(v, weight, 15, b, L);
      for (int j = 0; j < QK4_1 / 2; ++j) b.qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
    });
    return;
  }
  for_each_block<block_q4_1>(x, y, n, QK4_1, [](const float* v, block_q4_1& b) {
    float min;
    const float id = min_and_step(v, 15, b, &min);
    for (int j = 0; j < QK4_1 / 2; ++j) {
      const float x0 = (v[j] - min) * id, x1 = (v[QK4_1 / 2 + j] - min) * id;
      const uint8_t q0 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x0 + 0.5f)));
      const uint8_t q1 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x1 + 0.5f)));
      b.qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  });
}


void quantize_row_q5_0(const float* x, void* y, int64_t n, const float* qw) {
  if (qw) {
    for_each_weighted_block<block_q5_0>(x, y, n, qw, [](const float* v, const float* weight, block_q5_0& b) {
      int8_t L[QK5_0];
      b.d = f32_to_f16(make_qx_quants(QK5_0, 16, v, L, weight));
      pack5(reinterpret_cast<const uint8_t*>(L), b);
    });
    return;
  }
  for_each_block<block_q5_0>(x, y, n, QK5_0, [](const float* v, block_q5_0& b) {
    const float id = signed_step(v, 16, b);
    uint8_t q[QK5_0];
    for (int j = 0; j < QK5_0; ++j) q[j] = static_cast<uint8_t>(std::min<int>(31, static_cast<int8_t>(v[j] * id + 16.5f)));
    pack5(q, b);
  });
}

void quantize_row_q5_1(const float* x, void* y, int64_t n, const float* qw) {
  if (qw) {
    for_each_weighted_block<block_q5_1>(x, y, n, qw, [](const float* v, const float* weight, block_q5_1& b) {
      uint8_t L[QK5_1];
      fit_min_scale(v, weight, 31, b, L);
      pack5(L, b);
    });
    return;
  }
  for_each_block<block_q5_1>(x, y, n, QK5_1, [](const float* v, block_q5_1& b) {
    float min;
    const float id = min_and_step(v, 31, b, &min);
    uint8_t q[QK5_1];
    for (int j = 0; j < QK5_1; ++j) q[j] = static_cast<uint8_t>((v[j] - min) * id + 0.5f);  // no clamp in ggml
    pack5(q, b);
  });
}

void quantize_row_q8_0(const float* x, void* y, int64_t n, const float*) {  // ggml's Q8_0 ignores an imatrix
  for_each_block<block_q8_0>(x, y, n, QK8_0, [](const float* v, block_q8_0& b) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    b.d = f32_to_f16(d);
    for (int j = 0; j < QK8_0; ++j) b.qs[j] = round_to_int8(v[j] * id);
  });
}

QuantizeRowFn quantize_row_fn(DType type) {
  switch (type) {
    case DType::Q4_0: return quantize_row_q4_0;
    case DType::Q4_1: return quantize_row_q4_1;
    case DType::Q5_0: return quantize_row_q5_0;
    case DType::Q5_1: return quantize_row_q5_1;
    case DType::Q8_0: return quantize_row_q8_0;
    case DType::Q2_K: return quantize_row_q2_k;
    case DType::Q3_K: return quantize_row_q3_k;
    case DType::Q4_K: return quantize_row_q4_k;
    case DType::Q5_K: return quantize_row_q5_k;
    case DType::Q6_K: return quantize_row_q6_k;
    case DType::IQ4_NL: return quantize_row_iq4_nl;
    case DType::IQ4_XS: return quantize_row_iq4_xs;
    default: return nullptr;
  }
}

}  // namespace flashlm::gguf::detail
