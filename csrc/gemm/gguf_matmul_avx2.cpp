// GGUF matmul, AVX2 CPU kernels: integer block dot products of weight blocks with 8-bit activation blocks
// (gguf_matmul_kernels.h), as ggml's x86 ggml_vec_dot_*_q8_* compute them, checked against the scalar
// kernels of gguf_matmul_scalar.cpp by tests/test_gguf_matmul.py.
//
// Every weight type is unpacked to unsigned bytes (Q8_0 excepted) so one maddubs multiplies 32 weights by
// 32 signed activations into 16 pair sums without saturating (at most 2 * 63 * 128 = 16128), and a madd
// with the sub-block scale (or with ones) widens them to int32. The offsets (Q4_0's -8, Q4_1's minimum,
// the K-quants' mins, Q6_K's -32) are applied once per block through the activation block sums. Q8_0 is
// signed on both sides and uses the sign trick: maddubs(|w|, x * sign(w)).
//
// M > 1: each weight block is unpacked once and multiplied with up to 4 activation rows; weight rows are
// walked in tiles of 16 so a tile stays in the L1/L2 cache while all activation rows pass over it.
//
// Compiled with -mavx2 -mfma -mf16c and called only after a run-time CPU check; see
// csrc/core/avx2.h for what such a file must not use (no std:: templates).
#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"

namespace flashlm::gemm::detail {
namespace {
FLASHLM_AVX2_INLINE __m256i madd_add(__m256i acc, __m256i a, __m256i b) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}
}  // namespace
}  // namespace flashlm::gemm::detail

#include "gguf_matmul_avx2_body.h"

namespace flashlm::gemm::detail {

namespace {

// The x4 layouts (gguf_matmul_kernels.h): per pair of blocks, 8 f16 scales, then each row's quants as the
// plain GEMV's load2 would give them.
struct PackedQ4_0 {
  using W = Q4Q5<gguf::block_q4_0, false, false>;
  using L = Legacy<W>;
  static constexpr int64_t kRowBytes = 32;  // [qs of block 0 | qs of block 1]
  FLASHLM_AVX2_INLINE static void unpack(const uint8_t* r, __m256i& lo, __m256i& hi) {
    const __m256i v = load32B(r), mask = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(v, mask);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  }
};
struct PackedQ8_0 {
  using W = Q8_0;
  using L = Legacy<W>;
  static constexpr int64_t kRowBytes = 64;  // lo then hi, already in the activation pair's interleaving
  FLASHLM_AVX2_INLINE static void unpack(const uint8_t* r, __m256i& lo, __m256i& hi) {
    lo = load32B(r);
    hi = load32B(r + 32);
  }
};

// What an activation pair contributes besides its quants, computed once per call instead of once per
// weight row: the offset term and the scales (x4_pair_extras_avx2; 64 bytes, read unaligned).
struct PairExtra {
  __m256i off16;
  __m256 dx;
};
static_assert(sizeof(PairExtra) == kX4ExtraBytes, "PairExtra size");

// y[r, n + j] for act rows r0 .. r0 + R and the 4 rows of group n: each weight pair unpacked once for R
// activation rows, every output computed as dot_rows<T, 1> computes it.
template <class P, int R>
FLASHLM_AVX2_INLINE void gemm_tile(const uint8_t* w, int64_t pairs, const uint8_t* acts, int64_t act_bytes,
                                   const uint8_t* extras, int64_t r0, float* y, int64_t ldy, int64_t n) {
  using L = typename P::L;
  constexpr int64_t kPairBytes = 16 + 4 * P::kRowBytes;
  __m256 acc[4][R];
  for (int j = 0; j < 4; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < pairs; ++b, w += kPairBytes) {
    // The weights stream from memory on the first pass over them (and in a GEMV, the only one).
    for (int64_t line = 0; line < kPairBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + line), _MM_HINT_T0);
    const __m256 scales = _mm256_cvtph_ps(load16B(w));  // [r0 b0, r0 b1, r1 b0, ..., r3 b1]
    for (int j = 0; j < 4; ++j) {
      __m256i lo, hi;
      P::unpack(w + 16 + P::kRowBytes * j, lo, hi);
      const bool sign = P::W::kSigned;
      const __m256i ulo = sign ? _mm256_sign_epi8(lo, lo) : lo, uhi = sign ? _mm256_sign_epi8(hi, hi) : hi;
      const __m256 dw = _mm256_permutevar8x32_ps(scales, _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1,
                                                                           2 * j + 1, 2 * j + 1, 2 * j + 1));
      for (int r = 0; r < R; ++r) {
        const ActQ8x2* a = q8(acts + (r0 + r) * act_bytes + b * L::kActBytes);
        const __m256i y0 = load32B(reinterpret_cast<const uint8_t*>(a->qs));
        const __m256i y1 = load32B(reinterpret_cast<const uint8_t*>(a->qs) + 32);
        const uint8_t* e = extras + ((r0 + r) * pairs + b) * int64_t(sizeof(PairExtra));
        const __m256 dx = _mm256_loadu_ps(reinterpret_cast<const float*>(e + offsetof(PairExtra, dx)));
        acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(L::dot(lo, hi, ulo, uhi, y0, y1, load32B(e))),
                                    _mm256_mul_ps(dw, dx), acc[j][r]);
      }
    }
  }
  for (int j = 0; j < 4; ++j)
    for (int r = 0; r < R; ++r) y[(r0 + r) * ldy + n + j] = hsum(acc[j][r]) + 0.0f;  // + the zero correction
}

template <class P>
void matmul_x4(const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes, const uint8_t* extras,
               int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int64_t kPairBytes = 16 + 4 * P::kRowBytes;
  const int64_t pairs = k / 64;
  // 4 groups (16 weight rows) stay in L1/L2 while every 3 activation rows pass over them.
  for (int64_t nt = n0; nt < n1; nt += 16) {
    const int64_t ne = nt + 16 < n1 ? nt + 16 : n1;
    int64_t r = 0;
    for (; r + 3 <= m; r += 3)  // 12 accumulators: 4 x 2 was 5% slower, 4 x 4 spills (8% slower)
      for (int64_t n = nt; n < ne; n += 4)
        gemm_tile<P, 3>(packed + n / 4 * pairs * kPairBytes, pairs, acts, act_bytes, extras, r, y, ldy, n);
    for (int64_t n = nt; n < ne && m - r == 2; n += 4)
      gemm_tile<P, 2>(packed + n / 4 * pairs * kPairBytes, pairs, acts, act_bytes, extras, r, y, ldy, n);
    for (int64_t n = nt; n < ne && m - r == 1; n += 4)
      gemm_tile<P, 1>(packed + n / 4 * pairs * kPairBytes, pairs, acts, act_bytes, extras, r, y, ldy, n);
  }
}

// The K-quants' x4 layout: row j of a group read in place through X4Q4K / X4Q6K by the plain kernels' block
// code, so each output is computed as dot_rows<T, 1> computes it from the plain row.
template <class T, class L, int R>
FLASHLM_AVX2_INLINE void dot_rows_x4k(const uint8_t* group, int j, int64_t k, const uint8_t* acts, int64_t act_bytes,
                                      int64_t m0, float* y, int64_t ldy, int64_t n) {
  const uint8_t* x[R];
  __m256 acc[R];
  for (int r = 0; r < R; ++r) {
    x[r] = acts + (m0 + r) * act_bytes;
    acc[r] = _mm256_setzero_ps();
  }
  constexpr int64_t kRun = 4 * T::kBytes;  // one super-block of the group's 4 rows
  const int64_t nb = k / T::kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = group + b * kRun;
    for (int64_t line = 0; line < T::kBytes; line += 64)  // about this row's share of the run, kPrefetch ahead
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + j * T::kBytes + line), _MM_HINT_T0);
    T::template block_at<L, R>(w, j, x, b * T::kActBytes, acc);
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + n] = hsum(acc[r]) + 0.0f;  // + the zero correction
}

template <class T, class L>
void matmul_x4k(const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes, int64_t m, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t group_bytes = 4 * (k / T::kBlock) * T::kBytes;
  // As run_rows: tiles of 16 weight rows, up to 4 activation rows per pass.
  for (int64_t nt = n0; nt < n1; nt += kTileN) {
    const int64_t ne = nt + kTileN < n1 ? nt + kTileN : n1;
    for (int64_t r = 0; r < m; r += 4) {
      for (int64_t n = nt; n < ne; ++n) {
        const uint8_t* group = packed + n / 4 * group_bytes;
        const int j = static_cast<int>(n % 4);
        switch (m - r < 4 ? m - r : 4) {
          case 4: dot_rows_x4k<T, L, 4>(group, j, k, acts, act_bytes, r, y, ldy, n); break;
          case 3: dot_rows_x4k<T, L, 3>(group, j, k, acts, act_bytes, r, y, ldy, n); break;
          case 2: dot_rows_x4k<T, L, 2>(group, j, k, acts, act_bytes, r, y, ldy, n); break;
          default: dot_rows_x4k<T, L, 1>(group, j, k, acts, act_bytes, r, y, ldy, n); break;
        }
      }
    }
  }
}

}  // namespace

void x4_pair_extras_avx2(const uint8_t* acts, int64_t act_bytes, int64_t m, int64_t k, uint8_t* extras) {
  using L = PackedQ4_0::L;  // the offset term is Q4_0's; Q8_0 ignores it
  const int64_t pairs = k / 64;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < pairs; ++b) {
      const ActQ8x2* a = q8(acts + r * act_bytes + b * L::kActBytes);
      const __m256i y0 = load32B(reinterpret_cast<const uint8_t*>(a->qs));
      const __m256i y1 = load32B(reinterpret_cast<const uint8_t*>(a->qs) + 32);
      uint8_t* e = extras + (r * pairs + b) * int64_t(sizeof(PairExtra));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e), L::offset16(y0, y1));
      _mm256_storeu_ps(reinterpret_cast<float*>(e + offsetof(PairExtra, dx)), L::act_scales(a));
    }
}

void matmul_x4_avx2(DType type, const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes,
                    const uint8_t* extras, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (type) {
    case DType::Q4_0: matmul_x4<PackedQ4_0>(packed, k, acts, act_bytes, extras, m, y, ldy, n0, n1); break;
    case DType::Q8_0: matmul_x4<PackedQ8_0>(packed, k, acts, act_bytes, extras, m, y, ldy, n0, n1); break;
    case DType::Q4_K: matmul_x4k<Q45_K<false>, X4Q4K>(packed, k, acts, act_bytes, m, y, ldy, n0, n1); break;
    default: matmul_x4k<Q6_K, X4Q6K>(packed, k, acts, act_bytes, m, y, ldy, n0, n1); break;  // Q6_K
  }
}

bool gguf_matmul_rows_avx2(const RowsArgs& a, int64_t n0, int64_t n1) { return rows_all_types(a, n0, n1); }

// quantize_act_q8_k (gguf_matmul_scalar.cpp) eight lanes at a time: the same largest magnitude (a max is
// exact in any order) and the first element that has it, the same float products iscale * x rounded to
// nearest-even (cvtps under the default MXCSR, as the scalar code's 1.5 * 2^23 trick rounds) and clamped to
// [-128, 127] (by the saturating packs), and the same integer group sums.
bool quantize_block_q8_k_avx2(const float* x, uint8_t* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  __m256 vmax = zero, poison = zero;
  for (int j = 0; j < QK_K; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));  // NaN where an element is infinite or NaN
  }
  if (_mm256_movemask_ps(_mm256_cmp_ps(poison, poison, _CMP_UNORD_Q))) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  if (amax == 0.0f) return false;
  int first = 0;
  for (int j = 0; j < QK_K; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)),
                                                     _mm256_set1_ps(amax), _CMP_EQ_OQ));
    if (hit) {
      first = j + __builtin_ctz(static_cast<unsigned>(hit));
      break;
    }
  }
  const float iscale = -128.0f / x[first];
  if (__builtin_isinf(iscale)) return false;  // a subnormal largest value: the scalar code's clamps of inf * x
  const __m256 s = _mm256_set1_ps(iscale);
  auto* blk = reinterpret_cast<block_q8_K*>(out);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), ones8 = _mm256_set1_epi8(1);
  for (int j = 0; j < QK_K; j += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(s, _mm256_loadu_ps(x + j + 8 * i)));
    const __m256i q16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    const __m256i q8 = _mm256_permutevar8x32_epi32(q16, order);  // the packs' lane order undone
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(blk->qs + j), q8);
    // int32 lanes 0-3: sums of 4 of the first 16 bytes, 4-7: of the last 16; two hadds sum each half
    __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q8), _mm256_set1_epi16(1));
    s32 = _mm256_hadd_epi32(s32, s32);
    s32 = _mm256_hadd_epi32(s32, s32);
    blk->bsums[j / 16] = static_cast<int16_t>(_mm256_extract_epi32(s32, 0));
    blk->bsums[j / 16 + 1] = static_cast<int16_t>(_mm256_extract_epi32(s32, 4));
  }
  blk->d = 1.0f / iscale;
  return true;
}

// quantize_act_q8 (gguf_matmul_scalar.cpp) eight lanes at a time: the same d = max|x| / 127 and 1 / d, the same
// products x * (1 / d) rounded to nearest-even and clamped to [-127, 127], and the same integer sum.
bool quantize_block_q8_avx2(const float* x, uint8_t* out, int half) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  __m256 v[4], vmax = zero, poison = zero;
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v[i]));
    poison = _mm256_add_ps(poison, _mm256_mul_ps(v[i], zero));  // NaN where an element is infinite or NaN
  }
  if (_mm256_movemask_ps(_mm256_cmp_ps(poison, poison, _CMP_UNORD_Q))) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float d = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  if (__builtin_isinf(id)) return false;  // a subnormal d: the scalar code's clamps of inf * x
  const __m256 s = _mm256_set1_ps(id);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], s));
  const __m256i q16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  // clamped to [-127, 127] as the scalar code clamps: the packs saturate at 127 and -128, the max lifts -128
  // (with a finite 1 / d, |x / d| stays within rounding of 127, but the clamp costs one instruction)
  const __m256i q8 = _mm256_max_epi8(_mm256_permutevar8x32_epi32(q16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)),
                                     _mm256_set1_epi8(-127));
  auto* a = reinterpret_cast<ActQ8x2*>(out);
  // values 0..15 of the block at qs[16 half], 16..31 at qs[32 + 16 half] (act_pair_index)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(a->qs + 16 * half), _mm256_castsi256_si128(q8));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(a->qs + 32 + 16 * half), _mm256_extracti128_si256(q8, 1));
  __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q8), _mm256_set1_epi16(1));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
  s4 = _mm_hadd_epi32(s4, s4);
  s4 = _mm_hadd_epi32(s4, s4);
  a->d[half] = d;
  a->s[half] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  return true;
}

}  // namespace flashlm::gemm::detail
