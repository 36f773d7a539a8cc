// Quantizers of the 256-element K-quant super-blocks Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, without an
// importance matrix: ggml's quantize_row_*_ref and their helpers (make_qx_quants, make_q3_quants,
// make_qkx2_quants), operation for operation. Each sub-block's scale is found by a small search that
// minimises a weighted squared (or absolute) error; the scales are then quantized to 4, 6 or 8 bits
// against one f16 super-block scale, and the elements requantized against the stored scales. Float
// expressions keep ggml's order and the library builds with -ffp-contract=off: a different rounding
// anywhere can change which candidate wins, and so the bytes. On AVX2 CPUs the searches of Q2_K, Q4_K,
// Q5_K and Q6_K run 8 sub-blocks at a time in quantize_k_avx2.cpp, with the same bits.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "shared_decoders.h"
#include "flashlm/core/cpu_features.h"
#include "quantize_rows.h"

namespace flashlm::gguf::detail {
namespace {

// A group whose largest magnitude is below this is all zero (ggml's GROUP_MAX_EPS).
constexpr float kGroupMaxEps = 1e-15f;

int clamp(int v, int lo, int hi) { return std::max(lo, std::min(hi, v)); }

// Symmetric quantization of n values to [-nmax, nmax - 1] (stored as l + nmax in L), with weights x^2
// (rmse_type 1, the only kind the reference quantizers use): tries 18 scales around nmax / max and
// keeps the one with the best weighted fit. Returns the scale (negative when max is positive).
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
  float amax;
  const float max = signed_absmax(x, n, &amax);
  if (amax < kGroupMaxEps) {
    std::memset(L, 0, n);
    return 0.f;
  }
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Q3_K's sub-block quantizer: symmetric to [-nmax, nmax - 1], then up to 5 passes that move single
// elements to the level that most improves the x^2-weighted fit. L receives l + nmax.
float make_q3_quants(int n, int nmax, const float* x, int8_t* L) {
  float amax;
  const float max = signed_absmax(x, n, &amax);
  if (amax < kGroupMaxEps) {
    std::memset(L, 0, n);
    return 0.f;
  }
  const float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0) {
        float sl2 = suml2 - w * L[i] * L[i];
        const int new_l = clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Asymmetric quantization of n values to [0, nmax] as scale * l - the_min: from the min-max fit, tries
// nstep + 1 scales (rmin + rdelta * is + nmax) / (max - min), each with the least-squares scale and
// min for its levels, and keeps the one with the smallest weighted error (absolute when use_mad).
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min, uint8_t* Laux,
                       float rmin, float rdelta, int nstep, bool use_mad) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    std::memset(L, 0, n);
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(clamp(nearest_int(iscale * (x[i] - min)), 0, nmax));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best_error += weights[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clamp(nearest_int(iscale * (x[i] - min)), 0, nmax);
      Laux[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        cur_error += weights[i] * diff;
      }
      if (cur_error < best_error) {
        std::memcpy(L, Laux, n);
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

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
  for (int k = 0; k < 8; ++k) scales[k] = make_qx_quants(n, nmax, x + k * n, L + k * n);
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

// The shared part of Q4_K and Q5_K: per 32-element sub-block an asymmetric fit with weights
// sqrt(mean x^2) + |x|, scales and mins quantized to 6 bits against max / 63, then every element
// requantized to [0, nmax] against the stored scale and min. Fills scales, d, dmin and L.
template <class Block>
void quantize_scale_min_k4(bool avx2, const float* x, Block& y, uint8_t* L, int nmax, float rmin, float rdelta, int nstep) {
  float mins[QK_K / 32], scales[QK_K / 32], weights[QK_K];
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
  uint8_t ls[QK_K / 32], lm[QK_K / 32];
  for (int j = 0; j < QK_K / 32; ++j) {
    ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
    lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
  }
  std::memset(y.scales, 0, sizeof y.scales);
  pack_scale_min_k4(ls, lm, y.scales);
  y.d = f32_to_f16(max_scale / 63.f);
  y.dmin = f32_to_f16(max_min / 63.f);
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t sc, m;
    get_scale_min_k4(j, y.scales, &sc, &m);
    const float d = f16_to_f32(y.d) * sc;
    if (d == 0) continue;  // keeps the levels of the sub-block fit, as ggml does
    const float dm = f16_to_f32(y.dmin) * m;
    for (int ii = 0; ii < 32; ++ii) L[32 * j + ii] = static_cast<uint8_t>(clamp(nearest_int((x[32 * j + ii] + dm) / d), 0, nmax));
  }
}

template <class Block, class Fn>
void for_each_superblock(const float* x, void* y, int64_t n, Fn&& fn) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t b = 0; b < n / QK_K; ++b) {
    Block blk;
    std::memset(&blk, 0, sizeof blk);
    fn(x + b * QK_K, blk);
    std::memcpy(out + b * sizeof(Block), &blk, sizeof(Block));
  }
}

}  // namespace

void quantize_row_q2_k(const float* x, void* y, int64_t n) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q2_K>(x, y, n, [avx2](const float* v, block_q2_K& b) {
    uint8_t L[QK_K];
    float weights[QK_K], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int l = 0; l < QK_K; ++l) weights[l] = std::fabs(v[l]);
    for (int half = 0; half < 2; ++half)
      make_qkx2_quants_8(avx2, 16, 3, v + 128 * half, weights + 128 * half, L + 128 * half, mins + 8 * half,
                         scales + 8 * half, -0.5f, 0.1f, 15, true);
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
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = f16_to_f32(b.d) * (b.scales[j] & 0xF);
      if (d == 0) continue;
      const float dm = f16_to_f32(b.dmin) * (b.scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = static_cast<uint8_t>(clamp(nearest_int((v[16 * j + ii] + dm) / d), 0, 3));
    }
    pack_2bit(L, b.qs);
  });
}

void quantize_row_q3_k(const float* x, void* y, int64_t n) {
  for_each_superblock<block_q3_K>(x, y, n, [](const float* v, block_q3_K& b) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int j = 0; j < QK_K / 16; ++j) scales[j] = make_q3_quants(16, 4, v + 16 * j, L + 16 * j);
    float amax;
    const float max_scale = signed_absmax(scales, QK_K / 16, &amax);
    // 16 six-bit scales (stored + 32): low nibbles in bytes 0-7, high 2-bit pairs in bytes 8-11.
    std::memset(b.scales, 0, 12);
    if (max_scale != 0) {
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < QK_K / 16; ++j) {
        int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
        l = static_cast<int8_t>(std::max<int>(-32, std::min<int>(31, l)) + 32);
        if (j < 8) {
          b.scales[j] = l & 0xF;
        } else {
          b.scales[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
        }
        l = static_cast<int8_t>(l >> 4);
        b.scales[j % 4 + 8] |= static_cast<uint8_t>(l << (2 * (j / 4)));
      }
      b.d = f32_to_f16(1 / iscale);
    } else {
      b.d = f32_to_f16(0.f);
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

void quantize_row_q4_k(const float* x, void* y, int64_t n) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q4_K>(x, y, n, [avx2](const float* v, block_q4_K& b) {
    uint8_t L[QK_K];
    quantize_scale_min_k4(avx2, v, b, L, 15, -1.f, 0.1f, 20);
    // 64 elements per 32 bytes: element l in the low nibble of byte l, element l + 32 in its high nibble.
    for (int j = 0; j < QK_K; j += 64)
      for (int l = 0; l < 32; ++l) b.qs[j / 2 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
  });
}

void quantize_row_q5_k(const float* x, void* y, int64_t n) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q5_K>(x, y, n, [avx2](const float* v, block_q5_K& b) {
    uint8_t L[QK_K];
    quantize_scale_min_k4(avx2, v, b, L, 31, -0.5f, 0.1f, 15);
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

void quantize_row_q6_k(const float* x, void* y, int64_t n) {
  const bool avx2 = use_avx2();
  for_each_superblock<block_q6_K>(x, y, n, [avx2](const float* v, block_q6_K& b) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int half = 0; half < 2; ++half) make_qx_quants_8(avx2, 16, 32, v + 128 * half, L + 128 * half, scales + 8 * half);
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
