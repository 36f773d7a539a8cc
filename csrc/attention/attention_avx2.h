// Building blocks of the AVX2/FMA attention kernels (attention_avx2_forward.cpp, attention_avx2_backward.cpp):
// one register-blocked GEMM microkernel with the epilogues the kernels need, and K/V tile packing. The math,
// row access and scratch buffers they share with the paged kernels are shared_avx2.h.
//
// Layout of the tiles. Every GEMM here is C[M x N] (op)= A[M x K] . B[K x N] with B row-major (N contiguous,
// a multiple of 8) and A read one element at a time by broadcasts, either row-major (A[m][k] at a[m * lda + k])
// or transposed (A[m][k] at a[k * lda + m]). That covers all six products of the forward and backward
// passes without ever transposing a K/V tile: scores are computed transposed, S^T[key][query] =
// K . Q^T, with Q^T packed once per task, so the softmax statistics of 8 queries sit in one ymm and every
// row reduction of the softmax is a vertical max/add over keys.
//
// Include this only from sources compiled with AVX2 flags; it keeps the rule of core/avx2.h (anonymous
// namespace, forced inline, no standard templates).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"
#include "attention_cpu.h"
#include "attention_params.h"
#include "shared_avx2.h"

// The kernels' entry points: forward_avx2/backward_avx2, or forward_avx512/backward_avx512 in the copy
// compiled with AVX-512 flags (attention_avx512_forward.cpp, attention_avx512_backward.cpp).
#ifdef FLASHLM_ATTENTION_AVX512
#define FLASHLM_ATTENTION_ENTRY(name) name##_avx512
#else
#define FLASHLM_ATTENTION_ENTRY(name) name##_avx2
#endif

namespace flashlm::attention::avx2 {
namespace {

// ---- GEMM microkernel ------------------------------------------------------------------------------------

// The A operand: element (m, k) at data[m * lda + k] (row-major) or data[k * lda + m] (kTransposed).
template <bool kTransposed>
struct AView {
  const float* data;
  int64_t lda;
  FLASHLM_AVX2_INLINE const float* at(int64_t m, int64_t k) const {
    return kTransposed ? data + k * lda + m : data + m * lda + k;
  }
};

// The vector registers a GEMM tile accumulates in: a ymm of 8 floats, or (the AVX-512 build) a zmm of 16.
// emit hands the epilogue ymm halves, so the score, softmax and store code is the same in both builds.
struct Ymm {
  using V = __m256;
  static constexpr int kWidth = 8;
  static FLASHLM_AVX2_INLINE V zero() { return _mm256_setzero_ps(); }
  static FLASHLM_AVX2_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static FLASHLM_AVX2_INLINE V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static FLASHLM_AVX2_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  template <class Epi>
  static FLASHLM_AVX2_INLINE void emit(Epi& epi, int64_t m, int64_t n, V acc) { epi(m, n, acc); }
};
#ifdef FLASHLM_ATTENTION_AVX512
struct Zmm {
  using V = __m512;
  static constexpr int kWidth = 16;
  static FLASHLM_AVX2_INLINE V zero() { return _mm512_setzero_ps(); }
  static FLASHLM_AVX2_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static FLASHLM_AVX2_INLINE V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static FLASHLM_AVX2_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  template <class Epi>
  static FLASHLM_AVX2_INLINE void emit(Epi& epi, int64_t m, int64_t n, V acc) {
    epi(m, n, _mm512_castps512_ps256(acc));
    epi(m, n + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  }
};
#endif

// acc[MR][NR] = A[m0 .. m0 + MR, 0 .. kdim) . B[0 .. kdim, n0 .. n0 + W::kWidth NR), then epi(m, n, acc) for
// each ymm of the tile. Each output element is the same chain of FMAs over k, in the same order, whatever
// the register width, so the AVX2 and AVX-512 builds give the same bits. AVX2: 6 x 16 (12 accumulators, 2
// loads + 6 broadcasts per 12 FMAs) is the main shape: it leaves registers for the loads and keeps the two
// FMA pipes of Zen 3 busy; 4 x 24 measured the same on D = 64 and needs N to be a multiple of 24.
template <class W, int MR, int NR, bool kT, class Epi>
FLASHLM_AVX2_INLINE void gemm_tile(const AView<kT>& a, const float* b, int64_t ldb, int64_t kdim, int64_t m0,
                                   int64_t n0, Epi& epi) {
  typename W::V acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) acc[m][n] = W::zero();
  const float* a0 = a.at(m0, 0);
  const float* bp = b + n0;
  for (int64_t k = 0; k < kdim; ++k) {
    typename W::V bv[NR];
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) bv[n] = W::load(bp + W::kWidth * n);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const typename W::V av = W::broadcast(kT ? a0 + m : a0 + m * a.lda);
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) acc[m][n] = W::fmadd(av, bv[n], acc[m][n]);
    }
    a0 += kT ? a.lda : 1;
    bp += ldb;
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) W::emit(epi, m0 + m, n0 + W::kWidth * n, acc[m][n]);
}

// Rows of tiles: 16 columns (2 ymm) at a time, or in the AVX-512 build 32 (2 zmm) and then 16, and the last
// 8 in a ymm. Panels of 6 rows (AVX2) or 8 (AVX-512: 16 accumulators of its 32 registers).
template <int MR, bool kT, class Epi>
FLASHLM_AVX2_INLINE void gemm_rows(const AView<kT>& a, const float* b, int64_t ldb, int64_t kdim, int64_t m0,
                                   int64_t n, Epi& epi) {
  int64_t n0 = 0;
#ifdef FLASHLM_ATTENTION_AVX512
  for (; n0 + 32 <= n; n0 += 32) gemm_tile<Zmm, MR, 2>(a, b, ldb, kdim, m0, n0, epi);
  if (n0 + 16 <= n) gemm_tile<Zmm, MR, 1>(a, b, ldb, kdim, m0, n0, epi), n0 += 16;
#else
  for (; n0 + 16 <= n; n0 += 16) gemm_tile<Ymm, MR, 2>(a, b, ldb, kdim, m0, n0, epi);
#endif
  if (n0 < n) gemm_tile<Ymm, MR, 1>(a, b, ldb, kdim, m0, n0, epi);
}

#ifdef FLASHLM_ATTENTION_AVX512
constexpr int64_t kPanelRows = 8;
#else
constexpr int64_t kPanelRows = 6;
#endif

// The whole product for m rows and n columns (n a multiple of 8): panels of kPanelRows rows, then the rows
// left. Kept out of line: inlined into its callers, the microkernel's loop counters spilled to the stack
// (the callers hold many values), which cost 5% of the forward pass at D = 64 and 128.
template <bool kT, class Epi>
__attribute__((noinline)) void gemm(const AView<kT>& a, const float* b, int64_t ldb, int64_t kdim, int64_t m, int64_t n, Epi& epi) {
  int64_t m0 = 0;
  for (; m0 + kPanelRows <= m; m0 += kPanelRows) gemm_rows<int(kPanelRows)>(a, b, ldb, kdim, m0, n, epi);
  switch (m - m0) {
#ifdef FLASHLM_ATTENTION_AVX512
    case 7: gemm_rows<7>(a, b, ldb, kdim, m0, n, epi); break;
    case 6: gemm_rows<6>(a, b, ldb, kdim, m0, n, epi); break;
#endif
    case 5: gemm_rows<5>(a, b, ldb, kdim, m0, n, epi); break;
    case 4: gemm_rows<4>(a, b, ldb, kdim, m0, n, epi); break;
    case 3: gemm_rows<3>(a, b, ldb, kdim, m0, n, epi); break;
    case 2: gemm_rows<2>(a, b, ldb, kdim, m0, n, epi); break;
    case 1: gemm_rows<1>(a, b, ldb, kdim, m0, n, epi); break;
    default: break;
  }
}

// Epilogues: what becomes of each ymm (row m, columns n .. n + 8) of the product.
struct StoreEpi {  // C = acc
  float* c;
  int64_t ldc;
  FLASHLM_AVX2_INLINE void operator()(int64_t m, int64_t n, __m256 acc) { _mm256_storeu_ps(c + m * ldc + n, acc); }
};
struct AccumulateEpi {  // C += acc
  float* c;
  int64_t ldc;
  FLASHLM_AVX2_INLINE void operator()(int64_t m, int64_t n, __m256 acc) {
    float* p = c + m * ldc + n;
    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc));
  }
};
struct RescaleAccumulateEpi {  // C = alpha[m] C + acc (the online softmax's output update)
  float* c;
  int64_t ldc;
  const float* alpha;
  FLASHLM_AVX2_INLINE void operator()(int64_t m, int64_t n, __m256 acc) {
    float* p = c + m * ldc + n;
    _mm256_storeu_ps(p, _mm256_fmadd_ps(_mm256_broadcast_ss(alpha + m), _mm256_loadu_ps(p), acc));
  }
};

// ---- Scores ----------------------------------------------------------------------------------------------

// Which keys each query column of a tile sees: first[c] <= key < last[c] (key indices of the sequence).
// Columns that are padding have an empty range.
struct ColumnRanges {
  int32_t* first;
  int32_t* last;
};

// All-ones in the lanes of columns c .. c + 8 that see key j, zeros elsewhere.
FLASHLM_AVX2_INLINE __m256 visible(const ColumnRanges& ranges, int64_t c, int64_t j) {
  const __m256i jv = _mm256_set1_epi32(int32_t(j));
  const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ranges.first + c));
  const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ranges.last + c));
  // first <= j < last, i.e. !(first > j) && last > j
  return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(first, jv), _mm256_cmpgt_epi32(last, jv)));
}

// The epilogue of S^T = K . Q^T: the score in log2 units, s * log2(e) with s = scale x or
// softcap tanh(scale x / softcap), and -inf where the key is not visible (kMask). With softcap it also
// keeps t = tanh(.) in `tanh_out` (the backward pass needs 1 - t^2). Rows are keys j0 + m, columns queries.
template <bool kSoftcap, bool kMask>
struct ScoreEpi {
  float* c;
  int64_t ldc;
  float* tanh_out;      // kSoftcap: as c
  __m256 mul;           // scale * log2e, or scale / softcap
  __m256 cap;           // softcap * log2e
  ColumnRanges ranges;  // kMask
  int32_t j0;
  FLASHLM_AVX2_INLINE void operator()(int64_t m, int64_t n, __m256 acc) {
    __m256 s;
    if constexpr (kSoftcap) {
      const __m256 t = tanh_ps(_mm256_mul_ps(acc, mul));
      _mm256_storeu_ps(tanh_out + m * ldc + n, t);
      s = _mm256_mul_ps(t, cap);
    } else {
      s = _mm256_mul_ps(acc, mul);
    }
    if constexpr (kMask) s = _mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), s, visible(ranges, n, j0 + m));
    _mm256_storeu_ps(c + m * ldc + n, s);
  }
};

// S^T[bn x cols] (log2 units) = K[bn x dp] . Q^T[dp x cols], for the four combinations of softcap and mask.
FLASHLM_AVX2_INLINE void scores(const Params& p, const float* k, int64_t dp, int64_t bn, const float* qt,
                                int64_t cols, bool mask, const ColumnRanges& ranges, int64_t j0, float* s,
                                float* tanh_out) {
  const AView<false> a{k, dp};
  const bool cap = p.softcap > 0.f;
  const __m256 mul = _mm256_set1_ps(cap ? p.scale / p.softcap : p.scale * kLog2e);
  const __m256 capv = _mm256_set1_ps(p.softcap * kLog2e);
  if (cap && mask) {
    ScoreEpi<true, true> e{s, cols, tanh_out, mul, capv, ranges, int32_t(j0)};
    gemm(a, qt, cols, dp, bn, cols, e);
  } else if (cap) {
    ScoreEpi<true, false> e{s, cols, tanh_out, mul, capv, ranges, int32_t(j0)};
    gemm(a, qt, cols, dp, bn, cols, e);
  } else if (mask) {
    ScoreEpi<false, true> e{s, cols, tanh_out, mul, capv, ranges, int32_t(j0)};
    gemm(a, qt, cols, dp, bn, cols, e);
  } else {
    ScoreEpi<false, false> e{s, cols, tanh_out, mul, capv, ranges, int32_t(j0)};
    gemm(a, qt, cols, dp, bn, cols, e);
  }
}

// The ALiBi bias of a tile's query columns: column c's query sits at key diag[c] (i + Sk - Sq) and its head
// has slope slope2[c] (log2 units: slope * log2 e; 0 for padding columns).
struct ColumnAlibi {
  float* slope2;
  float* diag;
};

// Adds -slope2[c] |diag[c] - j| to S^T[bn x cols] (log2 units; rows keys j0 .., columns queries). A masked
// score stays -inf. Positions are exact in f32 up to 2^24 keys.
FLASHLM_AVX2_INLINE void add_alibi(float* s, int64_t bn, int64_t cols, int64_t j0, const ColumnAlibi& alibi) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t j = 0; j < bn; ++j) {
    const __m256 jv = _mm256_set1_ps(float(j0 + j));
    float* row = s + j * cols;
    for (int64_t c = 0; c < cols; c += 8) {
      const __m256 dist = _mm256_andnot_ps(sign, _mm256_sub_ps(_mm256_loadu_ps(alibi.diag + c), jv));
      _mm256_storeu_ps(row + c, _mm256_fnmadd_ps(_mm256_loadu_ps(alibi.slope2 + c), dist, _mm256_loadu_ps(row + c)));
    }
  }
}

// Column c's ALiBi entries for query i of head h of sequence s (i < 0: a padding column, no bias).
FLASHLM_AVX2_INLINE void set_column_alibi(const Params& p, int b, const cpu::Sequence& s, int h, int64_t i,
                                          const ColumnAlibi& alibi, int64_t c) {
  alibi.slope2[c] = i < 0 ? 0.f : cpu::alibi_slope(p, b, h) * kLog2e;
  alibi.diag[c] = i < 0 ? 0.f : float(i + s.sk - s.sq);
}

// ---- Packing and storing ---------------------------------------------------------------------------------

// Keys j0 .. j0 + n of K/V head kvh of sequence s as f32 rows of dp floats (zero-padded).
FLASHLM_AVX2_INLINE void pack_kv(const Params& p, int b, const cpu::Sequence& s, int kvh, int64_t j0, int64_t n,
                                 int64_t dp, float* k, float* v) {
  for (int64_t j = 0; j < n; ++j) {
    load_row_f32(cpu::row_ptr(p.k, p.dtype, b * p.k_batch_stride, s.k0 + j0 + j, p.k_row_stride, kvh, p.k_head_stride),
                 p.dtype, p.head_dim, dp, k + j * dp);
    load_row_f32(cpu::row_ptr(p.v, p.dtype, b * p.v_batch_stride, s.k0 + j0 + j, p.v_row_stride, kvh, p.v_head_stride),
                 p.dtype, p.head_dim, dp, v + j * dp);
  }
}

// Columns c0 .. c0 + rows of a [dp x ld] tile = the rows of src [rows x dp] (rows and dp multiples of 8),
// 8 x 8 blocks at a time.
FLASHLM_AVX2_INLINE void transpose_into(const float* src, int64_t rows, int64_t dp, float* tile, int64_t ld,
                                        int64_t c0) {
  for (int64_t r = 0; r < rows; r += 8) {
    for (int64_t d = 0; d < dp; d += 8) {
      const float* s = src + r * dp + d;
      __m256 a0 = _mm256_loadu_ps(s), a1 = _mm256_loadu_ps(s + dp), a2 = _mm256_loadu_ps(s + 2 * dp),
             a3 = _mm256_loadu_ps(s + 3 * dp), a4 = _mm256_loadu_ps(s + 4 * dp), a5 = _mm256_loadu_ps(s + 5 * dp),
             a6 = _mm256_loadu_ps(s + 6 * dp), a7 = _mm256_loadu_ps(s + 7 * dp);
      const __m256 b0 = _mm256_unpacklo_ps(a0, a1), b1 = _mm256_unpackhi_ps(a0, a1), b2 = _mm256_unpacklo_ps(a2, a3),
                   b3 = _mm256_unpackhi_ps(a2, a3), b4 = _mm256_unpacklo_ps(a4, a5), b5 = _mm256_unpackhi_ps(a4, a5),
                   b6 = _mm256_unpacklo_ps(a6, a7), b7 = _mm256_unpackhi_ps(a6, a7);
      a0 = _mm256_shuffle_ps(b0, b2, 0x44), a1 = _mm256_shuffle_ps(b0, b2, 0xEE);
      a2 = _mm256_shuffle_ps(b1, b3, 0x44), a3 = _mm256_shuffle_ps(b1, b3, 0xEE);
      a4 = _mm256_shuffle_ps(b4, b6, 0x44), a5 = _mm256_shuffle_ps(b4, b6, 0xEE);
      a6 = _mm256_shuffle_ps(b5, b7, 0x44), a7 = _mm256_shuffle_ps(b5, b7, 0xEE);
      float* t = tile + d * ld + c0 + r;
      _mm256_storeu_ps(t, _mm256_permute2f128_ps(a0, a4, 0x20));
      _mm256_storeu_ps(t + ld, _mm256_permute2f128_ps(a1, a5, 0x20));
      _mm256_storeu_ps(t + 2 * ld, _mm256_permute2f128_ps(a2, a6, 0x20));
      _mm256_storeu_ps(t + 3 * ld, _mm256_permute2f128_ps(a3, a7, 0x20));
      _mm256_storeu_ps(t + 4 * ld, _mm256_permute2f128_ps(a0, a4, 0x31));
      _mm256_storeu_ps(t + 5 * ld, _mm256_permute2f128_ps(a1, a5, 0x31));
      _mm256_storeu_ps(t + 6 * ld, _mm256_permute2f128_ps(a2, a6, 0x31));
      _mm256_storeu_ps(t + 7 * ld, _mm256_permute2f128_ps(a3, a7, 0x31));
    }
  }
}

}  // namespace
}  // namespace flashlm::attention::avx2
