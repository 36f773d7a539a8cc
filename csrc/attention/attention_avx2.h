// Building blocks of the AVX2/FMA attention kernels (attention_avx2_forward.cpp, attention_avx2_backward.cpp):
// a vectorised exp2 and tanh, one register-blocked GEMM microkernel with the epilogues the kernels need,
// tile packing (f32/bf16 -> f32) and row stores (f32 -> f32/bf16), and a scratch buffer.
//
// Layout of the tiles. Every GEMM here is C[M x N] (op)= A[M x K] . B[K x N] with B row-major (N contiguous,
// a multiple of 8) and A read one element at a time by broadcasts, either row-major (A[m][k] at a[m * lda + k])
// or transposed (A[m][k] at a[k * lda + m]). That covers all six products of the forward and backward
// passes without ever transposing a K/V tile: scores are computed transposed, S^T[key][query] =
// K . Q^T, with Q^T packed once per task, so the softmax statistics of 8 queries sit in one ymm and every
// row reduction of the softmax is a vertical max/add over keys.
//
// Include this only from sources compiled with -mavx2 -mfma (csrc/CMakeLists.txt, `_avx2_sources`), which
// run only after a run-time CPU check. As in gguf/dequantize_avx2_common.h, everything sits in an anonymous
// namespace and is forced inline, and no template of a standard header is instantiated here (no
// std::vector, std::min): an inline function with external linkage compiled with AVX2 flags could be the
// copy the linker keeps for callers on CPUs without AVX2.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "attention_cpu.h"
#include "attention_params.h"

#define FLASHLM_AVX2_INLINE __attribute__((always_inline)) inline

namespace flashlm::attention::avx2 {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

FLASHLM_AVX2_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FLASHLM_AVX2_INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
FLASHLM_AVX2_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- exp2 and tanh -------------------------------------------------------------------------------------

// 2^x for x <= 0 (and -inf): 2^n * p(r) with n = round(x), r = x - n in [-0.5, 0.5] (exact) and p a
// degree-6 polynomial fitted to 2^r for minimal relative error (fit error 2.0e-9). Measured against
// double exp2 over every 7th float in [-126, 0] (tests/attention_exp_check.cpp, run by
// tests/test_attention_avx2.py): max relative error 8.0e-8, about 1 ulp. Results below 2^-126 are
// flushed to 0, and so is x = -inf (masked scores). The degree-5 fit saves one FMA per 8 elements but
// measured 1.7e-7 (up to 3 ulp near 2^-0.5).
FLASHLM_AVX2_INLINE __m256 exp2_ps(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5353360504377633e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3398875016719103e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.61843691766262e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5503323674201965e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022647738456726e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.931471824645996e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // p in [0.70, 1.42]: adding n to its exponent field multiplies by 2^n (n >= -126 where kept).
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(y, keep);
}

// tanh(y) = sign(y) (1 - 2 / (e^{2|y|} + 1)); for |y| < 2^-4 the odd Taylor polynomial to y^7 instead,
// where the formula would lose relative accuracy to cancellation. Max absolute error 1.1e-7 (the
// attention scores it feeds are softcap * tanh, so that is a relative error of the softcap, not of the
// score). |y| > 9 saturates to +-1 (exp2 stays in range).
FLASHLM_AVX2_INLINE __m256 tanh_ps(__m256 y) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_min_ps(_mm256_andnot_ps(sign, y), _mm256_set1_ps(9.f));
  const __m256 e = exp2_ps(_mm256_mul_ps(a, _mm256_set1_ps(2.f * kLog2e)));  // e^{2|y|} <= e^18
  const __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.f),
                                   _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
  const __m256 a2 = _mm256_mul_ps(a, a);
  __m256 s = _mm256_set1_ps(-17.f / 315.f);
  s = _mm256_fmadd_ps(s, a2, _mm256_set1_ps(2.f / 15.f));
  s = _mm256_fmadd_ps(s, a2, _mm256_set1_ps(-1.f / 3.f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(s, a2), a, a);
  const __m256 t = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.0625f), _CMP_LT_OQ));
  return _mm256_or_ps(t, _mm256_and_ps(y, sign));
}

FLASHLM_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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

// acc[MR][NR] = A[m0 .. m0 + MR, 0 .. kdim) . B[0 .. kdim, n0 .. n0 + 8 NR), then epi(m, n, acc) for each
// ymm of the tile. 6 x 16 (12 accumulators, 2 loads + 6 broadcasts per 12 FMAs) is the main shape: it
// leaves registers for the loads and keeps the two FMA pipes of Zen 3 busy; 4 x 24 measured the same on
// D = 64 and needs N to be a multiple of 24.
template <int MR, int NR, bool kT, class Epi>
FLASHLM_AVX2_INLINE void gemm_tile(const AView<kT>& a, const float* b, int64_t ldb, int64_t kdim, int64_t m0,
                                   int64_t n0, Epi& epi) {
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  const float* a0 = a.at(m0, 0);
  const float* bp = b + n0;
  for (int64_t k = 0; k < kdim; ++k) {
    __m256 bv[NR];
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) bv[n] = _mm256_loadu_ps(bp + 8 * n);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_broadcast_ss(kT ? a0 + m : a0 + m * a.lda);
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(av, bv[n], acc[m][n]);
    }
    a0 += kT ? a.lda : 1;
    bp += ldb;
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) epi(m0 + m, n0 + 8 * n, acc[m][n]);
}

template <int MR, bool kT, class Epi>
FLASHLM_AVX2_INLINE void gemm_rows(const AView<kT>& a, const float* b, int64_t ldb, int64_t kdim, int64_t m0,
                                   int64_t n, Epi& epi) {
  int64_t n0 = 0;
  for (; n0 + 16 <= n; n0 += 16) gemm_tile<MR, 2>(a, b, ldb, kdim, m0, n0, epi);
  if (n0 < n) gemm_tile<MR, 1>(a, b, ldb, kdim, m0, n0, epi);
}

// The whole product for m rows and n columns (n a multiple of 8): 6-row panels, then the 1..5 left. Kept
// out of line: inlined into its callers, the microkernel's loop counters spilled to the stack (the callers
// hold many values), which cost 5% of the forward pass at D = 64 and 128.
template <bool kT, class Epi>
__attribute__((noinline)) void gemm(const AView<kT>& a, const float* b, int64_t ldb, int64_t kdim, int64_t m, int64_t n, Epi& epi) {
  int64_t m0 = 0;
  for (; m0 + 6 <= m; m0 += 6) gemm_rows<6>(a, b, ldb, kdim, m0, n, epi);
  switch (m - m0) {
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
    if constexpr (kMask) {
      const __m256i j = _mm256_set1_epi32(j0 + int32_t(m));
      const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ranges.first + n));
      const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ranges.last + n));
      // visible: first <= j < last, i.e. !(first > j) && last > j
      const __m256i hidden = _mm256_or_si256(_mm256_cmpgt_epi32(first, j),
                                             _mm256_xor_si256(_mm256_cmpgt_epi32(last, j), _mm256_set1_epi32(-1)));
      s = _mm256_blendv_ps(s, _mm256_set1_ps(-__builtin_inff()), _mm256_castsi256_ps(hidden));
    }
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

// ---- Packing and storing ---------------------------------------------------------------------------------

// Row `src` (d elements of p.dtype) -> dst[0 .. dp) in f32, zero-padded.
FLASHLM_AVX2_INLINE void load_row_f32(const void* src, DType dtype, int64_t d, int64_t dp, float* dst) {
  int64_t i = 0;
  if (dtype == DType::F32) {
    const float* s = static_cast<const float*>(src);
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(s + i));
    for (; i < d; ++i) dst[i] = s[i];
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (; i + 8 <= d; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
    for (; i < d; ++i) dst[i] = cpu::bf16_to_f32(s[i]);
  }
  for (; i < dp; ++i) dst[i] = 0.f;
}

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

// f32 -> bf16 bits in the low half of each 32-bit lane, rounding to nearest even as cpu::f32_to_bf16
// (NaN stays NaN).
FLASHLM_AVX2_INLINE __m128i bf16_from_f32(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// dst (d elements of dtype) = src[0 .. d) * mul.
FLASHLM_AVX2_INLINE void store_row_scaled(const float* src, float mul, int64_t d, void* dst, DType dtype) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  if (dtype == DType::F32) {
    float* t = static_cast<float*>(dst);
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(t + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), m));
    for (; i < d; ++i) t[i] = src[i] * mul;
  } else {
    uint16_t* t = static_cast<uint16_t*>(dst);
    for (; i + 8 <= d; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(t + i), bf16_from_f32(_mm256_mul_ps(_mm256_loadu_ps(src + i), m)));
    for (; i < d; ++i) t[i] = cpu::f32_to_bf16(src[i] * mul);
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

// ---- Scratch ---------------------------------------------------------------------------------------------

// A 64-byte aligned f32 buffer owned by one task (or one chunk of tasks); zero-filled on request.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }
  float* get(int64_t n) {
    if (n > size_) {
      std::free(data_);
      data_ = static_cast<float*>(std::aligned_alloc(64, size_t(round_up(max64(n, 16), 16)) * 4));
      if (!data_) throw std::bad_alloc();
      size_ = n;
    }
    return data_;
  }
  float* zeros(int64_t n) {
    float* p = get(n);
    std::memset(p, 0, size_t(n) * 4);
    return p;
  }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
};

// Consecutive float arrays carved out of one scratch allocation (each start 64-byte aligned).
struct Carver {
  float* base;
  int64_t used = 0;
  float* take(int64_t n) {
    float* r = base + used;
    used += round_up(n, 16);
    return r;
  }
};

}  // namespace
}  // namespace flashlm::attention::avx2
