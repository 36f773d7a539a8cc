// Quantizers of IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256 with 8 six-bit sub-block scales):
// ggml's quantize_row_iq4_nl_impl as its quantize_iq4_nl / quantize_iq4_xs call it (ntry 7, the path of
// llama.cpp's quantize tool, with or without an imatrix), operation for operation. Each element maps to
// the nearest of the 16 non-linear levels kvalues_iq4nl; a block's scale is the weighted least-squares
// fit over 15 candidate scales around max / -127 (weights x^2, or qw[j] * sqrt(sigma2 + x[j]^2) under an
// imatrix). IQ4_XS then quantizes the sub-block scales to 6 bits against the super-block's largest and
// requantizes its elements against them.
#include <cmath>
#include <cstring>

#include "flashlm/gguf/blocks.h"
#include "shared_decoders.h"
#include "quantize_rows.h"

namespace flashlm::gguf::detail {
namespace {

constexpr int kTries = 7;  // ggml's ntry for quantize_iq4_nl and quantize_iq4_xs

// The index of the level of kvalues_iq4nl nearest to x (the lower one on ties), as ggml's best_index_int8:
// its bisection ends at the last level ml <= x (levels 1..14 counted without branches here, the same index)
// and picks between ml and ml + 1 by the same float differences. About 1.7x faster than the bisection
// (IQ4_NL, one thread, 64 x 4096: 535 -> 280-320 ms; ggml's C 250-390 ms in the same runs, a loaded machine).
int best_index(float x) {
  const int8_t* val = kvalues_iq4nl;
  if (x <= val[0]) return 0;
  if (x >= val[15]) return 15;
  int ml = 0;
  for (int k = 1; k < 15; ++k) ml += x >= val[k];
  return x - val[ml] < val[ml + 1] - x ? ml : ml + 1;
}

// One block of 32 values: its levels into L and its scale (0 for an all-zero block, L untouched then).
float fit_block(const float* xb, const float* weight, uint8_t* L) {
  float amax = 0, max = 0;
  for (int j = 0; j < 32; ++j) {
    const float ax = std::fabs(xb[j]);
    if (ax > amax) {
      amax = ax;
      max = xb[j];
    }
  }
  if (amax < kGroupMaxEps) return 0;
  const int8_t v0 = kvalues_iq4nl[0];
  float d = -max / v0;
  float id = 1 / d;
  float sumqx = 0, sumq2 = 0;
  for (int j = 0; j < 32; ++j) {
    const int l = best_index(id * xb[j]);
    L[j] = static_cast<uint8_t>(l);
    const float q = kvalues_iq4nl[l];
    const float w = weight[j];
    sumqx += w * q * xb[j];
    sumq2 += w * q * q;
  }
  d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
  float best = d * sumqx;
  for (int itry = -kTries; itry <= kTries; ++itry) {
    id = (itry + v0) / max;
    sumqx = sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
      const float q = kvalues_iq4nl[best_index(id * xb[j])];
      const float w = weight[j];
      sumqx += w * q * xb[j];
      sumq2 += w * q * q;
    }
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      d = sumqx / sumq2;
      best = d * sumqx;
    }
  }
  return d;
}

// The weights of the 32 values at xb: qw[j] * sqrt(sigma2 + x^2) under an imatrix, else x^2.
void block_weights(const float* xb, const float* qw, float sigma2, float* weight) {
  for (int j = 0; j < 32; ++j) weight[j] = qw ? qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]) : xb[j] * xb[j];
}

// ggml's sigma2 of a super-block of `size` values: 2 * mean(x^2), in its order of operations.
float sigma2_of(const float* x, int size) {
  float sigma2 = 0;
  for (int j = 0; j < size; ++j) sigma2 += x[j] * x[j];
  sigma2 *= 2.f / size;
  return sigma2;
}

// Levels l and l + 16 of each 32 share byte l of qs[16 * block], low nibble first.
void pack_nibbles(const uint8_t* L, int size, uint8_t* qs) {
  for (int i = 0; i < size / 32; ++i)
    for (int j = 0; j < 16; ++j) qs[16 * i + j] = static_cast<uint8_t>(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

}  // namespace

void quantize_row_iq4_nl(const float* x, void* y, int64_t n, const float* qw) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t ib = 0; ib < n / QK4_NL; ++ib) {
    const float* xb = x + QK4_NL * ib;
    const float* w = qw ? qw + QK4_NL * ib : nullptr;
    float weight[32];
    block_weights(xb, w, w ? sigma2_of(xb, QK4_NL) : 0.f, weight);
    uint8_t L[QK4_NL];
    const float d = fit_block(xb, weight, L);
    block_iq4_nl b;
    b.d = f32_to_f16(d);
    // every element against the block's scale (a zero scale maps everything to the level nearest 0)
    const float id = d != 0 ? 1 / d : 0;
    for (int j = 0; j < QK4_NL; ++j) L[j] = static_cast<uint8_t>(best_index(id * xb[j]));
    pack_nibbles(L, QK4_NL, b.qs);
    std::memcpy(out + ib * sizeof b, &b, sizeof b);
  }
}

void quantize_row_iq4_xs(const float* x, void* y, int64_t n, const float* qw) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
    const float* xs = x + QK_K * ibl;
    const float* ws = qw ? qw + QK_K * ibl : nullptr;
    const float sigma2 = ws ? sigma2_of(xs, QK_K) : 0.f;
    float scales[QK_K / 32];
    uint8_t L[QK_K];
    float max_scale = 0, amax_scale = 0;
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      float weight[32];
      block_weights(xs + 32 * ib, ws ? ws + 32 * ib : nullptr, sigma2, weight);
      scales[ib] = fit_block(xs + 32 * ib, weight, L + 32 * ib);
      if (std::fabs(scales[ib]) > amax_scale) {
        amax_scale = std::fabs(scales[ib]);
        max_scale = scales[ib];
      }
    }
    block_iq4_xs b;
    std::memset(&b, 0, sizeof b);
    // 6-bit sub-block scales l in [-32, 31] against d = -max / 32, stored + 32: low nibbles two to a byte
    // in scales_l, high 2-bit pairs in scales_h. The elements are requantized against d * l (float d,
    // not its f16 rounding, as ggml).
    const float d = -max_scale / 32;
    b.d = f32_to_f16(d);
    const float id = d != 0 ? 1 / d : 0.f;
    uint16_t scales_h = 0;
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      int l = clamp(nearest_int(id * scales[ib]), -32, 31);
      const float dl = d * l;
      const float idl = dl != 0 ? 1 / dl : 0.f;
      for (int j = 0; j < 32; ++j) L[32 * ib + j] = static_cast<uint8_t>(best_index(idl * xs[32 * ib + j]));
      l += 32;
      b.scales_l[ib / 2] |= static_cast<uint8_t>((l & 0xF) << (4 * (ib % 2)));
      scales_h |= static_cast<uint16_t>((l >> 4) << (2 * (ib % 8)));
    }
    b.scales_h = scales_h;
    pack_nibbles(L, QK_K, b.qs);
    std::memcpy(out + ibl * sizeof b, &b, sizeof b);
  }
}

}  // namespace flashlm::gguf::detail
