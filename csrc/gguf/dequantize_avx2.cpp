// AVX2 dequantization: one decode function per GGML block type, each writing its block 32 values at a time
// through a Sink (dequantize_avx2_common.h) that stores f32, f16 or bf16. Bit-exact with the scalar
// kernels (dequantize_scalar.cpp, the oracle; bit layouts in shared_decoders.h): the same float32
// operations in the same order, never a fused multiply-add. Tested by tests/test_dequantize.py (AVX2 vs
// scalar vs gguf-py). Compiled with -mavx2 -mfma -mf16c and called only after a run-time CPU check; see
// the header of dequantize_avx2_common.h for what this file must not use.
#include <cstring>

#include "dequantize_avx2_common.h"
#include "shared_decoders.h"
#include "dequantize_kernels.h"

namespace flashlm::gguf::detail {
namespace {

// Each decoder: kBlock elements in kBytes bytes; decode(b, out) writes block b's elements in order.

struct DecodeQ4_0 {  // y = (q - 8) * d
  static constexpr int kBlock = QK4_0, kBytes = sizeof(block_q4_0);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const __m256 d = _mm256_set1_ps(load_f16(b + offsetof(block_q4_0, d)));
    const __m256i q = _mm256_sub_epi8(nibbles_lo_hi(b + offsetof(block_q4_0, qs)), _mm256_set1_epi8(8));
    put_mul(out, q, d, d);
  }
};

struct DecodeQ4_1 {  // y = q * d + m
  static constexpr int kBlock = QK4_1, kBytes = sizeof(block_q4_1);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const __m256 d = _mm256_set1_ps(load_f16(b + offsetof(block_q4_1, d)));
    const __m256 m = _mm256_set1_ps(load_f16(b + offsetof(block_q4_1, m)));
    put_mul_add(out, nibbles_lo_hi(b + offsetof(block_q4_1, qs)), d, m);
  }
};

struct DecodeQ5_0 {  // y = (q - 16) * d, bit 4 of element j is bit j of qh
  static constexpr int kBlock = QK5_0, kBytes = sizeof(block_q5_0);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const __m256 d = _mm256_set1_ps(load_f16(b + offsetof(block_q5_0, d)));
    const __m256i high = expand_bits(ld_u32(b + offsetof(block_q5_0, qh)), 0x10);
    const __m256i q = _mm256_or_si256(nibbles_lo_hi(b + offsetof(block_q5_0, qs)), high);
    put_mul(out, _mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d);
  }
};

struct DecodeQ5_1 {  // y = q * d + m
  static constexpr int kBlock = QK5_1, kBytes = sizeof(block_q5_1);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const __m256 d = _mm256_set1_ps(load_f16(b + offsetof(block_q5_1, d)));
    const __m256 m = _mm256_set1_ps(load_f16(b + offsetof(block_q5_1, m)));
    const __m256i high = expand_bits(ld_u32(b + offsetof(block_q5_1, qh)), 0x10);
    put_mul_add(out, _mm256_or_si256(nibbles_lo_hi(b + offsetof(block_q5_1, qs)), high), d, m);
  }
};

struct DecodeQ8_0 {  // y = q * d
  static constexpr int kBlock = QK8_0, kBytes = sizeof(block_q8_0);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const __m256 d = _mm256_set1_ps(load_f16(b + offsetof(block_q8_0, d)));
    put_mul(out, load32B(b + offsetof(block_q8_0, qs)), d, d);
  }
};

// Q2_K: 16 sub-blocks of 16, y = (d * (sc & 15)) * q - dmin * (sc >> 4). The 32 elements of group g
// (e / 32) are the 2-bit fields at bits 2 * (g % 4) of qs[32 * (g / 4) + l].
struct DecodeQ2_K {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q2_K);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const float d = load_f16(b + offsetof(block_q2_K, d)), dmin = load_f16(b + offsetof(block_q2_K, dmin));
    const __m128i sc = load16B(b + offsetof(block_q2_K, scales)), low4 = _mm_set1_epi8(0x0F);
    alignas(32) float dl[16], ml[16];
    i8x16_times(_mm_and_si128(sc, low4), d, dl);
    i8x16_times(_mm_and_si128(_mm_srli_epi16(sc, 4), low4), dmin, ml);
    for (int h = 0; h < 2; ++h) {
      const __m256i qs = load32B(b + offsetof(block_q2_K, qs) + 32 * h);
      for (int t = 0; t < 4; ++t) {
        const int s = 8 * h + 2 * t;  // the sub-blocks of elements 32g .. 32g + 31, g = 4h + t
        put_mul_sub(out, crumbs(qs, t), _mm256_set1_ps(dl[s]), _mm256_set1_ps(ml[s]), _mm256_set1_ps(dl[s + 1]),
                    _mm256_set1_ps(ml[s + 1]));
      }
    }
  }
};

// Q3_K: the low 2 bits as Q2_K; the high bit of element e is bit e / 32 of hmask[e % 32] and, when
// clear, subtracts 4. y = (d * (scale - 32)) * q with 16 6-bit scales.
struct DecodeQ3_K {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q3_K);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const float d = load_f16(b + offsetof(block_q3_K, d));
    // The 16 scales, as ggml unpacks them: low nibbles from bytes 0..7 (low halves, then high halves),
    // 2 high bits from bytes 8..11 (scale s uses bits 2 * (s / 4) of byte 8 + s % 4).
    uint32_t a[4];
    std::memcpy(a, b + offsetof(block_q3_K, scales), 12);
    const uint32_t hi = a[2], m4 = 0x0F0F0F0F, m2 = 0x03030303;
    a[2] = ((a[0] >> 4) & m4) | (((hi >> 4) & m2) << 4);
    a[3] = ((a[1] >> 4) & m4) | (((hi >> 6) & m2) << 4);
    a[0] = (a[0] & m4) | ((hi & m2) << 4);
    a[1] = (a[1] & m4) | (((hi >> 2) & m2) << 4);
    alignas(32) float dl[16];
    i8x16_times(_mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)), _mm_set1_epi8(32)), d, dl);

    const __m256i hmask = load32B(b + offsetof(block_q3_K, hmask)), four = _mm256_set1_epi8(4);
    for (int h = 0; h < 2; ++h) {
      const __m256i qs = load32B(b + offsetof(block_q3_K, qs) + 32 * h);
      for (int t = 0; t < 4; ++t) {
        const int g = 4 * h + t;
        const __m256i minus4 = _mm256_andnot_si256(bit_plane(hmask, g, 4), four);  // 4 where the bit is clear
        put_mul(out, _mm256_sub_epi8(crumbs(qs, t), minus4), _mm256_set1_ps(dl[2 * g]), _mm256_set1_ps(dl[2 * g + 1]));
      }
    }
  }
};

// Q4_K/Q5_K: the 8 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4), unpacked to
// d * sc and dmin * m for the 8 sub-blocks of 32.
FLASHLM_AVX2_INLINE void k4_scales(const uint8_t* scales, float d, float dmin, float* d1, float* m1) {
  uint32_t a[4];
  std::memcpy(a, scales, 12);
  const uint32_t m6 = 0x3F3F3F3F, m4 = 0x0F0F0F0F, m2 = 0x03030303;
  const uint32_t sc_hi = (a[2] & m4) | (((a[0] >> 6) & m2) << 4);  // sub-blocks 4..7
  const uint32_t min_hi = ((a[2] >> 4) & m4) | (((a[1] >> 6) & m2) << 4);
  const uint32_t packed[4] = {a[0] & m6, sc_hi, a[1] & m6, min_hi};  // 8 scales, then 8 mins
  const auto* bytes = reinterpret_cast<const uint8_t*>(packed);
  u8x8_times(bytes, d, d1);
  u8x8_times(bytes + 8, dmin, m1);
}

// Q4_K: sub-block j (elements 32j .. 32j + 31) is nibble j % 2 of qs[32 * (j / 2) + l];
// y = (d * sc) * q - dmin * m.
struct DecodeQ4_K {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q4_K);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    alignas(32) float d1[8], m1[8];
    k4_scales(b + offsetof(block_q4_K, scales), load_f16(b + offsetof(block_q4_K, d)),
              load_f16(b + offsetof(block_q4_K, dmin)), d1, m1);
    for (int j = 0; j < 8; ++j) {
      const __m256i q = nibbles(load32B(b + offsetof(block_q4_K, qs) + 32 * (j / 2)), j % 2);
      const __m256 d = _mm256_set1_ps(d1[j]), m = _mm256_set1_ps(m1[j]);
      put_mul_sub(out, q, d, m, d, m);
    }
  }
};

// Q5_K: Q4_K plus bit j of qh[l] as the fifth bit of sub-block j.
struct DecodeQ5_K {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q5_K);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    alignas(32) float d1[8], m1[8];
    k4_scales(b + offsetof(block_q5_K, scales), load_f16(b + offsetof(block_q5_K, d)),
              load_f16(b + offsetof(block_q5_K, dmin)), d1, m1);
    const __m256i qh = load32B(b + offsetof(block_q5_K, qh));
    for (int j = 0; j < 8; ++j) {
      const __m256i low = nibbles(load32B(b + offsetof(block_q5_K, qs) + 32 * (j / 2)), j % 2);
      const __m256 d = _mm256_set1_ps(d1[j]), m = _mm256_set1_ps(m1[j]);
      put_mul_sub(out, _mm256_or_si256(low, bit_plane(qh, j, 0x10)), d, m, d, m);
    }
  }
};

// Q6_K: in half h, quarter t: the low nibble t / 2 of ql[64h + 32(t % 2) + l] and the 2 bits at 2t of
// qh[32h + l], minus 32; y = (d * scale) * q with 16 int8 scales.
struct DecodeQ6_K {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q6_K);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    alignas(32) float ds[16];
    i8x16_times(load16B(b + offsetof(block_q6_K, scales)), load_f16(b + offsetof(block_q6_K, d)), ds);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = b + offsetof(block_q6_K, ql) + 64 * h;
      const __m256i qh = load32B(b + offsetof(block_q6_K, qh) + 32 * h);
      for (int t = 0; t < 4; ++t) {
        const __m256i high = _mm256_slli_epi16(crumbs(qh, t), 4);  // bits 4..5; the mask left each byte < 4
        const __m256i q = _mm256_or_si256(nibbles(load32B(ql + 32 * (t % 2)), t / 2), high);
        const int s = 8 * h + 2 * t;
        put_mul(out, _mm256_sub_epi8(q, _mm256_set1_epi8(32)), _mm256_set1_ps(ds[s]), _mm256_set1_ps(ds[s + 1]));
      }
    }
  }
};

struct DecodeQ8_K {  // y = d * q with a float32 d
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_q8_K);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    float d;
    std::memcpy(&d, b + offsetof(block_q8_K, d), 4);
    const __m256 vd = _mm256_set1_ps(d);
    for (int g = 0; g < 8; ++g) put_mul(out, load32B(b + offsetof(block_q8_K, qs) + 32 * g), vd, vd);
  }
};

// IQ4_NL/IQ4_XS: 16 bytes of nibbles (IQ4_NL's order) -> the 32 int8 levels of kvalues_iq4nl.
FLASHLM_AVX2_INLINE __m256i iq4nl_levels(const uint8_t* p) {
  const __m256i table = _mm256_broadcastsi128_si256(load16B(reinterpret_cast<const uint8_t*>(kvalues_iq4nl)));
  return _mm256_shuffle_epi8(table, nibbles_lo_hi(p));
}

struct DecodeIQ4_NL {  // y = d * level
  static constexpr int kBlock = QK4_NL, kBytes = sizeof(block_iq4_nl);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const __m256 d = _mm256_set1_ps(load_f16(b + offsetof(block_iq4_nl, d)));
    put_mul(out, iq4nl_levels(b + offsetof(block_iq4_nl, qs)), d, d);
  }
};

// IQ4_XS: 8 sub-blocks of 32, each an IQ4_NL block's quants with a 6-bit scale (low nibble in
// scales_l, 2 high bits in scales_h); y = (d * (ls - 32)) * level.
struct DecodeIQ4_XS {
  static constexpr int kBlock = QK_K, kBytes = sizeof(block_iq4_xs);
  template <class S>
  FLASHLM_AVX2_INLINE static void decode(const uint8_t* b, S& out) {
    const float d = load_f16(b + offsetof(block_iq4_xs, d));
    const uint32_t scales_h = ld_u16(b + offsetof(block_iq4_xs, scales_h));
    const uint8_t* scales_l = b + offsetof(block_iq4_xs, scales_l);
    for (int j = 0; j < 8; ++j) {
      const uint32_t ls = ((scales_l[j / 2] >> (4 * (j % 2))) & 0xF) | (((scales_h >> (2 * j)) & 3) << 4);
      const __m256 dl = _mm256_set1_ps(d * static_cast<float>(static_cast<int>(ls) - 32));
      put_mul(out, iq4nl_levels(b + offsetof(block_iq4_xs, qs) + 16 * j), dl, dl);
    }
  }
};

template <class D, DType Out, bool kStream>
void decode_blocks(const uint8_t* src, int64_t begin, int64_t end, void* dst) {
  Sink<Out, kStream> out{static_cast<uint8_t*>(dst) + begin * D::kBlock * Sink<Out, kStream>::kValueBytes};
  for (int64_t i = begin; i < end; ++i) D::decode(src + i * D::kBytes, out);
}

template <class D>
bool decode(const uint8_t* src, int64_t begin, int64_t end, void* dst, DType out, bool stream) {
  switch (out) {
    case DType::F32:
      (stream ? decode_blocks<D, DType::F32, true> : decode_blocks<D, DType::F32, false>)(src, begin, end, dst);
      return true;
    case DType::F16:
      (stream ? decode_blocks<D, DType::F16, true> : decode_blocks<D, DType::F16, false>)(src, begin, end, dst);
      return true;
    case DType::BF16:
      (stream ? decode_blocks<D, DType::BF16, true> : decode_blocks<D, DType::BF16, false>)(src, begin, end, dst);
      return true;
    default:
      return false;
  }
}

// ---- F32 / F16 / BF16 sources: one element per "block" --------------------------------------------------

// 8 halves -> floats. F16C sets the quiet bit of a signalling NaN; the scalar path keeps every NaN's bits,
// so infinities and NaNs are rebuilt from the bits.
FLASHLM_AVX2_INLINE __m256 widen_f16(__m128i h8) {
  const __m256i h = _mm256_cvtepu16_epi32(h8), exp_mask = _mm256_set1_epi32(0x7C00);
  const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(h, exp_mask), exp_mask);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16);
  const __m256i mant = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x3FF)), 13);
  const __m256i bits = _mm256_or_si256(_mm256_or_si256(sign, mant), _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_ps(_mm256_cvtph_ps(h8), _mm256_castsi256_ps(bits), _mm256_castsi256_ps(special));
}

template <DType In>
FLASHLM_AVX2_INLINE __m256 load8(const uint8_t* p) {
  if constexpr (In == DType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (In == DType::F16) {
    return widen_f16(load16B(p));
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load16B(p)), 16));
  }
}

// Elements [begin, end) of a plain source, 32 at a time; the last < 32 go to the scalar kernel (a call into
// dequantize_scalar.cpp, compiled without AVX2). Plain stores only: a range may start anywhere, and these
// conversions are not the hot path.
template <DType In, DType Out>
void convert(const uint8_t* src, int64_t begin, int64_t end, void* dst) {
  constexpr int kIn = In == DType::F32 ? 4 : 2, kOut = Out == DType::F32 ? 4 : 2;
  Sink<Out, false> out{static_cast<uint8_t*>(dst) + begin * kOut};
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    const uint8_t* p = src + i * kIn;
    out.put32(load8<In>(p), load8<In>(p + 8 * kIn), load8<In>(p + 16 * kIn), load8<In>(p + 24 * kIn));
  }
  if (i < end) dequantize_scalar(In, src, i, end, dst, Out);
}

template <DType In>
bool convert_from(const uint8_t* src, int64_t begin, int64_t end, void* dst, DType out) {
  if (out == In) {  // same type: a copy (glibc's memcpy streams large ones itself)
    constexpr int kBytes = In == DType::F32 ? 4 : 2;
    std::memcpy(static_cast<uint8_t*>(dst) + begin * kBytes, src + begin * kBytes, (end - begin) * kBytes);
    return true;
  }
  switch (out) {
    case DType::F32: convert<In, DType::F32>(src, begin, end, dst); return true;
    case DType::F16: convert<In, DType::F16>(src, begin, end, dst); return true;
    case DType::BF16: convert<In, DType::BF16>(src, begin, end, dst); return true;
    default: return false;
  }
}

bool dispatch(DType type, const uint8_t* src, int64_t begin, int64_t end, void* dst, DType out, bool stream) {
  switch (type) {
    case DType::F32: return convert_from<DType::F32>(src, begin, end, dst, out);
    case DType::F16: return convert_from<DType::F16>(src, begin, end, dst, out);
    case DType::BF16: return convert_from<DType::BF16>(src, begin, end, dst, out);
    case DType::Q4_0: return decode<DecodeQ4_0>(src, begin, end, dst, out, stream);
    case DType::Q4_1: return decode<DecodeQ4_1>(src, begin, end, dst, out, stream);
    case DType::Q5_0: return decode<DecodeQ5_0>(src, begin, end, dst, out, stream);
    case DType::Q5_1: return decode<DecodeQ5_1>(src, begin, end, dst, out, stream);
    case DType::Q8_0: return decode<DecodeQ8_0>(src, begin, end, dst, out, stream);
    case DType::Q2_K: return decode<DecodeQ2_K>(src, begin, end, dst, out, stream);
    case DType::Q3_K: return decode<DecodeQ3_K>(src, begin, end, dst, out, stream);
    case DType::Q4_K: return decode<DecodeQ4_K>(src, begin, end, dst, out, stream);
    case DType::Q5_K: return decode<DecodeQ5_K>(src, begin, end, dst, out, stream);
    case DType::Q6_K: return decode<DecodeQ6_K>(src, begin, end, dst, out, stream);
    case DType::Q8_K: return decode<DecodeQ8_K>(src, begin, end, dst, out, stream);
    case DType::IQ4_NL: return decode<DecodeIQ4_NL>(src, begin, end, dst, out, stream);
    case DType::IQ4_XS: return decode<DecodeIQ4_XS>(src, begin, end, dst, out, stream);
    default: return false;
  }
}

}  // namespace

bool dequantize_avx2(DType type, const uint8_t* src, int64_t begin, int64_t end, void* dst, DType out,
                     bool nontemporal) {
  const bool stream = nontemporal && reinterpret_cast<uintptr_t>(dst) % 32 == 0;
  const bool done = dispatch(type, src, begin, end, dst, out, stream);
  // Streaming stores are weakly ordered: make them visible before the thread pool reports the range done.
  if (stream) _mm_sfence();
  return done;
}

}  // namespace flashlm::gguf::detail
