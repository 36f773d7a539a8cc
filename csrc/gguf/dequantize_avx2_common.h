// AVX2 building blocks of the dequantization kernels (dequantize_avx2.cpp): writing 32 values as f32, f16
// or bf16, widening int8 quants to float, unpacking nibbles and bit planes.
//
// Include this only from sources compiled with -mavx2 -mfma -mf16c (csrc/CMakeLists.txt, `_avx2_sources`),
// which run only after a run-time CPU check. Everything here sits in an anonymous namespace and is forced
// inline, and the kernels use no shared templates (std::min, inline functions of public headers): an
// inline function with external linkage compiled with AVX2 flags could be the copy the linker keeps for
// callers that run on CPUs without AVX2.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "flashlm/core/dtype.h"

#define FLASHLM_AVX2_INLINE __attribute__((always_inline)) inline

namespace flashlm::gguf::detail {
namespace {

// ---- Output ------------------------------------------------------------------------------------------

// float -> bf16 bits in the low half of each 32-bit lane: round to nearest even by adding 0x7FFF plus the
// lowest kept bit, as the scalar f32_to_bf16; NaN becomes 0x7FC0 as in torch.
FLASHLM_AVX2_INLINE __m256i bf16_bits(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// 16 floats -> 16 bf16 in order. packus works within 128-bit lanes ([a0-3 b0-3 | a4-7 b4-7]); the
// permute puts the 64-bit quarters back in order.
FLASHLM_AVX2_INLINE __m256i pack_bf16(__m256 a, __m256 b) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(a), bf16_bits(b)), _MM_SHUFFLE(3, 1, 2, 0));
}

// 16 floats -> 16 halves in order. F16C with round-to-nearest-even overflows to infinity and keeps the
// top of a NaN's payload with the quiet bit set, exactly as the scalar f32_to_f16.
FLASHLM_AVX2_INLINE __m256i pack_f16(__m256 a, __m256 b) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return _mm256_set_m128i(_mm256_cvtps_ph(b, kRound), _mm256_cvtps_ph(a, kRound));
}

template <bool kStream>
FLASHLM_AVX2_INLINE void store32B(uint8_t* p, __m256i v) {
  if constexpr (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
}

// Writes the values of consecutive elements, 32 at a time, as the output dtype. kStream: non-temporal
// stores, which skip reading the destination into the cache first (a third of the memory traffic of a
// large f32 output); they need a 32-byte aligned destination, which every block of a 32-byte aligned
// output has (32 values take 64 or 128 bytes).
template <DType Out, bool kStream>
struct Sink {
  static constexpr int kValueBytes = Out == DType::F32 ? 4 : 2;
  uint8_t* p;

  FLASHLM_AVX2_INLINE void put32(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
    if constexpr (Out == DType::F32) {
      store32B<kStream>(p, _mm256_castps_si256(v0));
      store32B<kStream>(p + 32, _mm256_castps_si256(v1));
      store32B<kStream>(p + 64, _mm256_castps_si256(v2));
      store32B<kStream>(p + 96, _mm256_castps_si256(v3));
    } else if constexpr (Out == DType::F16) {
      store32B<kStream>(p, pack_f16(v0, v1));
      store32B<kStream>(p + 32, pack_f16(v2, v3));
    } else {
      store32B<kStream>(p, pack_bf16(v0, v1));
      store32B<kStream>(p + 32, pack_bf16(v2, v3));
    }
    p += 32 * kValueBytes;
  }
};

// ---- Quants --------------------------------------------------------------------------------------------

FLASHLM_AVX2_INLINE __m256i load32B(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
FLASHLM_AVX2_INLINE __m128i load16B(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// An IEEE half scale. F16C is exact for every half but sets the quiet bit of a signalling NaN; every scale
// goes through a multiply or add, which sets that bit anyway.
FLASHLM_AVX2_INLINE float load_f16(const uint8_t* p) { return _cvtsh_ss(static_cast<unsigned short>(p[0] | (p[1] << 8))); }

// Elements [8k, 8k + 8) of 32 int8 quants, as floats (int -> float is exact).
template <int k>
FLASHLM_AVX2_INLINE __m256 quants_f32(__m256i q) {
  __m128i half = k < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
  if constexpr (k % 2 == 1) half = _mm_unpackhi_epi64(half, half);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(half));
}

// The three shapes of ggml's formulas, on 32 int8 quants q[i]. Each keeps ggml's separate multiply and
// add/sub (a fused multiply-add rounds once and would differ). d0/m0 apply to elements 0..15, d1/m1 to
// 16..31 (the K-quants with 16-element sub-blocks have two scales per 32 elements).
//   y = q * d
template <class S>
FLASHLM_AVX2_INLINE void put_mul(S& out, __m256i q, __m256 d0, __m256 d1) {
  out.put32(_mm256_mul_ps(quants_f32<0>(q), d0), _mm256_mul_ps(quants_f32<1>(q), d0),
            _mm256_mul_ps(quants_f32<2>(q), d1), _mm256_mul_ps(quants_f32<3>(q), d1));
}
//   y = q * d + m
template <class S>
FLASHLM_AVX2_INLINE void put_mul_add(S& out, __m256i q, __m256 d, __m256 m) {
  out.put32(_mm256_add_ps(_mm256_mul_ps(quants_f32<0>(q), d), m), _mm256_add_ps(_mm256_mul_ps(quants_f32<1>(q), d), m),
            _mm256_add_ps(_mm256_mul_ps(quants_f32<2>(q), d), m), _mm256_add_ps(_mm256_mul_ps(quants_f32<3>(q), d), m));
}
//   y = d * q - m
template <class S>
FLASHLM_AVX2_INLINE void put_mul_sub(S& out, __m256i q, __m256 d0, __m256 m0, __m256 d1, __m256 m1) {
  out.put32(_mm256_sub_ps(_mm256_mul_ps(d0, quants_f32<0>(q)), m0), _mm256_sub_ps(_mm256_mul_ps(d0, quants_f32<1>(q)), m0),
            _mm256_sub_ps(_mm256_mul_ps(d1, quants_f32<2>(q)), m1), _mm256_sub_ps(_mm256_mul_ps(d1, quants_f32<3>(q)), m1));
}

// 16 bytes of packed nibbles -> 32 bytes: the low nibbles, then the high nibbles (the order of Q4_0,
// Q5_x and IQ4_NL, whose element j < 16 is the low nibble of qs[j] and element j + 16 its high nibble).
FLASHLM_AVX2_INLINE __m256i nibbles_lo_hi(const uint8_t* p) {
  const __m128i x = load16B(p), mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), mask), _mm_and_si128(x, mask));
}

// Bits [2s, 2s + 2) (or [4s, 4s + 4)) of each byte. Shifting 16-bit lanes is fine: the mask drops what
// crossed in from the neighbouring byte.
FLASHLM_AVX2_INLINE __m256i crumbs(__m256i x, int s) {
  return _mm256_and_si256(_mm256_srl_epi16(x, _mm_cvtsi32_si128(2 * s)), _mm256_set1_epi8(3));
}
FLASHLM_AVX2_INLINE __m256i nibbles(__m256i x, int s) {
  return _mm256_and_si256(_mm256_srl_epi16(x, _mm_cvtsi32_si128(4 * s)), _mm256_set1_epi8(0x0F));
}

// Byte i = `value` where bit `bit` of byte i of x is set, else 0.
FLASHLM_AVX2_INLINE __m256i bit_plane(__m256i x, int bit, char value) {
  const __m256i b = _mm256_set1_epi8(static_cast<char>(1 << bit));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(x, b), b), _mm256_set1_epi8(value));
}

// Byte j = `value` where bit j of `bits` is set, else 0 (Q5_0/Q5_1's fifth bits).
FLASHLM_AVX2_INLINE __m256i expand_bits(uint32_t bits, char value) {
  // Byte j picks byte j / 8 of `bits` (shuffle_epi8 indexes within each 128-bit lane; set1 fills both).
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), spread);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);  // byte j tests bit j % 8
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit), _mm256_set1_epi8(value));
}

// 8 (or 16) small integers -> floats times d: the per-sub-block scales of the K-quants, computed once per
// block exactly as the scalar path computes each (one float multiply).
FLASHLM_AVX2_INLINE void u8x8_times(const uint8_t* p, float d, float* out) {
  const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x))));
}
FLASHLM_AVX2_INLINE void i8x16_times(__m128i x, float d, float* out) {
  const __m256 vd = _mm256_set1_ps(d);
  _mm256_storeu_ps(out, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x))));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(x, x)))));
}

}  // namespace
}  // namespace flashlm::gguf::detail
