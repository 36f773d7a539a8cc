// The silu_mul kernels' entry points (silu_mul.cpp checks the arguments and routes between them) and the exp
// they share on the CPU.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::activation::detail {

struct SiluMulArgs {
  DType dtype = DType::F32;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  int64_t n = 0;
};

// Cephes' expf: exp(x) = 2^k * p(r), k = round(x * log2(e)), r = x - k * ln(2) in two parts, p a degree-7
// polynomial. x below kExpLo is taken as kExpLo (2^k stays a normal float: exp of a very negative x comes out
// ~1e-38 instead of 0, which leaves silu's result unchanged); above kExpHi the result is +inf, as expf's
// overflow (so silu(-inf) is NaN and silu(-1000) is -0, as in torch). Each step is one rounded f32 operation, in the
// same order in the scalar and AVX2 code and without FMA, so both give the same bits.
constexpr float kExpLo = -87.0f, kExpHi = 88.0f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// Elements [begin, end).
void silu_mul_scalar(const SiluMulArgs& a, int64_t begin, int64_t end);
void silu_mul_avx2(const SiluMulArgs& a, int64_t begin, int64_t end);
void silu_mul_cuda(const SiluMulArgs& a, int device, void* stream);

}  // namespace flashlm::activation::detail
