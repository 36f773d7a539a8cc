// AVX2 building blocks of the dequantization kernels (dequantize_avx2.cpp): writing 32 values as f32, f16
// or bf16 (the conversions are core/half_avx2.h's) and widening int8 quants to scaled floats; the block
// unpacking they share with the GGUF matmul is shared_unpack_avx2.h. Include only from sources compiled with
// AVX2 flags (see core/avx2.h for the rule every AVX2 header keeps).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/half_avx2.h"
#include "flashlm/core/dtype.h"
#include "shared_unpack_avx2.h"

namespace flashlm::gguf::detail {
namespace {

using core::pack_bf16;
using core::pack_f16;

// ---- Output ------------------------------------------------------------------------------------------

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
