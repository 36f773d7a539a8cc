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
// csrc/gguf/dequantize_avx2_common.h for what such a file must not use (no std:: templates).
#include <cstddef>

#include "../gguf/dequantize_avx2_common.h"
#include "../gguf/dequantize_block.h"
#include "gguf_matmul_kernels.h"

namespace flashlm::gemm::detail {
namespace {

using gguf::QK_K;
using gguf::block_q4_K;
using gguf::block_q5_K;
using gguf::block_q6_K;
using gguf::block_q8_K;
using gguf::detail::bit_plane;
using gguf::detail::crumbs;
using gguf::detail::expand_bits;
using gguf::detail::ld_u32;
using gguf::detail::load16B;
using gguf::detail::load32B;
using gguf::detail::load_f16;
using gguf::detail::nibbles;
using gguf::detail::nibbles_lo_hi;

// Sum of 32 unsigned-by-signed byte products, as 8 int32 partial sums.
FLASHLM_AVX2_INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

FLASHLM_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FLASHLM_AVX2_INLINE const block_q8_K* q8k(const uint8_t* p) { return reinterpret_cast<const block_q8_K*>(p); }
FLASHLM_AVX2_INLINE const ActQ8* q8(const uint8_t* p) { return reinterpret_cast<const ActQ8*>(p); }

// ---- 32-element types: a block is 32 quants q, a scale d and an offset per unit of activation sum ----------
// Each `load` gives q as bytes (unsigned unless kSigned), d, and m with value = d * q + m.

// Q4_0 (value = d * (q - 8)), Q4_1 (d * q + m), Q5_0 (d * (q - 16)), Q5_1 (d * q + m); for Q5_x bit 4 of
// element j is bit j of qh.
template <class Block, bool kMin, bool kFive>
struct Q4Q5 {
  static constexpr int kBytes = sizeof(Block);
  static constexpr bool kSigned = false;
  FLASHLM_AVX2_INLINE static __m256i load(const uint8_t* b, float& d, float& m) {
    d = load_f16(b);
    m = kMin ? load_f16(b + 2) : (kFive ? -16.0f : -8.0f) * d;
    const __m256i q = nibbles_lo_hi(b + offsetof(Block, qs));
    if constexpr (kFive) return _mm256_or_si256(q, expand_bits(ld_u32(b + offsetof(Block, qh)), 0x10));
    return q;
  }
};
struct Q8_0 {
  static constexpr int kBytes = sizeof(gguf::block_q8_0);
  static constexpr bool kSigned = true;
  FLASHLM_AVX2_INLINE static __m256i load(const uint8_t* b, float& d, float& m) {
    d = load_f16(b);
    m = 0.0f;
    return load32B(b + offsetof(gguf::block_q8_0, qs));
  }
};

// One weight block of a 32-element type against R activation rows (x[r] + offset is its ActQ8).
template <class W>
struct Legacy {
  static constexpr int kBlock = 32, kBytes = W::kBytes, kActBytes = sizeof(ActQ8);
  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, const uint8_t* const* x, int64_t off, __m256* acc, float* corr) {
    float d, m;
    const __m256i q = W::load(w, d, m);
    const __m256i u = W::kSigned ? _mm256_sign_epi8(q, q) : q;
    for (int r = 0; r < R; ++r) {
      const ActQ8* a = q8(x[r] + off);
      __m256i y = load32B(reinterpret_cast<const uint8_t*>(a->qs));
      if (W::kSigned) y = _mm256_sign_epi8(y, q);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, y)), _mm256_set1_ps(d * a->d), acc[r]);
      corr[r] += m * a->s;
    }
  }
};

// ---- K-quants: 256 elements against one block_q8_K per activation row ----------------------------------

// The 6-bit scales and mins of Q4_K/Q5_K's 8 sub-blocks (ggml's get_scale_min_k4).
FLASHLM_AVX2_INLINE void scales_mins_k4(const uint8_t* q, int* sc, int* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = q[j] & 63;
    mn[j] = q[j + 4] & 63;
    sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
    mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
  }
}

// value = d * sc[j] * q - dmin * mn[j] in sub-block j of 32; Q5_K adds bit j of qh[l] as the fifth bit.
template <bool kFive>
struct Q45_K {
  static constexpr int kBlock = QK_K, kActBytes = sizeof(block_q8_K);
  static constexpr int kBytes = kFive ? sizeof(block_q5_K) : sizeof(block_q4_K);
  static constexpr int kQs = kFive ? offsetof(block_q5_K, qs) : offsetof(block_q4_K, qs);
  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, const uint8_t* const* x, int64_t off, __m256* acc, float* corr) {
    const float d = load_f16(w), dmin = load_f16(w + 2);
    int sc[8], mn[8];
    scales_mins_k4(w + offsetof(block_q4_K, scales), sc, mn);
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    __m256i qh = _mm256_setzero_si256();
    if (kFive) qh = load32B(w + offsetof(block_q5_K, qh));
    for (int i = 0; i < 4; ++i) {  // sub-blocks 2i (low nibbles) and 2i + 1 (high nibbles) of qs[32i..]
      const __m256i raw = load32B(w + kQs + 32 * i);
      __m256i lo = nibbles(raw, 0), hi = nibbles(raw, 1);
      if (kFive) {
        lo = _mm256_or_si256(lo, bit_plane(qh, 2 * i, 0x10));
        hi = _mm256_or_si256(hi, bit_plane(qh, 2 * i + 1, 0x10));
      }
      const __m256i s0 = _mm256_set1_epi16(static_cast<short>(sc[2 * i]));
      const __m256i s1 = _mm256_set1_epi16(static_cast<short>(sc[2 * i + 1]));
      for (int r = 0; r < R; ++r) {
        const uint8_t* y = reinterpret_cast<const uint8_t*>(q8k(x[r] + off)->qs) + 64 * i;
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load32B(y)), s0);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load32B(y + 32)), s1);
        isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(p0, p1));
      }
    }
    for (int r = 0; r < R; ++r) {
      const block_q8_K* a = q8k(x[r] + off);
      int msum = 0;
      for (int j = 0; j < 8; ++j) msum += mn[j] * (a->bsums[2 * j] + a->bsums[2 * j + 1]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * a->d), acc[r]);
      corr[r] -= dmin * a->d * static_cast<float>(msum);
    }
  }
};

// value = d * scales[g] * (q - 32) in sub-block g of 16; q's layout as in Decoder<Q6_K>.
struct Q6_K {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q6_K), kActBytes = sizeof(block_q8_K);
  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, const uint8_t* const* x, int64_t off, __m256* acc, float* corr) {
    const float d = load_f16(w + offsetof(block_q6_K, d));
    const auto* scales = reinterpret_cast<const int8_t*>(w + offsetof(block_q6_K, scales));
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i ql0 = load32B(w + offsetof(block_q6_K, ql) + 64 * h);
      const __m256i ql1 = load32B(w + offsetof(block_q6_K, ql) + 64 * h + 32);
      const __m256i qh = load32B(w + offsetof(block_q6_K, qh) + 32 * h);
      __m256i q[4] = {nibbles(ql0, 0), nibbles(ql1, 0), nibbles(ql0, 1), nibbles(ql1, 1)};
      for (int t = 0; t < 4; ++t) {  // quarter t: elements 128h + 32t + l, sub-blocks 8h + 2t and 8h + 2t + 1
        q[t] = _mm256_or_si256(q[t], _mm256_slli_epi16(crumbs(qh, t), 4));  // crumbs <= 3: no carry across bytes
        const int g = 8 * h + 2 * t;
        const __m256i s = _mm256_set_m128i(_mm_set1_epi16(scales[g + 1]), _mm_set1_epi16(scales[g]));
        for (int r = 0; r < R; ++r) {
          const uint8_t* y = reinterpret_cast<const uint8_t*>(q8k(x[r] + off)->qs) + 128 * h + 32 * t;
          isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q[t], load32B(y)), s));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const block_q8_K* a = q8k(x[r] + off);
      int ssum = 0;
      for (int g = 0; g < 16; ++g) ssum += scales[g] * a->bsums[g];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * a->d), acc[r]);
      corr[r] -= 32.0f * d * a->d * static_cast<float>(ssum);
    }
  }
};

// ---- Drivers -----------------------------------------------------------------------------------------------

// y[m0 + r, n] for r < R: one weight row against R activation rows.
template <class T, int R>
FLASHLM_AVX2_INLINE void dot_rows(const RowsArgs& a, int64_t n, int64_t m0) {
  const uint8_t* w = a.w + n * a.row_bytes;
  const uint8_t* x[R];
  __m256 acc[R];
  float corr[R];
  for (int r = 0; r < R; ++r) {
    x[r] = a.acts + (m0 + r) * a.act_bytes;
    acc[r] = _mm256_setzero_ps();
    corr[r] = 0.0f;
  }
  const int64_t nb = a.k / T::kBlock;
  for (int64_t b = 0; b < nb; ++b) T::template block<R>(w + b * T::kBytes, x, b * T::kActBytes, acc, corr);
  for (int r = 0; r < R; ++r) a.y[(m0 + r) * a.ldy + n] = hsum(acc[r]) + corr[r];
}

// 16 weight rows: with 4 activation rows per pass, ~40 KiB of Q4_0 weights at K = 4096, which the L2 keeps
// while every group of activation rows passes over them.
constexpr int64_t kTileN = 16;

template <class T>
void run_rows(const RowsArgs& a, int64_t n0, int64_t n1) {
  for (int64_t nt = n0; nt < n1; nt += kTileN) {
    const int64_t ne = nt + kTileN < n1 ? nt + kTileN : n1;
    int64_t m = 0;
    for (; m + 4 <= a.m; m += 4)
      for (int64_t n = nt; n < ne; ++n) dot_rows<T, 4>(a, n, m);
    const int64_t rest = a.m - m;
    for (int64_t n = nt; n < ne; ++n) {
      if (rest == 3) dot_rows<T, 3>(a, n, m);
      if (rest == 2) dot_rows<T, 2>(a, n, m);
      if (rest == 1) dot_rows<T, 1>(a, n, m);
    }
  }
}

}  // namespace

bool gguf_matmul_rows_avx2(const RowsArgs& a, int64_t n0, int64_t n1) {
  switch (a.type) {
    case DType::Q4_0: run_rows<Legacy<Q4Q5<gguf::block_q4_0, false, false>>>(a, n0, n1); return true;
    case DType::Q4_1: run_rows<Legacy<Q4Q5<gguf::block_q4_1, true, false>>>(a, n0, n1); return true;
    case DType::Q5_0: run_rows<Legacy<Q4Q5<gguf::block_q5_0, false, true>>>(a, n0, n1); return true;
    case DType::Q5_1: run_rows<Legacy<Q4Q5<gguf::block_q5_1, true, true>>>(a, n0, n1); return true;
    case DType::Q8_0: run_rows<Legacy<Q8_0>>(a, n0, n1); return true;
    case DType::Q4_K: run_rows<Q45_K<false>>(a, n0, n1); return true;
    case DType::Q5_K: run_rows<Q45_K<true>>(a, n0, n1); return true;
    case DType::Q6_K: run_rows<Q6_K>(a, n0, n1); return true;
    default: return false;
  }
}

}  // namespace flashlm::gemm::detail
