// Quantizers of the 256-element K-quant super-blocks Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: without an
// importance matrix ggml's quantize_row_*_ref, with one its quantize_row_*_impl, operation for operation
// (the scale searches are in quantize_search.cpp). Each sub-block's scale is found by a small search that
// minimises a weighted squared (or absolute) error; the scales are then quantized to 4, 6 or 8 bits
// against one f16 super-block scale, and the elements requantized against the stored scales. An imatrix
// changes the weights of the searches (qw[i] * sqrt(sigma2 + x[i]^2)) and how the scales are quantized
// (another search, make_qp_quants / make_qx_quants, instead of max / levels). Float expressions keep
// ggml's order and the library builds with -ffp-contract=off: a different rounding anywhere can change
// which candidate wins, and so the bytes. On AVX2 CPUs the searches of Q2_K, Q4_K, Q5_K and Q6_K (the
// last without an imatrix) run 8 sub-blocks at a time in quantize_k_avx2.cpp, with the same bits.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "shared_decoders.h"
#include "flashlm/core/cpu_features.h"
#include "quantize_rows.h"

namespace flashlm::gguf::detail {
namespace {

bool use_avx2() {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
  return cpu_isa() == CpuIsa::AVX2;
#else
  return false;
#endif
}

// Sub-blocks k = 0..7 of n values at src + k * n, transposed to dst[8 * i + k] for the AVX2 searches.
void transpose_8(const float* src, int n, float* dst) {
  for (int k = 0; k < 8; ++k)
    for (int i = 0; i < n; ++i) dst[8 * i + k] = src[k * n + i];
}

// make_qkx2_quants on 8 consecutive sub-blocks of n values (sub-block k at x + k * n, its weights at
// weights + k * n): with AVX2, all 8 at once (lane k = sub-block k, the same bits); else one by one.
void make_qkx2_quants_8(bool avx2, int n, int nmax, const float* x, const float* weights, uint8_t* L, float* mins,
                        float* scales, float rmin, float rdelta, int nstep, bool use_mad) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
  if (avx2) {
    float x8[8 * 32], w8[8 * 32];
    int32_t L8[8 * 32];
    transpose_8(x, n, x8);
    transpose_8(weights, n, w8);
    make_qkx2_quants_x8(n, nmax, x8, w8, L8, mins, scales, rmin, rdelta, nstep, use_mad);
    for (int k = 0; k < 8; ++k)
      for (int i = 0; i < n; ++i) L[k * n + i] = static_cast<uint8_t>(L8[8 * i + k]);
    return;
  }
#endif
  (void)avx2;
  uint8_t Laux[32];
  for (int k = 0; k < 8; ++k)
    scales[k] = make_qkx2_quants(n, nmax, x + k * n, weights + k * n, L + k * n, &mins[k], Laux, rmin, rdelta, nstep, use_mad);
}

// make_qx_quants on 8 consecutive sub-blocks of n values, as make_qkx2_quants_8.
void make_qx_quants_8(bool avx2, int n, int nmax, const float* x, int8_t* L, float* scales) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
  if (avx2) {
    float x8[8 * 32];
    int32_t L8[8 * 32];
    transpose_8(x, n, x8);
    make_qx_quants_x8(n, nmax, x8, L8, scales);
    for (int k = 0; k < 8; ++k)
      for (int i = 0; i < n; ++i) L[k * n + i] = static_cast<int8_t>(L8[8 * i + k]);
    return;
  }
#endif
  (void)avx2;
  for (int k = 0; k < 8; ++k) scales[k] = make_qx_quants(n, nmax, x + k * n, L + k * n, nullptr);
}

// Q2_K/Q3_K pack 2-bit levels four to a byte: byte l of each 32-byte group holds elements l, l + 32,
// l + 64 and l + 96 of its 128-element half.
void pack_2bit(const uint8_t* L, uint8_t* qs) {
  for (int j = 0; j < QK_K; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

// Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins in 12 bytes (ggml's get_scale_min_k4 reads them back).
void pack_scale_min_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* scales) {
  for (int j = 0; j < QK_K / 32; ++j) {
    if (j < 4) {
      scales[j] = ls[j];
      scales[j + 4] = lm[j];
    } else {
      scales[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
      scales[j - 4] |= static_cast<uint8_t>((ls[j] >> 4) << 6);
      scales[j - 0] |= static_cast<uint8_t>((lm[j] >> 4) << 6);
    }
  }
}

void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
  }
}

// The imatrix weights of ggml's quantize_row_*_impl for n values: qw[i] * sqrt(sigma2 + x[i]^2).
void imatrix_weights(const float* x, const float* qw, float sigma2, int n, float* weights) {
  for (int l = 0; l < n; ++l) weights[l] = qw[l] * std::sqrt(sigma2 + x[l] * x[l]);
}

// Sum of x^2 over a super-block, in ggml's order.
float sum_squares(const float* x) {
  float sum = 0;
  for (int l = 0; l < QK_K; ++l) sum += x[l] * x[l];
  return sum;
}

// Sums of each group of `group` weights.
void group_sums(const float* weights, int group, int groups, float* sw) {
  for (int j = 0; j < groups; ++j) {
    float sum = 0;
    for (int l = 0; l < group; ++l) sum += weights[group * j + l];
    sw[j] = sum;
  }
}

// The shared part of Q4_K and Q5_K: per 32-element sub-block an asymmetric fit, scales and mins
// quantized to 6 bits, then every element requantized to [0, nmax] against the stored scale and min.
// Without an imatrix (qw null): weights sqrt(mean x^2) + |x|, the search (rmin, rdelta, nstep), and the
// 6-bit levels against max / 63. With one: weights from qw, ggml's make_qkx3_quants search (-0.9, 0.05,
// 36), and the levels by make_qp_quants (clamped to 63 where clamp_levels: ggml's Q5_K does, its Q4_K
// does not). Fills scales, d, dmin and L.
template <class Block>
void quantize_scale_min_k4(bool avx2, const float* x, const float* qw, Block& y, uint8_t* L, int nmax, float rmin,
                           float rdelta, int nstep, bool clamp_levels) {
  float mins[QK_K / 32], scales[QK_K / 32], weights[QK_K];
  uint8_t ls[QK_K / 32], lm[QK_K / 32];
  if (qw) {
    const float sigma2 = 2 * sum_squares(x) / QK_K;
    imatrix_weights(x, qw, sigma2, QK_K, weights);
    float sw[QK_K / 32];
    group_sums(weights, 32, QK_K / 32, sw);
    make_qkx2_quants_8(avx2, 32, nmax, x, weights, L, mins, scales, -0.9f, 0.05f, 36, false);
    const float d_block = make_qp_quants(QK_K / 32, 63, scales, ls, sw);
    const float m_block = make_qp_quants(QK_K / 32, 63, mins, lm, sw);
    if (clamp_levels) {
      for (int j = 0; j < QK_K / 32; ++j) {
        ls[j] = std::min<uint8_t>(63, ls[j]);
        lm[j] = std::min<uint8_t>(63, lm[j]);
      }
    }
    y.d = f32_to_f16(d_block);
    y.dmin = f32_to_f16(m_block);
  } else {
    for (int j = 0; j < QK_K / 32; ++j) {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[32 * j + l] = av_x + std::fabs(x[32 * j + l]);
    }
    make_qkx2_quants_8(avx2, 32, nmax, x, weights, L, mins, scales, rmin, rdelta, nstep, false);
    float max_scale = 0, max_min = 0;  // the min is subtracted, so scales are positive
    for (int j = 0; j < QK_K / 32; ++j) {
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; ++j) {
      ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
      lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
    }
    y.d = f32_to_f16(max_scale / 63.f);
    y.dmin = f32_to_f16(max_min / 63.f);
  }
  std::memset(y.scales, 0, sizeof y.scales);
  pack_scale_min_k4(ls, lm, y.scales);
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t sc, m;
    get_scale_min_k4(j, y.scales, &sc, &m);
    const float d = f16_to_f32(y.d) * sc;
    if (d == 0) continue;  // keeps the levels of the sub-block fit, as ggml does
    const float dm = f16_to_f32(y.dmin) * m;
    for (int ii = 0; ii < 32; ++ii) L[32 * j + ii] = static_cast<uint8_t>(clamp(nearest_int((x[32 * j + ii] + dm) / d), 0, nmax));
  }
}

// Calls fn(values, weights, block) per super-block of a row; weights is null without an imatrix.
template <class Block, class Fn>
void for_each_superblock(const float* x, void* y, int64_t n, const float* qw, Fn&& fn) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t b = 0; b < n / QK_K; ++b) {
    Block blk;
    std::memset(&blk, 0, sizeof blk);
    fn(x + b * QK_K, qw ? qw + b * QK_K : nullptr, blk);
    std::memcpy(out + b * sizeof(Block), &blk, sizeof(Block));
  }
}

// Q2_K's 16 scale/min pairs to 4 bits each, without an imatrix: against max / 15 each.
void q2_k_levels_max(const float* scales, const float* mins, block_q2_K& b) {
  const float q4scale = 15.f;
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < QK_K / 16; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  if (max_scale > 0) {
    const float iscale = q4scale / max_scale;
    for (int j = 0; j < QK_K / 16; ++j) b.scales[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
    b.d = f32_to_f16(max_scale / q4scale);
  } else {
    for (int j = 0; j < QK_K / 16; ++j) b.scales[j] = 0;
    b.d = f32_to_f16(0.f);
  }
  if (max_min > 0) {
    const float iscale = q4scale / max_min;
    for (int j = 0; j < QK_K / 16; ++j) b.scales[j] |= static_cast<uint8_t>(nearest_int(iscale * mins[j]) << 4);
    b.dmin = f32_to_f16(max_min / q4scale);
  } else {
    b.dmin = f32_to_f16(0.f);
  }
}

// Q3_K's 16 six-bit scales (stored + 32): low nibbles in bytes 0-7, high 2-bit pairs in bytes 8-11.
void pack_q3_k_scales(const int* levels, uint8_t* scales) {
  std::memset(scales, 0, 12);
  for (int j = 0; j < QK_K / 16; ++j) {
    int l = levels[j];
    if (j < 8) {
      scales[j] = static_cast<uint8_t>(l & 0xF);
    } else {
      scales[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
    }
    l >>= 4;
    scales[j % 4 + 8] |= static_cast<uint8_t>(l << (2 * (j / 4)));
  }
}

}  // namespace

void quantize_row_q2_k(const float* x, void* y, int64_t n, const float* qw) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q2_K>(x, y, n, qw, [avx2](const float* v, const float* w, block_q2_K& b) {
    uint8_t L[QK_K];
    float weights[QK_K], mins[QK_K / 16], scales[QK_K / 16];
    if (w) {
      imatrix_weights(v, w, sum_squares(v) / QK_K, QK_K, weights);
    } else {
      for (int l = 0; l < QK_K; ++l) weights[l] = std::fabs(v[l]);
    }
    for (int half = 0; half < 2; ++half) {
      if (w) {
        make_qkx2_quants_8(avx2, 16, 3, v + 128 * half, weights + 128 * half, L + 128 * half, mins + 8 * half,
                           scales + 8 * half, -0.9f, 0.05f, 36, false);
      } else {
        make_qkx2_quants_8(avx2, 16, 3, v + 128 * half, weights + 128 * half, L + 128 * half, mins + 8 * half,
                           scales + 8 * half, -0.5f, 0.1f, 15, true);
      }
    }
    if (w) {
      float sw[QK_K / 16];
      uint8_t ls[QK_K / 16], lm[QK_K / 16];
      group_sums(weights, 16, QK_K / 16, sw);
      b.d = f32_to_f16(make_qp_quants(QK_K / 16, 15, scales, ls, sw));
      b.dmin = f32_to_f16(make_qp_quants(QK_K / 16, 15, mins, lm, sw));
      for (int j = 0; j < QK_K / 16; ++j) b.scales[j] = static_cast<uint8_t>(ls[j] | (lm[j] << 4));
    } else {
      q2_k_levels_max(scales, mins, b);
    }
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = f16_to_f32(b.d) * (b.scales[j] & 0xF);
      if (d == 0) continue;
      const float dm = f16_to_f32(b.dmin) * (b.scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = static_cast<uint8_t>(clamp(nearest_int((v[16 * j + ii] + dm) / d), 0, 3));
    }
    pack_2bit(L, b.qs);
  });
}

void quantize_row_q3_k(const float* x, void* y, int64_t n, const float* qw) {
  for_each_superblock<block_q3_K>(x, y, n, qw, [](const float* v, const float* w, block_q3_K& b) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    int levels[QK_K / 16];  // the stored scale levels, in [0, 63]
    if (w) {
      float weights[QK_K], sw[QK_K / 16];
      imatrix_weights(v, w, 2 * sum_squares(v) / QK_K, QK_K, weights);
      group_sums(weights, 16, QK_K / 16, sw);
      for (int j = 0; j < QK_K / 16; ++j) scales[j] = make_qx_quants(16, 4, v + 16 * j, L + 16 * j, weights + 16 * j);
      int8_t ls[QK_K / 16];
      const float d_block = make_qx_quants(QK_K / 16, 32, scales, ls, sw);
      for (int j = 0; j < QK_K / 16; ++j) levels[j] = ls[j];
      pack_q3_k_scales(levels, b.scales);
      b.d = f32_to_f16(d_block);
    } else {
      for (int j = 0; j < QK_K / 16; ++j) scales[j] = make_q3_quants(16, 4, v + 16 * j, L + 16 * j);
      float amax;
      const float max_scale = signed_absmax(scales, QK_K / 16, &amax);
      if (max_scale != 0) {
        const float iscale = -32.f / max_scale;
        for (int j = 0; j < QK_K / 16; ++j) {
          // ggml keeps the level in an int8 before clamping
          const int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
          levels[j] = std::max<int>(-32, std::min<int>(31, l)) + 32;
        }
        pack_q3_k_scales(levels, b.scales);
        b.d = f32_to_f16(1 / iscale);
      } else {
        std::memset(b.scales, 0, 12);
        b.d = f32_to_f16(0.f);
      }
    }
    for (int j = 0; j < QK_K / 16; ++j) {
      int8_t sc = static_cast<int8_t>(j < 8 ? b.scales[j] & 0xF : b.scales[j - 8] >> 4);
      sc = static_cast<int8_t>((sc | (((b.scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
      const float d = f16_to_f32(b.d) * sc;
      if (d == 0) continue;
      for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = static_cast<int8_t>(clamp(nearest_int(v[16 * j + ii] / d), -4, 3) + 4);
    }
    // The high bit of element j goes to bit j / 32 of hmask[j % 32]; the low two bits are packed as Q2_K.
    std::memset(b.hmask, 0, QK_K / 8);
    uint8_t low[QK_K];
    for (int j = 0; j < QK_K; ++j) {
      uint8_t l = static_cast<uint8_t>(L[j]);
      if (l > 3) {
        b.hmask[j % 32] |= static_cast<uint8_t>(1u << (j / 32));
        l = static_cast<uint8_t>(l - 4);
      }
      low[j] = l;
    }
    pack_2bit(low, b.qs);
  });
}

void quantize_row_q4_k(const float* x, void* y, int64_t n, const float* qw) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q4_K>(x, y, n, qw, [avx2](const float* v, const float* w, block_q4_K& b) {
    uint8_t L[QK_K];
    quantize_scale_min_k4(avx2, v, w, b, L, 15, -1.f, 0.1f, 20, false);
    // 64 elements per 32 bytes: element l in the low nibble of byte l, element l + 32 in its high nibble.
    for (int j = 0; j < QK_K; j += 64)
      for (int l = 0; l < 32; ++l) b.qs[j / 2 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
  });
}

void quantize_row_q5_k(const float* x, void* y, int64_t n, const float* qw) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q5_K>(x, y, n, qw, [avx2](const float* v, const float* w, block_q5_K& b) {
    uint8_t L[QK_K];
    quantize_scale_min_k4(avx2, v, w, b, L, 31, -0.5f, 0.1f, 15, true);
    // As Q4_K for the low 4 bits; bit 4 of elements l and l + 32 of the k-th 64 in bits 2k and 2k + 1
    // of qh[l].
    std::memset(b.qh, 0, QK_K / 8);
    for (int j = 0, k = 0; j < QK_K; j += 64, ++k) {
      for (int l = 0; l < 32; ++l) {
        int l1 = L[j + l], l2 = L[j + l + 32];
        if (l1 > 15) {
          l1 -= 16;
          b.qh[l] |= static_cast<uint8_t>(1u << (2 * k));
        }
        if (l2 > 15) {
          l2 -= 16;
          b.qh[l] |= static_cast<uint8_t>(2u << (2 * k));
        }
        b.qs[j / 2 + l] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
    }
  });
}

void quantize_row_q6_k(const float* x, void* y, int64_t n, const float* qw) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q6_K>(x, y, n, qw, [avx2](const float* v, const float* w, block_q6_K& b) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    if (w) {  // ggml weighs Q6_K's search with the imatrix values themselves
      for (int j = 0; j < QK_K / 16; ++j) scales[j] = make_qx_quants(16, 32, v + 16 * j, L + 16 * j, w + 16 * j);
    } else {
      for (int half = 0; half < 2; ++half) make_qx_quants_8(avx2, 16, 32, v + 128 * half, L + 128 * half, scales + 8 * half);
    }
    float max_abs_scale;
    const float max_scale = signed_absmax(scales, QK_K / 16, &max_abs_scale);
    if (max_abs_scale < kGroupMaxEps) return;  // all zero, d = +0
    const float iscale = -128.f / max_scale;
    b.d = f32_to_f16(1 / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) b.scales[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = f16_to_f32(b.d) * b.scales[j];
      if (d == 0) continue;
      for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = static_cast<int8_t>(clamp(nearest_int(v[16 * j + ii] / d), -32, 31) + 32);
    }
    // Low 4 bits: elements l and l + 64 (of each 128) in ql[l], l + 32 and l + 96 in ql[l + 32]; the high
    // 2 bits of l, l + 32, l + 64, l + 96 in qh[l].
    for (int j = 0; j < QK_K; j += 128) {
      uint8_t* ql = b.ql + j / 2;
      uint8_t* qh = b.qh + j / 4;
      for (int l = 0; l < 32; ++l) {
        const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
        ql[l] = static_cast<uint8_t>(q1 | (q3 << 4));
        ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
        qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                     ((L[j + l + 96] >> 4) << 6));
      }
    }
  });
}

}  // namespace flashlm::gguf::detail
