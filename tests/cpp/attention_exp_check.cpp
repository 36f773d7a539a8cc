// Accuracy check of the AVX2 attention kernels' exp2 and tanh (csrc/attention/shared_avx2.h) against
// the C library in double. Built and run by tests/test_attention_kernels.py:
//   g++ -O2 -mavx2 -mfma -std=c++17 -Icsrc/attention -Icsrc/include tests/cpp/attention_exp_check.cpp && ./a.out
// Prints "exp2_max_rel <e> at <x>", "tanh_max_abs <e> at <x>" and "specials ok|bad" (exact values at 0, -inf,
// below -127, +-inf and NaN).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "shared_avx2.h"

using namespace flashlm::attention::avx2;

static float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

int main() {
  // Every 7th float in [-126, 0] (bit patterns of the negative floats, from -0 upwards in magnitude).
  double exp_err = 0, exp_at = 0;
  alignas(32) float x[8], y[8];
  const uint32_t lo = 0x80000000u, hi = 0xC2FC0000u;  // -0 .. -126
  for (uint32_t b = lo; b <= hi - 56; b += 56) {
    for (int i = 0; i < 8; ++i) x[i] = from_bits(b + 7 * i);
    _mm256_store_ps(y, exp2_ps(_mm256_load_ps(x)));
    for (int i = 0; i < 8; ++i) {
      const double ref = std::exp2(double(x[i]));
      const double e = std::fabs(y[i] - ref) / ref;
      if (e > exp_err) exp_err = e, exp_at = x[i];
    }
  }
  std::printf("exp2_max_rel %.3e at %.9g\n", exp_err, exp_at);

  double tanh_err = 0, tanh_at = 0;
  for (int k = -2000000; k < 2000000; k += 8) {
    for (int i = 0; i < 8; ++i) x[i] = float(k + i) * 6e-6f;  // [-12, 12]
    _mm256_store_ps(y, tanh_ps(_mm256_load_ps(x)));
    for (int i = 0; i < 8; ++i) {
      const double e = std::fabs(y[i] - std::tanh(double(x[i])));
      if (e > tanh_err) tanh_err = e, tanh_at = x[i];
    }
  }
  std::printf("tanh_max_abs %.3e at %.9g\n", tanh_err, tanh_at);

  // exp2 of 0 is exactly 1; of -inf and anything below -127, exactly 0 (masked scores).
  x[0] = 0.f, x[1] = -0.f, x[2] = -__builtin_inff(), x[3] = -127.5f, x[4] = -1e30f, x[5] = -126.f, x[6] = -1.f,
  x[7] = -0.5f;
  _mm256_store_ps(y, exp2_ps(_mm256_load_ps(x)));
  bool ok = y[0] == 1.f && y[1] == 1.f && y[2] == 0.f && y[3] == 0.f && y[4] == 0.f &&
            y[5] == std::ldexp(1.f, -126) && y[6] == 0.5f && std::fabs(y[7] - 0.70710678f) < 1e-7f;
  // NaN gives NaN from both (a NaN score must poison its row); tanh(+-inf) is exactly +-1 (a softcapped inf
  // score, whose gradient 1 - t^2 is then 0).
  x[0] = std::nanf(""), x[1] = -std::nanf(""), x[2] = __builtin_inff(), x[3] = -__builtin_inff();
  _mm256_store_ps(y, exp2_ps(_mm256_load_ps(x)));
  ok = ok && std::isnan(y[0]) && std::isnan(y[1]);
  _mm256_store_ps(y, tanh_ps(_mm256_load_ps(x)));
  ok = ok && std::isnan(y[0]) && std::isnan(y[1]) && y[2] == 1.f && y[3] == -1.f;
  std::printf("specials %s\n", ok ? "ok" : "bad");
  return 0;
}
