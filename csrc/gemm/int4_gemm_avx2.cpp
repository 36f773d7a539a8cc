// AVX2 W4A16 GEMM: int4 weights (layout in int_gemm.h) times f32 activations, dequantized on the fly.
// Compiled with -mavx2 -mfma -mf16c, called only after a run-time CPU check. Reference:
// int4_gemm_scalar; tested by tests/test_int_gemm.py against it and against float64.
//
// Two paths:
// - M <= 4 (decode): a GEMV that streams each weight row once. The zero point leaves the inner loop:
//   sum_k (u - z) s x = s (sum_k u x - z sum_k x), and the group sums of x are computed once per call, so
//   the inner loop is unpack and FMA: each nibble masked in place and converted to float, or, on AMD
//   cores, read as a subnormal float by a single mask.
// - M > 4: a panel of 16 columns x kKc values of K is dequantized into a small f32 buffer, k-major
//   (buf[k][16]), and every row of x runs over it with a 4 x 16 outer-product micro-kernel (8 f32
//   accumulators), so the dequantization is paid once per panel, not once per row.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../core/avx2.h"
#include "../core/half.h"
#include "../core/hsum_avx2.h"
#include "int_gemm_kernels.h"
#include "transpose_avx2.h"

#define FLASHLM_AVX2_INLINE_LAMBDA __attribute__((always_inline))

namespace flashlm::gemm {
namespace {

constexpr int64_t kCols = 16, kRows = 4, kGemvMaxRows = 4;
constexpr int64_t kKc = 512;  // K per panel chunk: 16 x 512 f32 = 32 KiB, the size of the L1 data cache

using core::hsum;

FLASHLM_AVX2_INLINE void store_out(const Int4Args& a, int64_t m, int64_t n, float y) {
  if (a.out_dtype == DType::F32) {
    static_cast<float*>(a.out)[m * a.N + n] = y;
  } else {
    static_cast<uint16_t*>(a.out)[m * a.N + n] = core::f32_to_bf16(y);
  }
}

// 8 weight bytes -> elements j .. j + 7 (low nibbles) and j + group/2 .. (high nibbles) of a group, as f32 u.
FLASHLM_AVX2_INLINE void unpack8(const uint8_t* b, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

// The GEMV's unpacking. A block is 32 weight bytes (64 elements), loaded as 8 lanes of 32 bits: lane i holds
// block bytes 4i .. 4i + 3, eight nibbles, nibble p at bits 4p .. 4p + 3 (the low or high nibble of byte
// 4i + p / 2). Vector f[p] holds nibble p of every lane, as a float equal to u times a power of two of p's
// own; rather than restore the weights' order, the call reorders x once to match, scaled by the inverse
// powers (permute_x: M K floats, small next to the N K / 2 weight bytes; powers of two, so exact), and the
// inner loop is the unpack and one FMA per 8 weights. Two ways to make f[p]:
// - convert: the nibble masked in place and converted to float (u 2^(4p); nibble 7 shifted down to avoid
//   the sign bit), two operations per 8 weights;
// - subnormal: the masked nibble read as it is, as the subnormal float u 2^(4p' - 149) (p' = p for p < 5;
//   nibbles 5-7 shifted down 12 bits first, p' = p - 3, so they stay below the exponent), one AND per 8
//   weights. x is scaled by 2^(90 - 4p'), so every product is u x 2^-59 and the result is scaled back at
//   the end. It needs |x| < 2^36 (the scaled x stays finite: the dispatcher checks) and subnormal operands
//   that read as themselves (the kernel clears the MXCSR's denormals-are-zero bit while it runs).
//   Measured on Zen 3, one core, weights in L2: 12-13 GB/s of weights against 9.7 for `convert`. Intel
//   cores may take a microcode assist on subnormal FMA operands, so only AMD cores use it
//   (CpuFeatures::amd).
// Either way each product is exact u times x: the sums carry no offset (s (u x - z x) per term).
constexpr int64_t kBlockBytes = 32;
constexpr int kSubnormalXExp = 90, kSubnormalYExp = 59;  // x scaled by 2^(90 - 4 p'), y by 2^59
constexpr float kSubnormalMaxX = 68719476736.f;           // 2^36

// xp [M][blocks * 64]: xp[r][64 b + 8 p + i] = x[r, element of block b's nibble p in lane i] times the
// variant's power of two, 0 past K.
void permute_x(const Int4Args& a, bool subnormal, float* xp) {
  const auto* x = static_cast<const float*>(a.x);
  const int64_t bytes = a.K / 2, blocks = (bytes + kBlockBytes - 1) / kBlockBytes, half = a.group / 2;
  const int half_log2 = __builtin_ctzll(uint64_t(half));  // half is 16, 32 or 64
  float scales[8];
  for (int p = 0; p < 8; ++p) {
    if (subnormal) {
      scales[p] = __builtin_ldexpf(1.f, kSubnormalXExp - 4 * (p < 5 ? p : p - 3));
    } else {
      scales[p] = p < 7 ? __builtin_ldexpf(1.f, -4 * p) : 1.f;
    }
  }
  for (int64_t r = 0; r < a.M; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int p = 0; p < 8; ++p) {
        for (int i = 0; i < 8; ++i) {
          // Byte t of the row: element t of its group's first half (low nibble) or second half (high).
          const int64_t t = b * kBlockBytes + 4 * i + p / 2;
          const int64_t elem = ((t >> half_log2) << (half_log2 + 1)) + (t & (half - 1)) + (p % 2) * half;
          xp[(r * blocks + b) * 64 + 8 * p + i] = t < bytes ? x[r * a.K + elem] * scales[p] : 0.f;
        }
      }
    }
  }
}

FLASHLM_AVX2_INLINE void unpack_convert(__m256i v, __m256 (&f)[8]) {
  for (int p = 0; p < 7; ++p) f[p] = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << (4 * p))));
  f[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
}

FLASHLM_AVX2_INLINE void unpack_subnormal(__m256i v, __m256 (&f)[8]) {
  for (int p = 0; p < 5; ++p) f[p] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << (4 * p))));
  const __m256i upper = _mm256_srli_epi32(v, 12);  // nibbles 5, 6, 7 at bits 8 .. 19
  for (int p = 5; p < 8; ++p)
    f[p] = _mm256_castsi256_ps(_mm256_and_si256(upper, _mm256_set1_epi32(15 << (4 * (p - 3)))));
}

// total[r] += s acc[r], s a vector of scales (per lane: group 32 puts two groups in a block), and clears
// the accumulators.
template <int R>
FLASHLM_AVX2_INLINE void close_group(__m256 s, __m256 (&acc)[R][2], __m256 (&total)[R]) {
  for (int r = 0; r < R; ++r) {
    const __m256 dot = _mm256_add_ps(acc[r][0], acc[r][1]);
    total[r] = _mm256_fmadd_ps(dot, s, total[r]);
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  }
}

// GEMV for R rows of x: y[r, n] = c sum_g s_g acc_g - sum_g s_g z_g S_g + bias, acc_g = sum over group g of
// f x (= u x / c), S_g the group's sum of x (c = 2^59 for the subnormal variant, 1 for convert). `xp` is x
// reordered by permute_x.
template <int R, bool Subnormal>
void gemv(const Int4Args& a, const float* xp, const float* group_sums, int64_t n_begin, int64_t n_end) {
  constexpr int kAcc = 2;  // two accumulators per row: more only spill registers (measured)
  const int64_t groups = a.K / a.group, half = a.group / 2, bytes = a.K / 2;
  const int64_t blocks = (bytes + kBlockBytes - 1) / kBlockBytes, blocks_per_group = half / kBlockBytes;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w = a.w + n * bytes;
    const float* scales = a.scales + n * groups;
    __m256 total[R], acc[R][kAcc], f[8];
    for (int r = 0; r < R; ++r) {
      total[r] = _mm256_setzero_ps();
      for (int i = 0; i < kAcc; ++i) acc[r][i] = _mm256_setzero_ps();
    }
    // acc += the unpacked block b (32 bytes in v) times xp.
    auto block = [&](int64_t b, __m256i v) FLASHLM_AVX2_INLINE_LAMBDA {
      if (Subnormal) {
        unpack_subnormal(v, f);
      } else {
        unpack_convert(v, f);
      }
      for (int q = 0; q < 8; ++q) {
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_loadu_ps(xp + (r * blocks + b) * 64 + 8 * q);
          acc[r][q % kAcc] = _mm256_fmadd_ps(f[q], xv, acc[r][q % kAcc]);
        }
      }
    };
    if (half == 16) {  // a block is two groups: lanes 0-3 group 2b, lanes 4-7 group 2b + 1
      int64_t b = 0;
      for (; 2 * b + 2 <= groups; ++b) {
        block(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes)));
        const __m256 s = _mm256_set_m128(_mm_set1_ps(scales[2 * b + 1]), _mm_set1_ps(scales[2 * b]));
        close_group<R>(s, acc, total);
      }
      if (2 * b < groups) {  // an odd last group, 16 bytes: the upper lanes meet zeros in xp
        block(b, _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * kBlockBytes))));
        close_group<R>(_mm256_set_m128(_mm_setzero_ps(), _mm_set1_ps(scales[2 * b])), acc, total);
      }
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b)
          block(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes)));
        close_group<R>(_mm256_set1_ps(scales[g]), acc, total);
      }
    }
    for (int r = 0; r < R; ++r) {
      // The zero points' share, sum_g s_g z_g S_g, 8 groups at a time.
      const float* sums = group_sums + r * groups;
      __m256 zv = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= groups; g += 8) {
        const __m256 z = a.zeros ? _mm256_loadu_ps(a.zeros + n * groups + g) : _mm256_set1_ps(8.f);
        const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(scales + g), z);
        zv = _mm256_fmadd_ps(sz, _mm256_loadu_ps(sums + g), zv);
      }
      float zero_part = hsum(zv);
      for (; g < groups; ++g) zero_part += scales[g] * (a.zeros ? a.zeros[n * groups + g] : 8.f) * sums[g];
      const float dot = Subnormal ? __builtin_ldexpf(hsum(total[r]), kSubnormalYExp) : hsum(total[r]);
      float y = dot - zero_part;
      if (a.bias) y += a.bias[n];
      store_out(a, r, n, y);
    }
  }
}

template <bool Subnormal>
void gemv_rows(const Int4Args& a, const float* xp, const float* group_sums, int64_t n_begin, int64_t n_end) {
  switch (a.M) {
    case 1: gemv<1, Subnormal>(a, xp, group_sums, n_begin, n_end); return;
    case 2: gemv<2, Subnormal>(a, xp, group_sums, n_begin, n_end); return;
    case 3: gemv<3, Subnormal>(a, xp, group_sums, n_begin, n_end); return;
    default: gemv<kGemvMaxRows, Subnormal>(a, xp, group_sums, n_begin, n_end); return;
  }
}

// Dequantizes columns [n0, n0 + 16) x K [k0, k0 + kc) into buf[k][16] (zeros for columns past N): 8 columns
// x 8 values of K at a time, turned k-major by an 8 x 8 transpose (a third of the time of scalar stores).
void dequantize_panel(const Int4Args& a, int64_t n0, int64_t k0, int64_t kc, float* buf) {
  const int64_t groups = a.K / a.group, half = a.group / 2;
  for (int64_t cb = 0; cb < kCols; cb += 8) {
    for (int64_t gk = 0; gk < kc; gk += a.group) {
      const int64_t g = (k0 + gk) / a.group;
      __m256 s[8], z[8];
      const uint8_t* rows[8];
      for (int c = 0; c < 8; ++c) {
        const int64_t n = n0 + cb + c < a.N ? n0 + cb + c : -1;
        s[c] = _mm256_set1_ps(n < 0 ? 0.f : a.scales[n * groups + g]);
        z[c] = _mm256_set1_ps(n < 0 || !a.zeros ? 8.f : a.zeros[n * groups + g]);
        rows[c] = n < 0 ? nullptr : a.w + n * (a.K / 2) + g * half;
      }
      for (int64_t j = 0; j < half; j += 8) {
        __m256 lo[8], hi[8];
        for (int c = 0; c < 8; ++c) {
          if (rows[c]) {
            unpack8(rows[c] + j, lo[c], hi[c]);
            lo[c] = _mm256_mul_ps(_mm256_sub_ps(lo[c], z[c]), s[c]);
            hi[c] = _mm256_mul_ps(_mm256_sub_ps(hi[c], z[c]), s[c]);
          } else {
            lo[c] = hi[c] = _mm256_setzero_ps();
          }
        }
        transpose8(lo);
        transpose8(hi);
        for (int i = 0; i < 8; ++i) {
          _mm256_storeu_ps(buf + (gk + j + i) * kCols + cb, lo[i]);
          _mm256_storeu_ps(buf + (gk + half + j + i) * kCols + cb, hi[i]);
        }
      }
    }
  }
}

// acc[m][16] += x[m, k0 .. k0 + kc) @ buf for R <= 4 rows starting at m.
template <int R>
FLASHLM_AVX2_INLINE void micro_tile(const float* x, int64_t K, const float* buf, int64_t kc, float* acc) {
  __m256 c[kRows][2];
  for (int r = 0; r < R; ++r) {
    c[r][0] = _mm256_loadu_ps(acc + r * kCols);
    c[r][1] = _mm256_loadu_ps(acc + r * kCols + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(buf + k * kCols), b1 = _mm256_loadu_ps(buf + k * kCols + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      c[r][0] = _mm256_fmadd_ps(xv, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(xv, b1, c[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * kCols, c[r][0]);
    _mm256_storeu_ps(acc + r * kCols + 8, c[r][1]);
  }
}

void gemm(const Int4Args& a, int64_t n_begin, int64_t n_end, float* scratch) {
  const auto* x = static_cast<const float*>(a.x);
  float* buf = scratch;            // kKc x 16
  float* acc = buf + kKc * kCols;  // M x 16
  // kKc is a multiple of every group size, so a chunk never splits a group.
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kCols) {
    std::memset(acc, 0, size_t(a.M * kCols) * sizeof(float));
    for (int64_t k0 = 0; k0 < a.K; k0 += kKc) {
      const int64_t kc = a.K - k0 < kKc ? a.K - k0 : kKc;
      dequantize_panel(a, n0, k0, kc, buf);
      int64_t m = 0;
      for (; m + kRows <= a.M; m += kRows) micro_tile<kRows>(x + m * a.K + k0, a.K, buf, kc, acc + m * kCols);
      switch (a.M - m) {
        case 3: micro_tile<3>(x + m * a.K + k0, a.K, buf, kc, acc + m * kCols); break;
        case 2: micro_tile<2>(x + m * a.K + k0, a.K, buf, kc, acc + m * kCols); break;
        case 1: micro_tile<1>(x + m * a.K + k0, a.K, buf, kc, acc + m * kCols); break;
        default: break;
      }
    }
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t c = 0; c < kCols && n0 + c < a.N; ++c)
        store_out(a, m, n0 + c, a.bias ? acc[m * kCols + c] + a.bias[n0 + c] : acc[m * kCols + c]);
  }
}

}  // namespace

int64_t int4_gemv_x_floats(int64_t M, int64_t K) {
  return M <= kGemvMaxRows ? M * ((K / 2 + kBlockBytes - 1) / kBlockBytes) * 64 : 0;
}

bool int4_prepare_x_avx2(const Int4Args& a, bool subnormal_ok, float* xp) {
  if (a.M > kGemvMaxRows) return false;
  if (subnormal_ok) {  // the subnormal variant needs |x| < 2^36 (and finite)
    const auto* x = static_cast<const float*>(a.x);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 limit = _mm256_set1_ps(kSubnormalMaxX);
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 8 <= a.M * a.K; i += 8)  // NaN compares false, so it fails too
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), limit, _CMP_LT_OQ));
    subnormal_ok = _mm256_movemask_ps(ok) == 0xFF;
    for (; i < a.M * a.K; ++i) subnormal_ok = subnormal_ok && __builtin_fabsf(x[i]) < kSubnormalMaxX;
  }
  permute_x(a, subnormal_ok, xp);
  return subnormal_ok;
}

int64_t int4_scratch_floats(int64_t M, int64_t /*K*/) { return M <= kGemvMaxRows ? 0 : kKc * kCols + M * kCols; }

void int4_gemm_avx2(const Int4Args& a, const float* x_group_sums, const float* xp, bool xp_subnormal,
                    int64_t n_begin, int64_t n_end, float* scratch) {
  if (a.M > kGemvMaxRows) {
    gemm(a, n_begin, n_end, scratch);
    return;
  }
  if (!xp_subnormal) {
    gemv_rows<false>(a, xp, x_group_sums, n_begin, n_end);
    return;
  }
  // Subnormal weights must read as themselves: denormals-are-zero off while the kernel runs (this thread's
  // MXCSR; torch.set_flush_denormal turns it on).
  constexpr unsigned kDenormalsAreZero = 1u << 6;
  const unsigned csr = _mm_getcsr();
  if (csr & kDenormalsAreZero) _mm_setcsr(csr & ~kDenormalsAreZero);
  gemv_rows<true>(a, xp, x_group_sums, n_begin, n_end);
  if (csr & kDenormalsAreZero) _mm_setcsr(csr);
}

}  // namespace flashlm::gemm
