// Rotate-half rope on one head's row (decoder.cpp): v[i], v[i + half] -> fma(v[i + half], -s[i], v[i] * c[i]),
// fma(v[i], s[i + half], v[i + half] * c[i + half]), the roundings of torch's addcmul in
// flashlm.models.apply_rope. The AVX2 form uses the FMA instruction; the scalar form std::fma; both give the
// same bits.
#pragma once

#include <cstdint>

namespace flashlm::runtime::detail {

// Pairs i in [begin, half).
void rotate_half_scalar(float* v, int64_t half, const float* c, const float* s, int64_t begin = 0);
void rotate_half_avx2(float* v, int64_t half, const float* c, const float* s);

}  // namespace flashlm::runtime::detail
