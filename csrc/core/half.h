// 16-bit floats on the host and the device: IEEE half and bfloat16 to and from float32, bit for bit as
// torch and F16C round (to nearest even), and the unaligned little-endian loads that read them out of packed
// data (GGML blocks have no padding, and a caller's buffer may start anywhere).
//
// These are the scalar conversions every CPU kernel uses for bf16/f16 tensors, and the reference the AVX2
// versions (half_avx2.h) and the CUDA intrinsics are held to.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define FLASHLM_HD __host__ __device__ static __forceinline__
#else
#define FLASHLM_HD static inline
#endif

namespace flashlm::core {

FLASHLM_HD uint32_t ld_u16(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8); }
FLASHLM_HD uint32_t ld_u32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

FLASHLM_HD float bits_to_f32(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

FLASHLM_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
#endif
}

// IEEE half -> float, exact for every input (subnormals, infinities, NaN payloads).
FLASHLM_HD float f16_to_f32(uint32_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return bits_to_f32(f32_to_bits(v) | sign);
  }
  if (exp == 31) return bits_to_f32(sign | 0x7F800000u | (mant << 13));
  return bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

FLASHLM_HD float bf16_to_f32(uint32_t b) { return bits_to_f32(b << 16); }

// float -> bf16, round to nearest even; NaN becomes 0x7FC0 as in torch.
FLASHLM_HD uint16_t f32_to_bf16(float f) {
  uint32_t bits = f32_to_bits(f);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// float -> IEEE half, round to nearest even, overflow to infinity (as torch and F16C do).
FLASHLM_HD uint16_t f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t bits = f32_to_bits(f);
  uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));  // NaN
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: infinity
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    uint32_t e = abs >> 23, m = (abs & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126 - e;  // m * 2^(e-150) = q * 2^-24 with q = m >> (126 - e)
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t h = ((abs >> 13) - (112u << 10));  // rebias exponent 127 -> 15
  uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
  return static_cast<uint16_t>(sign | h);
#endif
}

// The scalar kernels' element access where a tensor is float32 or bf16 (held as uint16_t; never f16 here):
// load to float, store from float (bf16: round to nearest even).
namespace bf16_or_f32 {
inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_f32(v); }
template <class T>
T store(float v);
template <>
inline float store<float>(float v) { return v; }
template <>
inline uint16_t store<uint16_t>(float v) { return f32_to_bf16(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = f32_to_bf16(v); }
}  // namespace bf16_or_f32

}  // namespace flashlm::core
