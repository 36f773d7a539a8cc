// The GGUF matmul's AVX2 kernels for the plain block layouts (gguf_matmul_avx2.cpp describes them),
// included by two files that differ in one step: gguf_matmul_avx2.cpp (-mavx2) and gguf_matmul_vnni.cpp
// (-mavxvnni), which first define, in flashlm::gemm::detail's anonymous namespace,
//   __m256i madd_add(__m256i acc, __m256i a, __m256i b): acc + madd(a, b), int16 pairs into int32 lanes,
// as an add after a madd (AVX2) or one vpdpwssd (AVX-VNNI). The integers are the same either way, so both
// give the same results; rows_all_types is the entry point.
#pragma once

#include <cstddef>

#include "../core/half.h"
#include "../gguf/shared_unpack_avx2.h"
#include "flashlm/gguf/blocks.h"
#include "gguf_matmul_kernels.h"
#include "kernels_avx2_common.h"

namespace flashlm::gemm::detail {
namespace {

using gguf::QK_K;
using gguf::block_q4_K;
using gguf::block_q5_K;
using gguf::block_q6_K;
using gguf::block_q8_K;
using core::ld_u32;
using gguf::detail::bit_plane;
using gguf::detail::crumbs;
using gguf::detail::expand_bits;
using gguf::detail::load16B;
using gguf::detail::load32B;
using gguf::detail::load_f16;
using gguf::detail::nibbles;
using gguf::detail::nibbles_lo_hi;

// Sum of 32 unsigned-by-signed byte products, as 8 int32 partial sums.
FLASHLM_AVX2_INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

FLASHLM_AVX2_INLINE const block_q8_K* q8k(const uint8_t* p) { return reinterpret_cast<const block_q8_K*>(p); }
FLASHLM_AVX2_INLINE const ActQ8x2* q8(const uint8_t* p) { return reinterpret_cast<const ActQ8x2*>(p); }

// ---- 32-element types: a block is 32 quants q, a scale d and an offset per unit of activation sum ----------
// Each type gives, with value = d * q + m:
//   load(b, d, m):  block b's quants as 32 bytes in element order (unsigned unless kSigned);
//   load2(b, lo, hi): the quants of blocks b and b + 1 laid out as an ActQ8x2 pair: lo = the first 16 of
//                   each block, hi = the last 16 (every block starts with its f16 scale d; Legacy reads them).

FLASHLM_AVX2_INLINE __m256i low_lanes(__m256i a, __m256i b) { return _mm256_permute2x128_si256(a, b, 0x20); }
FLASHLM_AVX2_INLINE __m256i high_lanes(__m256i a, __m256i b) { return _mm256_permute2x128_si256(a, b, 0x31); }

// Q4_0 (value = d * (q - 8)), Q4_1 (d * q + m), Q5_0 (d * (q - 16)), Q5_1 (d * q + m); for Q5_x bit 4 of
// element j is bit j of qh. The constant offsets (kOffset: 8, 16) are subtracted in the integer dot product,
// exactly; the per-block minimum m of Q4_1/Q5_1 goes through the activation sums.
template <class Block, bool kMin, bool kFive>
struct Q4Q5 {
  static constexpr int kBytes = sizeof(Block);
  static constexpr bool kSigned = false;
  static constexpr int kOffset = kMin ? 0 : (kFive ? 16 : 8);
  static constexpr bool kHasMin = kMin;  // an f16 minimum right after the f16 scale
  FLASHLM_AVX2_INLINE static void scales(const uint8_t* b, float& d, float& m) {
    d = load_f16(b);
    m = kMin ? load_f16(b + 2) : 0.0f;
  }
  FLASHLM_AVX2_INLINE static __m256i load(const uint8_t* b, float& d, float& m) {
    scales(b, d, m);
    const __m256i q = nibbles_lo_hi(b + offsetof(Block, qs));
    if constexpr (kFive) return _mm256_or_si256(q, expand_bits(ld_u32(b + offsetof(Block, qh)), 0x10));
    return q;
  }
  FLASHLM_AVX2_INLINE static void load2(const uint8_t* b, __m256i& lo, __m256i& hi) {
    const uint8_t* b1 = b + kBytes;
    // [qs of block 0 | qs of block 1]: the low nibbles are both blocks' first 16 quants, the high ones the rest.
    const __m256i v = _mm256_set_m128i(load16B(b1 + offsetof(Block, qs)), load16B(b + offsetof(Block, qs)));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(v, mask);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    if constexpr (kFive) {
      const __m256i e0 = expand_bits(ld_u32(b + offsetof(Block, qh)), 0x10);
      const __m256i e1 = expand_bits(ld_u32(b1 + offsetof(Block, qh)), 0x10);
      lo = _mm256_or_si256(lo, low_lanes(e0, e1));
      hi = _mm256_or_si256(hi, high_lanes(e0, e1));
    }
  }
};
struct Q8_0 {
  static constexpr int kBytes = sizeof(gguf::block_q8_0);
  static constexpr bool kSigned = true;
  static constexpr int kOffset = 0;
  static constexpr bool kHasMin = false;
  FLASHLM_AVX2_INLINE static __m256i load(const uint8_t* b, float& d, float& m) {
    d = load_f16(b);
    m = 0.0f;
    return load32B(b + offsetof(gguf::block_q8_0, qs));
  }
  FLASHLM_AVX2_INLINE static void load2(const uint8_t* b, __m256i& lo, __m256i& hi) {
    float d, m;
    const __m256i q0 = load(b, d, m), q1 = load(b + kBytes, d, m);
    lo = low_lanes(q0, q1);
    hi = high_lanes(q0, q1);
  }
};

// Two weight blocks of a 32-element type against R activation rows (x[r] + off is their ActQ8x2): one
// unpack, two maddubs, one int -> float conversion and one multiply-add per row for both blocks. block4 is
// the GEMV form: one activation row against 4 weight rows, its loads and offset term shared. Both compute
// each output with the same operations in the same order, so a row's result does not depend on the batch.
template <class W>
struct Legacy {
  static constexpr int kBlock = 64, kBytes = 2 * W::kBytes, kActBytes = sizeof(ActQ8x2);
  static constexpr bool kTail = true;  // a row of an odd number of blocks ends with one block
  // Whether a GEMV takes four weight rows at once: it cuts the unpacking and activation loads that bound the
  // 4- and 5-bit types (Q4_0 4096 x 768: 1.25x, hot or cold), but Q8_0, twice the bytes, is bound by memory,
  // and four interleaved streams read it more slowly than one (a 12-layer decode: 4.5 ms against 3.5).
  static constexpr bool kGemv4 = !W::kSigned;

  // kOffset * (pair sums of the activations) as int16 lanes, what the unsigned quants overcount by.
  FLASHLM_AVX2_INLINE static __m256i offset16(__m256i y0, __m256i y1) {
    if constexpr (W::kOffset == 0) return _mm256_setzero_si256();
    const __m256i c = _mm256_set1_epi8(W::kOffset);
    return _mm256_add_epi16(_mm256_maddubs_epi16(c, y0), _mm256_maddubs_epi16(c, y1));
  }
  // int32 lanes 0-3: block 0's dot product, lanes 4-7: block 1's. lo/hi: the pair's quants (signed for
  // Q8_0, with ulo/uhi their magnitudes), y0/y1 the activation pair, off16 from offset16.
  FLASHLM_AVX2_INLINE static __m256i dot(__m256i lo, __m256i hi, __m256i ulo, __m256i uhi, __m256i y0, __m256i y1,
                                         __m256i off16) {
    if constexpr (W::kSigned) {  // two maddubs of up to 2 * 128 * 127 each would overflow an int16 sum
      return _mm256_add_epi32(dot_u8s8(ulo, _mm256_sign_epi8(y0, lo)), dot_u8s8(uhi, _mm256_sign_epi8(y1, hi)));
    } else {  // |sum| <= 2 * (2 * 31 * 128) = 15872 and |off16| <= 2 * (2 * 16 * 128) = 8192 per int16 lane
      __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(ulo, y0), _mm256_maddubs_epi16(uhi, y1));
      if constexpr (W::kOffset != 0) s16 = _mm256_sub_epi16(s16, off16);
      return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
    }
  }
  // [d0 x 4 | d1 x 4]: the two blocks' f16 scales (the first two bytes of each block), widened.
  FLASHLM_AVX2_INLINE static __m256 weight_scales(const uint8_t* w) {
    uint16_t h0, h1;
    __builtin_memcpy(&h0, w, 2);
    __builtin_memcpy(&h1, w + W::kBytes, 2);
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | (uint32_t(h1) << 16))));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  // [dx0 x 4 | dx1 x 4]: the activation pair's scales.
  FLASHLM_AVX2_INLINE static __m256 act_scales(const ActQ8x2* a) {
    const __m128 f = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a->d)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  // acc += p * (d_w * d_x) lane-wise; the minimum of Q4_1/Q5_1 through the activation sums.
  FLASHLM_AVX2_INLINE static void accumulate(__m256i p, __m256 dw, __m256 dx, const uint8_t* w, const ActQ8x2* a,
                                             __m256& acc, float& corr) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, dx), acc);
    if constexpr (W::kHasMin) corr += load_f16(w + 2) * a->s[0] + load_f16(w + W::kBytes + 2) * a->s[1];
  }

  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, const uint8_t* const* x, int64_t off, __m256* acc, float* corr) {
    __m256i lo, hi;
    W::load2(w, lo, hi);
    const __m256i ulo = W::kSigned ? _mm256_sign_epi8(lo, lo) : lo, uhi = W::kSigned ? _mm256_sign_epi8(hi, hi) : hi;
    const __m256 dw = weight_scales(w);
    for (int r = 0; r < R; ++r) {
      const ActQ8x2* a = q8(x[r] + off);
      const __m256i y0 = load32B(reinterpret_cast<const uint8_t*>(a->qs));
      const __m256i y1 = load32B(reinterpret_cast<const uint8_t*>(a->qs) + 32);
      accumulate(dot(lo, hi, ulo, uhi, y0, y1, offset16(y0, y1)), dw, act_scales(a), w, a, acc[r], corr[r]);
    }
  }

  // Weight rows w, w + row_bytes, ... (4 of them) against one activation pair a.
  FLASHLM_AVX2_INLINE static void block4(const uint8_t* w, int64_t row_bytes, const ActQ8x2* a, __m256* acc,
                                         float* corr) {
    const __m256i y0 = load32B(reinterpret_cast<const uint8_t*>(a->qs));
    const __m256i y1 = load32B(reinterpret_cast<const uint8_t*>(a->qs) + 32);
    const __m256i off16 = offset16(y0, y1);
    const __m256 dx = act_scales(a);
    for (int j = 0; j < 4; ++j) {
      const uint8_t* wj = w + j * row_bytes;
      __m256i lo, hi;
      W::load2(wj, lo, hi);
      const __m256i ulo = W::kSigned ? _mm256_sign_epi8(lo, lo) : lo;
      const __m256i uhi = W::kSigned ? _mm256_sign_epi8(hi, hi) : hi;
      accumulate(dot(lo, hi, ulo, uhi, y0, y1, off16), weight_scales(wj), dx, wj, a, acc[j], corr[j]);
    }
  }

  // The last block of a row with an odd number of blocks, against block 0 of its pair.
  template <int R>
  FLASHLM_AVX2_INLINE static void tail(const uint8_t* w, const uint8_t* const* x, int64_t off, __m256* acc, float* corr) {
    float d, m;
    const __m256i q = W::load(w, d, m);
    const __m256i u = W::kSigned ? _mm256_sign_epi8(q, q) : q;
    for (int r = 0; r < R; ++r) {
      const ActQ8x2* a = q8(x[r] + off);
      const uint8_t* qs = reinterpret_cast<const uint8_t*>(a->qs);
      __m256i y = _mm256_set_m128i(load16B(qs + 32), load16B(qs));  // the block's 32 values in order
      if (W::kSigned) y = _mm256_sign_epi8(y, q);
      __m256i p = dot_u8s8(u, y);
      if constexpr (W::kOffset != 0) p = _mm256_sub_epi32(p, dot_u8s8(_mm256_set1_epi8(W::kOffset), y));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a->d[0]), acc[r]);
      if constexpr (W::kHasMin) corr[r] += m * a->s[0];
    }
  }
};

// ---- K-quants: 256 elements against one block_q8_K per activation row ----------------------------------

// Lane i of the result: the int16 lane j of both 128-bit halves of v (a broadcast within each half).
template <int j>
FLASHLM_AVX2_INLINE __m256i broadcast_epi16(__m256i v) {
  return _mm256_shuffle_epi8(v, _mm256_set1_epi16(static_cast<short>(((2 * j + 1) << 8) | (2 * j))));
}

// Where the parts of a K-quant block are: Plain* in a block of the plain layout, X4* in row j of an x4
// group's super-block (shared_gguf_matmul.h). The kernels read through them, so both layouts run the same
// instructions on the same bytes.
struct PlainQ4K {
  FLASHLM_AVX2_INLINE static const uint8_t* d(const uint8_t* w, int) { return w; }
  FLASHLM_AVX2_INLINE static const uint8_t* dmin(const uint8_t* w, int) { return w + 2; }
  FLASHLM_AVX2_INLINE static const uint8_t* scales(const uint8_t* w, int) { return w + offsetof(block_q4_K, scales); }
  // 32 bytes i of qs (Q5_K's qs are further in)
  template <int kQs>
  FLASHLM_AVX2_INLINE static const uint8_t* qs(const uint8_t* w, int, int i) { return w + kQs + 32 * i; }
};
struct X4Q4K {
  FLASHLM_AVX2_INLINE static const uint8_t* d(const uint8_t* w, int j) { return w + 2 * j; }
  FLASHLM_AVX2_INLINE static const uint8_t* dmin(const uint8_t* w, int j) { return w + 8 + 2 * j; }
  FLASHLM_AVX2_INLINE static const uint8_t* scales(const uint8_t* w, int j) { return w + 16 + 12 * j; }
  template <int>
  FLASHLM_AVX2_INLINE static const uint8_t* qs(const uint8_t* w, int j, int i) { return w + 64 + 128 * i + 32 * j; }
};
struct PlainQ6K {
  FLASHLM_AVX2_INLINE static const uint8_t* d(const uint8_t* w, int) { return w + offsetof(block_q6_K, d); }
  FLASHLM_AVX2_INLINE static const uint8_t* scales(const uint8_t* w, int) { return w + offsetof(block_q6_K, scales); }
  // c = 0, 1: ql[64h + 32c ..]; c = 2: qh[32h ..]
  FLASHLM_AVX2_INLINE static const uint8_t* part(const uint8_t* w, int, int h, int c) {
    return c < 2 ? w + offsetof(block_q6_K, ql) + 64 * h + 32 * c : w + offsetof(block_q6_K, qh) + 32 * h;
  }
};
struct X4Q6K {
  FLASHLM_AVX2_INLINE static const uint8_t* d(const uint8_t* w, int j) { return w + 2 * j; }
  FLASHLM_AVX2_INLINE static const uint8_t* scales(const uint8_t* w, int j) { return w + 8 + 16 * j; }
  FLASHLM_AVX2_INLINE static const uint8_t* part(const uint8_t* w, int j, int h, int c) {
    return w + 72 + 384 * h + 128 * c + 32 * j;
  }
};

// value = d * sc[j] * q - dmin * mn[j] in sub-block j of 32; Q5_K adds bit j of qh[l] as the fifth bit.
template <bool kFive>
struct Q45_K {
  static constexpr int kBlock = QK_K, kActBytes = sizeof(block_q8_K);
  static constexpr bool kTail = false;
  static constexpr int kBytes = kFive ? sizeof(block_q5_K) : sizeof(block_q4_K);
  static constexpr int kQs = kFive ? offsetof(block_q5_K, qs) : offsetof(block_q4_K, qs);

  template <class L, int i, int R>
  FLASHLM_AVX2_INLINE static void pair(const uint8_t* w, int j, __m256i qh, __m256i sc16, const uint8_t* const* x,
                                       int64_t off, __m256i* isum) {
    // sub-blocks 2i (low nibbles) and 2i + 1 (high nibbles) of qs[32i..]
    const __m256i raw = load32B(L::template qs<kQs>(w, j, i));
    __m256i lo = nibbles(raw, 0), hi = nibbles(raw, 1);
    if constexpr (kFive) {
      lo = _mm256_or_si256(lo, bit_plane(qh, 2 * i, 0x10));
      hi = _mm256_or_si256(hi, bit_plane(qh, 2 * i + 1, 0x10));
    }
    const __m256i s0 = broadcast_epi16<2 * i>(sc16), s1 = broadcast_epi16<2 * i + 1>(sc16);
    for (int r = 0; r < R; ++r) {
      const uint8_t* y = reinterpret_cast<const uint8_t*>(q8k(x[r] + off)->qs) + 64 * i;
      isum[r] = madd_add(madd_add(isum[r], _mm256_maddubs_epi16(lo, load32B(y)), s0),
                         _mm256_maddubs_epi16(hi, load32B(y + 32)), s1);
    }
  }

  // Row j of the block at w (laid out as L says) against R activation rows.
  template <class L, int R>
  FLASHLM_AVX2_INLINE static void block_at(const uint8_t* w, int j, const uint8_t* const* x, int64_t off, __m256* acc) {
    const float d = load_f16(L::d(w, j)), dmin = load_f16(L::dmin(w, j));
    const __m128i sc_mn = scales_mins_k4(L::scales(w, j));
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc_mn));
    // mins[j] twice each, as 16 int16: multiplied with the 16 group sums of 16, pairs add up per sub-block.
    const __m128i mins = _mm_unpackhi_epi64(sc_mn, sc_mn);
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kFive) qh = load32B(w + offsetof(block_q5_K, qh));
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    pair<L, 0, R>(w, j, qh, sc16, x, off, isum);
    pair<L, 1, R>(w, j, qh, sc16, x, off, isum);
    pair<L, 2, R>(w, j, qh, sc16, x, off, isum);
    pair<L, 3, R>(w, j, qh, sc16, x, off, isum);
    for (int r = 0; r < R; ++r) {
      const block_q8_K* a = q8k(x[r] + off);
      const __m256i msum = _mm256_madd_epi16(load32B(reinterpret_cast<const uint8_t*>(a->bsums)), mins16);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * a->d), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(-dmin * a->d), acc[r]);
    }
  }

  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, const uint8_t* const* x, int64_t off, __m256* acc, float*) {
    block_at<PlainQ4K, R>(w, 0, x, off, acc);
  }
};

// value = d * scales[g] * (q - 32) in sub-block g of 16; q's layout as in Decoder<Q6_K>.
struct Q6_K {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q6_K), kActBytes = sizeof(block_q8_K);
  static constexpr bool kTail = false;

  // Row j of the block at w (laid out as L says) against R activation rows.
  template <class L, int R>
  FLASHLM_AVX2_INLINE static void block_at(const uint8_t* w, int j, const uint8_t* const* x, int64_t off, __m256* acc) {
    const float d = load_f16(L::d(w, j));
    const auto* scales = reinterpret_cast<const int8_t*>(L::scales(w, j));
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i ql0 = load32B(L::part(w, j, h, 0));
      const __m256i ql1 = load32B(L::part(w, j, h, 1));
      const __m256i qh = load32B(L::part(w, j, h, 2));
      __m256i q[4] = {nibbles(ql0, 0), nibbles(ql1, 0), nibbles(ql0, 1), nibbles(ql1, 1)};
      for (int t = 0; t < 4; ++t) {  // quarter t: elements 128h + 32t + l, sub-blocks 8h + 2t and 8h + 2t + 1
        q[t] = _mm256_or_si256(q[t], _mm256_slli_epi16(crumbs(qh, t), 4));  // crumbs <= 3: no carry across bytes
        const int g = 8 * h + 2 * t;
        const __m256i s = _mm256_set_m128i(_mm_set1_epi16(scales[g + 1]), _mm_set1_epi16(scales[g]));
        for (int r = 0; r < R; ++r) {
          const uint8_t* y = reinterpret_cast<const uint8_t*>(q8k(x[r] + off)->qs) + 128 * h + 32 * t;
          isum[r] = madd_add(isum[r], _mm256_maddubs_epi16(q[t], load32B(y)), s);
        }
      }
    }
    // The -32 offset: -32 * d * d_x * sum_g scales[g] * bsums[g].
    const __m256i sc16 = _mm256_cvtepi8_epi16(load16B(L::scales(w, j)));
    for (int r = 0; r < R; ++r) {
      const block_q8_K* a = q8k(x[r] + off);
      const __m256i ssum = _mm256_madd_epi16(load32B(reinterpret_cast<const uint8_t*>(a->bsums)), sc16);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * a->d), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ssum), _mm256_set1_ps(-32.0f * d * a->d), acc[r]);
    }
  }

  template <int R>
  FLASHLM_AVX2_INLINE static void block(const uint8_t* w, const uint8_t* const* x, int64_t off, __m256* acc, float*) {
    block_at<PlainQ6K, R>(w, 0, x, off, acc);
  }
};

// ---- Drivers -----------------------------------------------------------------------------------------------

// Software prefetch distance along a weight row: 1 KiB ahead made cold Q4_0/Q8_0 GEMV 1.1-1.2x faster on 2
// Zen 3 cores (4096 x 4096, bench_gguf_matmul; K-quants unchanged); 2 and 4 KiB could not be told apart
// from it on the shared machine.
constexpr int64_t kPrefetch = 1024;

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
  for (int64_t b = 0; b < nb; ++b) {
    // The weights stream from memory once (GEMV): ask for the bytes kPrefetch ahead of the ones in use.
    _mm_prefetch(reinterpret_cast<const char*>(w + b * T::kBytes + kPrefetch), _MM_HINT_T0);
    T::template block<R>(w + b * T::kBytes, x, b * T::kActBytes, acc, corr);
  }
  if constexpr (T::kTail) {
    if (a.k % T::kBlock) T::template tail<R>(w + nb * T::kBytes, x, nb * T::kActBytes, acc, corr);
  }
  for (int r = 0; r < R; ++r) a.y[(m0 + r) * a.ldy + n] = hsum(acc[r]) + corr[r];
}

// y[0, n .. n + 4): one activation row against 4 weight rows (the 32-element types' GEMV), each output
// computed exactly as dot_rows<T, 1> computes it.
template <class T>
FLASHLM_AVX2_INLINE void gemv_rows4(const RowsArgs& a, int64_t n) {
  const uint8_t* w = a.w + n * a.row_bytes;
  __m256 acc[4];
  float corr[4];
  for (int j = 0; j < 4; ++j) {
    acc[j] = _mm256_setzero_ps();
    corr[j] = 0.0f;
  }
  const int64_t nb = a.k / T::kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    // The four rows are one contiguous stretch of 4 * row_bytes, read in four interleaved streams: fetch the
    // same place of the next four rows.
    for (int j = 4; j < 8; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(w + j * a.row_bytes + b * T::kBytes), _MM_HINT_T0);
    T::block4(w + b * T::kBytes, a.row_bytes, q8(a.acts + b * T::kActBytes), acc, corr);
  }
  if (a.k % T::kBlock) {
    const uint8_t* x[1] = {a.acts};
    for (int j = 0; j < 4; ++j) T::template tail<1>(w + j * a.row_bytes + nb * T::kBytes, x, nb * T::kActBytes, &acc[j], &corr[j]);
  }
  for (int j = 0; j < 4; ++j) a.y[n + j] = hsum(acc[j]) + corr[j];
}

// 16 weight rows: with 4 activation rows per pass, ~40 KiB of Q4_0 weights at K = 4096, which the L2 keeps
// while every group of activation rows passes over them.
constexpr int64_t kTileN = 16;

template <class T>
void run_rows(const RowsArgs& a, int64_t n0, int64_t n1) {
  if constexpr (T::kBlock == 64) {
    if constexpr (T::kGemv4) {  // Q4_x, Q5_x: GEMV four weight rows at a time
      if (a.m == 1) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) gemv_rows4<T>(a, n);
        for (; n < n1; ++n) dot_rows<T, 1>(a, n, 0);
        return;
      }
    }
  }
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

// y[m, n] for n in [n0, n1) through the kernels of a.type; false where the type has none.
FLASHLM_AVX2_INLINE bool rows_all_types(const RowsArgs& a, int64_t n0, int64_t n1) {
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

}  // namespace
}  // namespace flashlm::gemm::detail
