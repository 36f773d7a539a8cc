// The x4 kernels of the K-quants (shared_gguf_matmul.h's regrouped Q4_K / Q6_K) with AVX-512: a zmm register
// holds two weight rows of the group (one per 256-bit half, the layout puts their same 32 bytes side by side)
// against the same activation bytes, so its lanes do, row by row, exactly what the plain AVX2 kernels'
// (gguf_matmul_avx2_body.h) ymm lanes do: maddubs of the unsigned quants with the activations into int16
// pair sums, times the sub-block scale into int32 (vpdpwssd: madd and add in one), then the same float
// conversion, scaling and accumulation per super-block and the same sum across lanes. The integers are
// exact, so each output is bit-equal to the plain GEMV's. One pass of R activation rows reads a pair of weight
// rows over all of K; the weights' unpacking (nibbles, 2-bit planes, 6-bit scales) is shared by the R rows.
//
// Compiled with -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vnni and called only where
// x4_vnni_available() (csrc/core/avx2.h's rule holds: nothing here may be the linker's copy of an inline
// function).
// GCC 12's AVX-512 headers pass _mm512_undefined_*() placeholders to their builtins, which
// -Wmaybe-uninitialized reports once inlined here; no value of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstddef>

#include "../core/avx2.h"
#include "../gguf/shared_unpack_avx2.h"
#include "flashlm/gguf/blocks.h"
#include "gguf_matmul_kernels.h"
#include "kernels_avx2_common.h"

namespace flashlm::gemm::detail {
namespace {

using gguf::block_q8_K;

using gguf::detail::load32B;
FLASHLM_AVX2_INLINE __m512i bcast32B(const uint8_t* p) { return _mm512_broadcast_i64x4(load32B(p)); }

// An index for _mm512_permutexvar_epi16 over [16 int16 of row A | 16 of row B]: lane l of each half takes
// lane base + (l >> shift) of its own row's 16 (shift 4: all lanes base; 3: base, then base + 1; 1: pairs).
FLASHLM_AVX2_INLINE __m512i lanes16(int base, int shift) {
  const __m512i dword = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);  // lanes 2d, 2d + 1
  const __m512i in_row = _mm512_srlv_epi32(_mm512_slli_epi32(_mm512_and_si512(dword, _mm512_set1_epi32(7)), 1),
                                           _mm512_set1_epi32(shift));
  const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(dword, 3), 4), in_row);  // + 16 for row B
  return _mm512_add_epi16(_mm512_or_si512(v, _mm512_slli_epi32(v, 16)), _mm512_set1_epi16(static_cast<short>(base)));
}

// [x x 8 | y x 8] of floats from lanes a and b of v.
FLASHLM_AVX2_INLINE __m512 two_rows(__m256 v, int a, int b) {
  const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi32(a), _mm256_set1_epi32(b), 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(v));
}

FLASHLM_AVX2_INLINE __m512 negate(__m512 v) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}

FLASHLM_AVX2_INLINE __m512i nibbles(__m512i v, int s) {
  return _mm512_and_si512(_mm512_srli_epi16(v, static_cast<unsigned>(4 * s)), _mm512_set1_epi8(0x0F));
}

// Rows 2h and 2h + 1 of a Q4_K group's super-block at w: value = d * sc[j] * q - dmin * mn[j] in sub-block j.
struct Q4Kx4 {
  static constexpr int64_t kRun = 4 * int64_t(sizeof(gguf::block_q4_K));
  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, int h, const uint8_t* const* x, __m512* acc) {
    const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));  // d[4], dmin[4]
    const __m512 dw = two_rows(dd, 2 * h, 2 * h + 1), ndmin = negate(two_rows(dd, 4 + 2 * h, 5 + 2 * h));
    // [scales, mins of row 2h | of row 2h + 1] as 32 int16
    const __m512i sm = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_cvtepu8_epi16(scales_mins_k4(w + 16 + 12 * (2 * h)))),
        _mm256_cvtepu8_epi16(scales_mins_k4(w + 16 + 12 * (2 * h + 1))), 1);
    __m512i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
#pragma GCC unroll 4  // constant permute indices, and no register shuffling of isum between iterations
    for (int i = 0; i < 4; ++i) {  // sub-blocks 2i (low nibbles) and 2i + 1 (high nibbles) of qs[32i..]
      const __m512i v = _mm512_loadu_si512(w + 64 + 128 * i + 64 * h);
      const __m512i lo = nibbles(v, 0), hi = nibbles(v, 1);
      const __m512i s0 = _mm512_permutexvar_epi16(lanes16(2 * i, 4), sm);
      const __m512i s1 = _mm512_permutexvar_epi16(lanes16(2 * i + 1, 4), sm);
      for (int r = 0; r < R; ++r) {
        const uint8_t* y = reinterpret_cast<const uint8_t*>(reinterpret_cast<const block_q8_K*>(x[r])->qs) + 64 * i;
        isum[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(isum[r], _mm512_maddubs_epi16(lo, bcast32B(y)), s0),
                                      _mm512_maddubs_epi16(hi, bcast32B(y + 32)), s1);
      }
    }
    const __m512i mins = _mm512_permutexvar_epi16(lanes16(8, 1), sm);  // mins[j] twice each
    for (int r = 0; r < R; ++r) {
      const auto* a = reinterpret_cast<const block_q8_K*>(x[r]);
      const __m512i msum = _mm512_madd_epi16(bcast32B(reinterpret_cast<const uint8_t*>(a->bsums)), mins);
      const __m512 dx = _mm512_set1_ps(a->d);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(dw, dx), acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(ndmin, dx), acc[r]);
    }
  }
};

// Rows 2h and 2h + 1 of a Q6_K group's super-block at w: value = d * scales[g] * (q - 32) in sub-block g of 16.
struct Q6Kx4 {
  static constexpr int64_t kRun = 4 * int64_t(sizeof(gguf::block_q6_K));
  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, int h, const uint8_t* const* x, __m512* acc) {
    const __m256 d4 = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
    const __m512 dw = two_rows(d4, 2 * h, 2 * h + 1);
    const __m512 dw32 = _mm512_mul_ps(_mm512_set1_ps(-32.0f), dw);  // exact: a power of two
    const __m512i sc = _mm512_inserti64x4(  // [16 scales of row 2h | of row 2h + 1] as int16
        _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8 + 32 * h)))),
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8 + 32 * h + 16))), 1);
    __m512i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
#pragma GCC unroll 2  // as Q4Kx4's loop
    for (int half = 0; half < 2; ++half) {
      const uint8_t* p = w + 72 + 384 * half + 64 * h;
      const __m512i ql0 = _mm512_loadu_si512(p), ql1 = _mm512_loadu_si512(p + 128), qh = _mm512_loadu_si512(p + 256);
      const __m512i q[4] = {nibbles(ql0, 0), nibbles(ql1, 0), nibbles(ql0, 1), nibbles(ql1, 1)};
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {  // quarter t: sub-blocks 8 half + 2t (lanes 0-3) and + 1 (lanes 4-7)
        const __m512i crumbs = _mm512_and_si512(_mm512_srli_epi16(qh, static_cast<unsigned>(2 * t)), _mm512_set1_epi8(3));
        const __m512i qt = _mm512_or_si512(q[t], _mm512_slli_epi16(crumbs, 4));  // no carry across bytes
        const __m512i s = _mm512_permutexvar_epi16(lanes16(8 * half + 2 * t, 3), sc);
        for (int r = 0; r < R; ++r) {
          const uint8_t* y = reinterpret_cast<const uint8_t*>(reinterpret_cast<const block_q8_K*>(x[r])->qs);
          isum[r] = _mm512_dpwssd_epi32(isum[r], _mm512_maddubs_epi16(qt, bcast32B(y + 128 * half + 32 * t)), s);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const auto* a = reinterpret_cast<const block_q8_K*>(x[r]);
      const __m512i ssum = _mm512_madd_epi16(bcast32B(reinterpret_cast<const uint8_t*>(a->bsums)), sc);
      const __m512 dx = _mm512_set1_ps(a->d);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(dw, dx), acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ssum), _mm512_mul_ps(dw32, dx), acc[r]);
    }
  }
};

// y[r0 + r, n + 2h + {0, 1}] for R activation rows: rows 2h, 2h + 1 of the group at `group`, over nb super-blocks.
template <class P, int R>
FLASHLM_AVX2_INLINE void pair_tile(const uint8_t* group, int h, int64_t nb, const uint8_t* acts, int64_t act_bytes,
                                   int64_t r0, float* y, int64_t ldy, int64_t n) {
  constexpr int64_t kPrefetch = 1024;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = group + b * P::kRun;
    for (int64_t line = 0; line < P::kRun; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + line), _MM_HINT_T0);
    const uint8_t* x[R];
    for (int r = 0; r < R; ++r) x[r] = acts + (r0 + r) * act_bytes + b * int64_t(sizeof(block_q8_K));
    P::template block<R>(w, h, x, acc);
  }
  for (int r = 0; r < R; ++r) {
    const __m512d v = _mm512_castps_pd(acc[r]);
    float* out = y + (r0 + r) * ldy + n + 2 * h;
    out[0] = hsum(_mm256_castpd_ps(_mm512_castpd512_pd256(v))) + 0.0f;  // + the zero correction, as in AVX2
    out[1] = hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd(v, 1))) + 0.0f;
  }
}

// 8 activation rows per pass: 16 accumulators and the unpacked weights fit the 32 zmm.
constexpr int kRows = 8;

template <class P, int R>
FLASHLM_AVX2_INLINE void tiles(const uint8_t* packed, int64_t nb, const uint8_t* acts, int64_t act_bytes, int64_t r0,
                               float* y, int64_t ldy, int64_t nt, int64_t ne) {
  for (int64_t n = nt; n < ne; n += 4)
    for (int h = 0; h < 2; ++h) pair_tile<P, R>(packed + n / 4 * nb * P::kRun, h, nb, acts, act_bytes, r0, y, ldy, n);
}

template <class P>
void matmul_x4k(const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes, int64_t m, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nb = k / gguf::QK_K;
  // 4 groups (16 weight rows) stay in L1/L2 while every kRows activation rows pass over them.
  for (int64_t nt = n0; nt < n1; nt += 16) {
    const int64_t ne = nt + 16 < n1 ? nt + 16 : n1;
    int64_t r = 0;
    for (; r + kRows <= m; r += kRows) tiles<P, kRows>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne);
    switch (m - r) {
      case 7: tiles<P, 7>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne); break;
      case 6: tiles<P, 6>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne); break;
      case 5: tiles<P, 5>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne); break;
      case 4: tiles<P, 4>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne); break;
      case 3: tiles<P, 3>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne); break;
      case 2: tiles<P, 2>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne); break;
      case 1: tiles<P, 1>(packed, nb, acts, act_bytes, r, y, ldy, nt, ne); break;
      default: break;
    }
  }
}

}  // namespace

void matmul_x4k_vnni(DType type, const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes, int64_t m,
                     float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (type == DType::Q4_K) matmul_x4k<Q4Kx4>(packed, k, acts, act_bytes, m, y, ldy, n0, n1);
  else matmul_x4k<Q6Kx4>(packed, k, acts, act_bytes, m, y, ldy, n0, n1);
}

}  // namespace flashlm::gemm::detail
