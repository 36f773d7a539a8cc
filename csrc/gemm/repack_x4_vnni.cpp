// The x4 kernels (shared_gguf_matmul.h's regrouped Q4_0 / Q8_0) with AVX-512 VNNI: one vpdpbusd multiplies
// 64 unsigned weight bytes by 64 signed activation bytes and adds groups of four straight into int32, where
// AVX2 needs maddubs, an int16 add and a madd for half as many. A zmm register holds two weight rows (one per
// 256-bit half) against the same activation pair, so its lanes do, row by row, exactly what the AVX2
// kernels' ymm lanes do: the same int32 block sums (exact either way), converted, scaled and accumulated in
// the same order, and summed across lanes the same way. Each output is bit-equal to the plain GEMV's.
//
// The weights are made unsigned and their offset moved to the activations: Q4_0's nibbles q stand for q - 8,
// so sum(q * y) - 8 * sum(y); Q8_0's signed quants w become w + 128 (w ^ 0x80), so sum((w + 128) * y) -
// 128 * sum(y). The per-pair extras hold -8 * sum(y) over each int32 lane's 4 bytes (both halves of the
// pair): Q4_0's offset as it is, Q8_0's after a shift by 4. The offset starts each dot product.
//
// What bounds the kernel (bench/results/gguf_matmul.md): every zmm operation here, vpdpbusd included, takes
// one of the two 512-bit vector ports, and the GEMV's rounding fixes the float work at a conversion, a
// multiply and an FMA per 16 int32 lanes, i.e. per two vpdpbusd. So the loop moves what it can off those
// ports: Q4_0's offset comes pre-shifted from the extras and each chain starts from a load of it (a load
// port's work) rather than a shift and a register copy (Q8_0 keeps one shift per activation row and pair).
//
// Compiled with -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vnni and called only where
// x4_vnni_available() (csrc/core/avx2.h's rule holds: nothing here may be the linker's copy of an inline
// function).
// GCC 12's AVX-512 headers pass _mm512_undefined_*() placeholders to their builtins (broadcasts, shifts,
// permutes), which -Wmaybe-uninitialized reports once inlined here; no value of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstddef>

#include "../core/avx2.h"
#include "../gguf/shared_unpack_avx2.h"
#include "gguf_matmul_kernels.h"
#include "kernels_avx2_common.h"

namespace flashlm::gemm::detail {
namespace {

using gguf::detail::load32B;

// p, as a value the compiler cannot prove equal to p: a second load through it is not merged with the first.
FLASHLM_AVX2_INLINE const uint8_t* unseen(const uint8_t* p) {
  asm("" : "+r"(p));
  return p;
}

// The activation terms of one pair: -8 * the sum of each int32 lane's 4 bytes of y0 and y1, and the scales
// [dx0 x 4 | dx1 x 4], as the AVX2 kernels' act_scales gives them. Stored pair by pair, the m rows' terms of
// a pair side by side: a tile of activation rows reads them through one pointer (row r at r * 64), which
// keeps the loop's pointers in registers.
struct PairExtra {
  int32_t neg_sum4x8[8];  // -8 * sum
  float dx[8];
};
static_assert(sizeof(PairExtra) == kX4ExtraBytes, "PairExtra size");

// Rows 2h and 2h + 1 of a group's pair (x4 bytes at w, after the 16 bytes of scales), as unsigned bytes:
// lo = the first 16 quants of both blocks of each row, hi = the last 16; row 2h in the low 256 bits.
struct Q4_0x4 {
  static constexpr int64_t kRowBytes = 32;
  // The offset that starts the dot products of rows 2h, 2h + 1 (-8 * sum(y), as the extras at e hold it),
  // loaded once per chain: a load instead of the register copy that would feed vpdpbusd's second chain.
  FLASHLM_AVX2_INLINE static __m512i offset(const uint8_t* e, int h) {
    return _mm512_broadcast_i64x4(load32B(h ? unseen(e) : e));
  }
  FLASHLM_AVX2_INLINE static void rows(const uint8_t* w, int h, __m512i& lo, __m512i& hi) {
    const __m512i v = _mm512_loadu_si512(w + 16 + 2 * h * kRowBytes), mask = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(v, mask);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
  }
};
struct Q8_0x4 {
  static constexpr int64_t kRowBytes = 64;
  FLASHLM_AVX2_INLINE static __m512i offset(const uint8_t* e, int) {  // -128 * sum(y)
    return _mm512_slli_epi32(_mm512_broadcast_i64x4(load32B(e)), 4);
  }
  FLASHLM_AVX2_INLINE static void rows(const uint8_t* w, int h, __m512i& lo, __m512i& hi) {
    const __m512i a = _mm512_loadu_si512(w + 16 + 2 * h * kRowBytes);  // [lo | hi] of row 2h
    const __m512i b = _mm512_loadu_si512(w + 16 + (2 * h + 1) * kRowBytes);
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    lo = _mm512_xor_si512(_mm512_shuffle_i64x2(a, b, 0x44), flip);
    hi = _mm512_xor_si512(_mm512_shuffle_i64x2(a, b, 0xEE), flip);
  }
};

// y[r0 + r, n + j] for R activation rows and the 4 rows of group n (x4 bytes at w).
template <class P, int R>
FLASHLM_AVX2_INLINE void gemm_tile(const uint8_t* w, int64_t pairs, const uint8_t* acts, int64_t act_bytes,
                                   const uint8_t* extras, int64_t m, int64_t r0, float* y, int64_t ldy, int64_t n) {
  constexpr int64_t kPairBytes = 16 + 4 * P::kRowBytes, kPrefetch = 1024;
  const __m512i dw_index[2] = {_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                               _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)};
  __m512 acc[2][R];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < pairs; ++b, w += kPairBytes) {
    for (int64_t line = 0; line < kPairBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + line), _MM_HINT_T0);
    const __m512 scales = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
    __m512i lo[2], hi[2];
    __m512 dw[2];
    for (int h = 0; h < 2; ++h) {
      P::rows(w, h, lo[h], hi[h]);
      dw[h] = _mm512_permutexvar_ps(dw_index[h], scales);  // [d(2h) b0 x4, b1 x4, d(2h+1) b0 x4, b1 x4]
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* a = acts + (r0 + r) * act_bytes + b * int64_t(sizeof(ActQ8x2));
      const __m512i y0 = _mm512_broadcast_i64x4(load32B(a + offsetof(ActQ8x2, qs)));
      const __m512i y1 = _mm512_broadcast_i64x4(load32B(a + offsetof(ActQ8x2, qs) + 32));
      const uint8_t* e = extras + ((b * m) + r0 + r) * int64_t(sizeof(PairExtra));
      const __m512 dx = _mm512_castpd_ps(
          _mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(e + offsetof(PairExtra, dx)))));
      for (int h = 0; h < 2; ++h) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(P::offset(e, h), lo[h], y0), hi[h], y1);
        acc[h][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw[h], dx), acc[h][r]);
      }
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) {
      const __m512d v = _mm512_castps_pd(acc[h][r]);
      float* out = y + (r0 + r) * ldy + n + 2 * h;
      out[0] = hsum(_mm256_castpd_ps(_mm512_castpd512_pd256(v))) + 0.0f;  // + the zero correction, as in AVX2
      out[1] = hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd(v, 1))) + 0.0f;
    }
}

// 8 activation rows per pass: 16 accumulators and the 4 weight rows' 6 registers fit the 32 zmm.
constexpr int kRows = 8;

template <class P, int R>
FLASHLM_AVX2_INLINE void tiles(const uint8_t* packed, int64_t pairs, const uint8_t* acts, int64_t act_bytes,
                               const uint8_t* extras, int64_t m, int64_t r0, float* y, int64_t ldy, int64_t nt,
                               int64_t ne) {
  constexpr int64_t kPairBytes = 16 + 4 * P::kRowBytes;
  for (int64_t n = nt; n < ne; n += 4)
    gemm_tile<P, R>(packed + n / 4 * pairs * kPairBytes, pairs, acts, act_bytes, extras, m, r0, y, ldy, n);
}

template <class P>
void matmul_x4(const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes, const uint8_t* extras,
               int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t pairs = k / 64;
  // 4 groups (16 weight rows) stay in L1/L2 while every kRows activation rows pass over them.
  for (int64_t nt = n0; nt < n1; nt += 16) {
    const int64_t ne = nt + 16 < n1 ? nt + 16 : n1;
    int64_t r = 0;
    for (; r + kRows <= m; r += kRows) tiles<P, kRows>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne);
    switch (m - r) {
      case 7: tiles<P, 7>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne); break;
      case 6: tiles<P, 6>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne); break;
      case 5: tiles<P, 5>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne); break;
      case 4: tiles<P, 4>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne); break;
      case 3: tiles<P, 3>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne); break;
      case 2: tiles<P, 2>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne); break;
      case 1: tiles<P, 1>(packed, pairs, acts, act_bytes, extras, m, r, y, ldy, nt, ne); break;
      default: break;
    }
  }
}

}  // namespace

void x4_pair_extras_vnni(const uint8_t* acts, int64_t act_bytes, int64_t m, int64_t k, uint8_t* extras) {
  const int64_t pairs = k / 64;
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < pairs; ++b) {
      const auto* a = reinterpret_cast<const ActQ8x2*>(acts + r * act_bytes + b * int64_t(sizeof(ActQ8x2)));
      const __m256i y0 = load32B(reinterpret_cast<const uint8_t*>(a->qs));
      const __m256i y1 = load32B(reinterpret_cast<const uint8_t*>(a->qs) + 32);
      // byte pairs summed to int16 (|sum| <= 254 each), then to int32 lanes of 4 bytes, y0's and y1's added
      const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(ones8, y0), _mm256_maddubs_epi16(ones8, y1));
      const __m256i s32 = _mm256_madd_epi16(s16, ones16);
      auto* e = reinterpret_cast<PairExtra*>(extras + (b * m + r) * int64_t(sizeof(PairExtra)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e->neg_sum4x8),
                          _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), s32), 3));
      const __m128 d = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a->d)));
      _mm256_storeu_ps(e->dx, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)));
    }
}

void matmul_x4_vnni(DType type, const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes,
                    const uint8_t* extras, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (type == DType::Q4_0) matmul_x4<Q4_0x4>(packed, k, acts, act_bytes, extras, m, y, ldy, n0, n1);
  else if (type == DType::Q8_0) matmul_x4<Q8_0x4>(packed, k, acts, act_bytes, extras, m, y, ldy, n0, n1);
  else matmul_x4k_vnni(type, packed, k, acts, act_bytes, m, y, ldy, n0, n1);  // Q4_K, Q6_K
}

}  // namespace flashlm::gemm::detail
