// Per-type block decoders, shared by the scalar CPU kernels and the CUDA kernels of gguf/ (dequantization)
// and gemm/ (GGUF matmul) so that ggml's bit layout is written down once. `Decoder<T>::chunk8(block, c, y)`
// writes elements [8c, 8c + 8) of one block as float32, computed in exactly ggml's order of operations (a
// separate multiply and add/sub, never a fused multiply-add, which would round differently): this is what
// makes the output bit-exact.
// Reference: ggml-quants.c dequantize_row_* and gguf-py's quants.py.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../core/half.h"
#include "flashlm/core/dtype.h"
#include "flashlm/gguf/blocks.h"

namespace flashlm::gguf::detail {

using core::bf16_to_f32;
using core::bits_to_f32;
using core::f16_to_f32;
using core::f32_to_bf16;
using core::f32_to_f16;
using core::ld_u16;
using core::ld_u32;

// A small integer (|q| < 2^22) as a float, exactly. On the GPU the I2F conversion runs on the narrow
// conversion pipe, which the dequantization kernels would otherwise saturate; adding q to the bits of
// 1.5 * 2^23 and subtracting 1.5 * 2^23 again is two full-rate instructions with the same result.
FLASHLM_HD float i2f(int q) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(__int_as_float(0x4B400000 + q), 12582912.0f);
#else
  return static_cast<float>(q);
#endif
}

// Multiply, then add: kept apart so no compiler fuses them (CUDA contracts a*b+c by default).
FLASHLM_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FLASHLM_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FLASHLM_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Q4_K/Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4).
FLASHLM_HD void scale_min_k4(int j, const uint8_t* q, uint32_t* sc, uint32_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// kvalues_iq4nl[q], packed into two words so device code can use it without a __constant__ table.
FLASHLM_HD int iq4nl_value(uint32_t q) {
  constexpr uint64_t kLow = 0xF6EADDCFBFAD9881ull, kHigh = 0x7159453526190D01ull;
  uint64_t w = q < 8 ? kLow : kHigh;
  return static_cast<int8_t>(static_cast<uint8_t>(w >> (8 * (q & 7))));
}

template <DType T>
struct Decoder;

#define FLASHLM_DECODER_SIZES(block_t, n)            \
  static constexpr int kBlock = n;                   \
  static constexpr int kBytes = sizeof(block_t);     \
  static constexpr int kChunks = n / 8;

template <>
struct Decoder<DType::Q4_0> {
  FLASHLM_DECODER_SIZES(block_q4_0, QK4_0)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q4_0, d)));
    const uint8_t* qs = b + offsetof(block_q4_0, qs) + (c & 1) * 8;
    int shift = (c >> 1) * 4;
    for (int k = 0; k < 8; ++k) y[k] = mul(i2f(int((qs[k] >> shift) & 0xF) - 8), d);
  }
};

template <>
struct Decoder<DType::Q4_1> {
  FLASHLM_DECODER_SIZES(block_q4_1, QK4_1)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q4_1, d)));
    float m = f16_to_f32(ld_u16(b + offsetof(block_q4_1, m)));
    const uint8_t* qs = b + offsetof(block_q4_1, qs) + (c & 1) * 8;
    int shift = (c >> 1) * 4;
    for (int k = 0; k < 8; ++k) y[k] = add(mul(i2f((qs[k] >> shift) & 0xF), d), m);
  }
};

template <>
struct Decoder<DType::Q5_0> {
  FLASHLM_DECODER_SIZES(block_q5_0, QK5_0)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q5_0, d)));
    uint32_t qh = ld_u32(b + offsetof(block_q5_0, qh));
    const uint8_t* qs = b + offsetof(block_q5_0, qs) + (c & 1) * 8;
    int shift = (c >> 1) * 4;
    for (int k = 0; k < 8; ++k) {
      int j = 8 * c + k;
      int q = ((qs[k] >> shift) & 0xF) | (((qh >> j) & 1) << 4);
      y[k] = mul(i2f(q - 16), d);
    }
  }
};

template <>
struct Decoder<DType::Q5_1> {
  FLASHLM_DECODER_SIZES(block_q5_1, QK5_1)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q5_1, d)));
    float m = f16_to_f32(ld_u16(b + offsetof(block_q5_1, m)));
    uint32_t qh = ld_u32(b + offsetof(block_q5_1, qh));
    const uint8_t* qs = b + offsetof(block_q5_1, qs) + (c & 1) * 8;
    int shift = (c >> 1) * 4;
    for (int k = 0; k < 8; ++k) {
      int j = 8 * c + k;
      int q = ((qs[k] >> shift) & 0xF) | (((qh >> j) & 1) << 4);
      y[k] = add(mul(i2f(q), d), m);
    }
  }
};

template <>
struct Decoder<DType::Q8_0> {
  FLASHLM_DECODER_SIZES(block_q8_0, QK8_0)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q8_0, d)));
    const uint8_t* qs = b + offsetof(block_q8_0, qs) + 8 * c;
    for (int k = 0; k < 8; ++k) y[k] = mul(i2f(static_cast<int8_t>(qs[k])), d);
  }
};

// Q2_K: element e sits in qs[32 * (e / 128) + e % 32] at bits 2 * ((e % 128) / 32); scales[e / 16].
template <>
struct Decoder<DType::Q2_K> {
  FLASHLM_DECODER_SIZES(block_q2_K, QK_K)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q2_K, d)));
    float dmin = f16_to_f32(ld_u16(b + offsetof(block_q2_K, dmin)));
    int e = 8 * c;
    uint32_t sc = b[offsetof(block_q2_K, scales) + e / 16];
    float dl = mul(d, i2f(sc & 0xF)), ml = mul(dmin, i2f(sc >> 4));
    const uint8_t* q = b + offsetof(block_q2_K, qs) + 32 * (e / 128) + e % 32;
    int shift = 2 * ((e % 128) / 32);
    for (int k = 0; k < 8; ++k) y[k] = sub(mul(dl, i2f((q[k] >> shift) & 3)), ml);
  }
};

// Q3_K: low 2 bits as Q2_K; the high bit of element e is bit e / 32 of hmask[e % 32] and, when clear,
// subtracts 4. The 16 6-bit scales: low nibbles in scales[0..7] (both halves), high pairs in scales[8..11].
template <>
struct Decoder<DType::Q3_K> {
  FLASHLM_DECODER_SIZES(block_q3_K, QK_K)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d_all = f16_to_f32(ld_u16(b + offsetof(block_q3_K, d)));
    const uint8_t* scales = b + offsetof(block_q3_K, scales);
    int e = 8 * c, s = e / 16;
    uint32_t lo = s < 8 ? scales[s] & 0xF : scales[s - 8] >> 4;
    uint32_t hi = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    float dl = mul(d_all, i2f(int(lo | (hi << 4)) - 32));
    const uint8_t* q = b + offsetof(block_q3_K, qs) + 32 * (e / 128) + e % 32;
    const uint8_t* hm = b + offsetof(block_q3_K, hmask) + e % 32;
    int shift = 2 * ((e % 128) / 32), hbit = e / 32;
    for (int k = 0; k < 8; ++k) {
      int v = int((q[k] >> shift) & 3) - (((hm[k] >> hbit) & 1) ? 0 : 4);
      y[k] = mul(dl, i2f(v));
    }
  }
};

// Q4_K: sub-block j = e / 32 reads nibble j % 2 of qs[32 * (j / 2) + e % 32].
template <>
struct Decoder<DType::Q4_K> {
  FLASHLM_DECODER_SIZES(block_q4_K, QK_K)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q4_K, d)));
    float dmin = f16_to_f32(ld_u16(b + offsetof(block_q4_K, dmin)));
    int e = 8 * c, j = e / 32;
    uint32_t sc, m;
    scale_min_k4(j, b + offsetof(block_q4_K, scales), &sc, &m);
    float d1 = mul(d, i2f(sc)), m1 = mul(dmin, i2f(m));
    const uint8_t* q = b + offsetof(block_q4_K, qs) + 32 * (j / 2) + e % 32;
    int shift = 4 * (j % 2);
    for (int k = 0; k < 8; ++k) y[k] = sub(mul(d1, i2f((q[k] >> shift) & 0xF)), m1);
  }
};

// Q5_K: Q4_K plus bit j = e / 32 of qh[e % 32] as the fifth bit.
template <>
struct Decoder<DType::Q5_K> {
  FLASHLM_DECODER_SIZES(block_q5_K, QK_K)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q5_K, d)));
    float dmin = f16_to_f32(ld_u16(b + offsetof(block_q5_K, dmin)));
    int e = 8 * c, j = e / 32;
    uint32_t sc, m;
    scale_min_k4(j, b + offsetof(block_q5_K, scales), &sc, &m);
    float d1 = mul(d, i2f(sc)), m1 = mul(dmin, i2f(m));
    const uint8_t* q = b + offsetof(block_q5_K, qs) + 32 * (j / 2) + e % 32;
    const uint8_t* qh = b + offsetof(block_q5_K, qh) + e % 32;
    int shift = 4 * (j % 2);
    for (int k = 0; k < 8; ++k) {
      uint32_t v = ((q[k] >> shift) & 0xF) | (((qh[k] >> j) & 1) << 4);
      y[k] = sub(mul(d1, i2f(v)), m1);
    }
  }
};

// Q6_K: in half h = e / 128, quarter t = (e % 128) / 32, l = e % 32: the low nibble t / 2 of
// ql[64h + 32(t % 2) + l], the 2 high bits at 2t of qh[32h + l]; scale scales[e / 16]; value - 32.
template <>
struct Decoder<DType::Q6_K> {
  FLASHLM_DECODER_SIZES(block_q6_K, QK_K)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_q6_K, d)));
    int e = 8 * c, h = e / 128, t = (e % 128) / 32, l = e % 32;
    float ds = mul(d, i2f(static_cast<int8_t>(b[offsetof(block_q6_K, scales) + e / 16])));
    const uint8_t* ql = b + offsetof(block_q6_K, ql) + 64 * h + 32 * (t % 2) + l;
    const uint8_t* qh = b + offsetof(block_q6_K, qh) + 32 * h + l;
    int lshift = 4 * (t / 2), hshift = 2 * t;
    for (int k = 0; k < 8; ++k) {
      int v = int(((ql[k] >> lshift) & 0xF) | (((qh[k] >> hshift) & 3) << 4)) - 32;
      y[k] = mul(ds, i2f(v));
    }
  }
};

template <>
struct Decoder<DType::Q8_K> {
  FLASHLM_DECODER_SIZES(block_q8_K, QK_K)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = bits_to_f32(ld_u32(b + offsetof(block_q8_K, d)));
    const uint8_t* qs = b + offsetof(block_q8_K, qs) + 8 * c;
    for (int k = 0; k < 8; ++k) y[k] = mul(d, i2f(static_cast<int8_t>(qs[k])));
  }
};

template <>
struct Decoder<DType::IQ4_NL> {
  FLASHLM_DECODER_SIZES(block_iq4_nl, QK4_NL)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_iq4_nl, d)));
    const uint8_t* qs = b + offsetof(block_iq4_nl, qs) + (c & 1) * 8;
    int shift = (c >> 1) * 4;
    for (int k = 0; k < 8; ++k) y[k] = mul(d, i2f(iq4nl_value((qs[k] >> shift) & 0xF)));
  }
};

// IQ4_XS: sub-block j = e / 32 has a 6-bit scale (low nibble in scales_l, 2 high bits in scales_h) and
// its 32 elements laid out as one IQ4_NL block's quants at qs[16 j].
template <>
struct Decoder<DType::IQ4_XS> {
  FLASHLM_DECODER_SIZES(block_iq4_xs, QK_K)
  FLASHLM_HD void chunk8(const uint8_t* b, int c, float* y) {
    float d = f16_to_f32(ld_u16(b + offsetof(block_iq4_xs, d)));
    uint32_t scales_h = ld_u16(b + offsetof(block_iq4_xs, scales_h));
    int j = c / 4, cc = c % 4;
    uint32_t ls = ((b[offsetof(block_iq4_xs, scales_l) + j / 2] >> (4 * (j % 2))) & 0xF) | (((scales_h >> (2 * j)) & 3) << 4);
    float dl = mul(d, i2f(int(ls) - 32));
    const uint8_t* qs = b + offsetof(block_iq4_xs, qs) + 16 * j + (cc & 1) * 8;
    int shift = (cc >> 1) * 4;
    for (int k = 0; k < 8; ++k) y[k] = mul(dl, i2f(iq4nl_value((qs[k] >> shift) & 0xF)));
  }
};

#undef FLASHLM_DECODER_SIZES

// Calls f(Decoder<T>{}) for a block type with a decoder; returns false for any other type. The one place
// a run-time dtype becomes a template argument.
template <class F>
bool dispatch_block_type(DType t, F&& f) {
  switch (t) {
    case DType::Q4_0: f(Decoder<DType::Q4_0>{}); return true;
    case DType::Q4_1: f(Decoder<DType::Q4_1>{}); return true;
    case DType::Q5_0: f(Decoder<DType::Q5_0>{}); return true;
    case DType::Q5_1: f(Decoder<DType::Q5_1>{}); return true;
    case DType::Q8_0: f(Decoder<DType::Q8_0>{}); return true;
    case DType::Q2_K: f(Decoder<DType::Q2_K>{}); return true;
    case DType::Q3_K: f(Decoder<DType::Q3_K>{}); return true;
    case DType::Q4_K: f(Decoder<DType::Q4_K>{}); return true;
    case DType::Q5_K: f(Decoder<DType::Q5_K>{}); return true;
    case DType::Q6_K: f(Decoder<DType::Q6_K>{}); return true;
    case DType::Q8_K: f(Decoder<DType::Q8_K>{}); return true;
    case DType::IQ4_NL: f(Decoder<DType::IQ4_NL>{}); return true;
    case DType::IQ4_XS: f(Decoder<DType::IQ4_XS>{}); return true;
    default: return false;
  }
}

}  // namespace flashlm::gguf::detail
