// GGML quantization blocks, defined once for the CPU and CUDA code. Layouts are ggml's (ggml-common.h),
// bit for bit; each struct's size is checked against ggml's. Scales stored as IEEE half are held as
// uint16_t bit patterns (`half`) so the header needs neither cuda_fp16.h nor a host half type.
//
// Element order inside a block, as ggml lays it out:
//   Q4_0/Q4_1/IQ4_NL  element j < 16 is the low nibble of qs[j], element j + 16 the high nibble.
//   Q5_0/Q5_1         as Q4_x for the low 4 bits; bit 4 of element j is bit j of qh.
//   Q8_0/Q8_K         element j is qs[j].
//   K-quants          256 elements in sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K) elements,
//                     each with its own scale; see csrc/gguf/shared_decoders.h for the bit positions.
#pragma once

#include <cstdint>

namespace flashlm::gguf {

using half = uint16_t;  // IEEE binary16 bits

constexpr int QK4_0 = 32, QK4_1 = 32, QK5_0 = 32, QK5_1 = 32, QK8_0 = 32, QK8_1 = 32, QK4_NL = 32;
constexpr int QK_K = 256;
constexpr int K_SCALE_SIZE = 12;

struct block_q4_0 {
  half d;                // scale
  uint8_t qs[QK4_0 / 2];  // 4-bit quants, value = d * (q - 8)
};
static_assert(sizeof(block_q4_0) == 2 + QK4_0 / 2, "block_q4_0 size");

struct block_q4_1 {
  half d, m;             // scale, minimum: value = d * q + m
  uint8_t qs[QK4_1 / 2];
};
static_assert(sizeof(block_q4_1) == 4 + QK4_1 / 2, "block_q4_1 size");

struct block_q5_0 {
  half d;
  uint8_t qh[4];         // 5th bit of each quant, value = d * (q - 16)
  uint8_t qs[QK5_0 / 2];
};
static_assert(sizeof(block_q5_0) == 2 + 4 + QK5_0 / 2, "block_q5_0 size");

struct block_q5_1 {
  half d, m;
  uint8_t qh[4];
  uint8_t qs[QK5_1 / 2];
};
static_assert(sizeof(block_q5_1) == 4 + 4 + QK5_1 / 2, "block_q5_1 size");

struct block_q8_0 {
  half d;
  int8_t qs[QK8_0];
};
static_assert(sizeof(block_q8_0) == 2 + QK8_0, "block_q8_0 size");

struct block_q8_1 {
  half d, s;             // scale, d * sum(qs)
  int8_t qs[QK8_1];
};
static_assert(sizeof(block_q8_1) == 4 + QK8_1, "block_q8_1 size");

// 2-bit: 16 sub-blocks of 16; value = d * (scales & 0xF) * q - dmin * (scales >> 4)
struct block_q2_K {
  uint8_t scales[QK_K / 16];
  uint8_t qs[QK_K / 4];
  half d, dmin;
};
static_assert(sizeof(block_q2_K) == 2 * 2 + QK_K / 16 + QK_K / 4, "block_q2_K size");

// 3-bit: 16 sub-blocks of 16 with 6-bit signed scales; value = d * (scale - 32) * (q - 4 * !hbit)
struct block_q3_K {
  uint8_t hmask[QK_K / 8];
  uint8_t qs[QK_K / 4];
  uint8_t scales[12];
  half d;
};
static_assert(sizeof(block_q3_K) == 2 + QK_K / 4 + QK_K / 8 + 12, "block_q3_K size");

// 4-bit: 8 sub-blocks of 32 with 6-bit scales and mins; value = d * sc * q - dmin * m
struct block_q4_K {
  half d, dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q4_K) == 2 * 2 + K_SCALE_SIZE + QK_K / 2, "block_q4_K size");

// 5-bit: as Q4_K plus a high bit per element
struct block_q5_K {
  half d, dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qh[QK_K / 8];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q5_K) == 2 * 2 + K_SCALE_SIZE + QK_K / 2 + QK_K / 8, "block_q5_K size");

// 6-bit: 16 sub-blocks of 16 with 8-bit signed scales; value = d * scale * (q - 32)
struct block_q6_K {
  uint8_t ql[QK_K / 2];
  uint8_t qh[QK_K / 4];
  int8_t scales[QK_K / 16];
  half d;
};
static_assert(sizeof(block_q6_K) == 2 + QK_K / 16 + 3 * QK_K / 4, "block_q6_K size");

// 8-bit intermediate of the K-quant dot products; d is a float, bsums are sums of groups of 16
struct block_q8_K {
  float d;
  int8_t qs[QK_K];
  int16_t bsums[QK_K / 16];
};
static_assert(sizeof(block_q8_K) == 4 + QK_K + QK_K / 16 * 2, "block_q8_K size");

// 4-bit non-linear: value = d * kvalues_iq4nl[q]
struct block_iq4_nl {
  half d;
  uint8_t qs[QK4_NL / 2];
};
static_assert(sizeof(block_iq4_nl) == 2 + QK4_NL / 2, "block_iq4_nl size");

// 4-bit non-linear, 8 sub-blocks of 32 with 6-bit scales; value = d * (ls - 32) * kvalues_iq4nl[q]
struct block_iq4_xs {
  half d;
  uint16_t scales_h;
  uint8_t scales_l[QK_K / 64];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_iq4_xs) == 2 + 2 + QK_K / 64 + QK_K / 2, "block_iq4_xs size");

// The 16 levels of IQ4_NL and IQ4_XS.
constexpr int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

}  // namespace flashlm::gguf
