// Check, then time: what the benchmarks in bench/ use to hold a kernel's output against a plain reference
// before they time it. Inputs are random numbers that the input dtype holds exactly, so a reference computed
// in double from the same floats sees exactly what the kernel saw; a mismatch skips the benchmark with the
// worst element and makes the program exit 1 (bench_common.h's run_main).
#pragma once

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <string>
#include <vector>

#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace bench {

using flashlm::DType;

inline int64_t elem_bytes(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_label(DType t) { return t == DType::F32 ? "f32" : t == DType::BF16 ? "bf16" : "f16"; }

// Element i of a buffer of F32, BF16 or F16 as a float (F16 subnormals, infinities and NaN included).
inline float load_float(const void* data, DType t, int64_t i) {
  const auto* p = static_cast<const uint8_t*>(data);
  float f;
  if (t == DType::F32) {
    std::memcpy(&f, p + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
  if (t == DType::BF16) {
    const uint32_t bits = uint32_t(h) << 16;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const int exponent = (h >> 10) & 31, mantissa = h & 1023;
  const float magnitude = exponent == 0    ? std::ldexp(float(mantissa), -24)
                          : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                           : std::ldexp(float(1024 + mantissa), exponent - 25);
  return (h & 0x8000) ? -magnitude : magnitude;
}

// Stores f as element i of a buffer of F32, BF16 or F16, rounded to nearest even (F16: subnormals and
// overflow to infinity included; NaN stays NaN).
inline void store_float(void* data, DType t, int64_t i, float f) {
  auto* p = static_cast<uint8_t*>(data);
  if (t == DType::F32) {
    std::memcpy(p + 4 * i, &f, 4);
    return;
  }
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint16_t h;
  if (t == DType::BF16) {
    h = (x & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(x >> 16 | 0x40) : uint16_t((x + 0x7FFFu + ((x >> 16) & 1)) >> 16);
  } else {
    const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    const uint32_t a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) h = sign | 0x7E00;                 // NaN
    else if (a >= 0x477FF000u) h = sign | 0x7C00;           // >= 65520 rounds to infinity
    else if (a < 0x38800000u) h = sign | uint16_t(std::nearbyint(std::fabs(f) * 0x1p24f));  // subnormal, exact
    else h = sign | uint16_t((a - 0x38000000u + 0xFFFu + ((a >> 13) & 1)) >> 13);  // rebias, round to 10 bits
  }
  std::memcpy(p + 2 * i, &h, 2);
}

inline std::vector<float> to_floats(const std::vector<uint8_t>& bytes, DType t) {
  std::vector<float> out(bytes.size() / size_t(elem_bytes(t)));
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_float(bytes.data(), t, int64_t(i));
  return out;
}

// n random numbers that `t` (F32, BF16 or F16) holds exactly: a random sign, a magnitude in
// [2^min_exp, 2^(max_exp + 1)) with as many random mantissa bits as t keeps (F16: min_exp >= -14 and
// max_exp <= 15, its normal range). `bytes` is their encoding in t, `values` the same numbers as floats.
struct Values {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

inline Values random_values(int64_t n, DType t, int min_exp, int max_exp, uint64_t seed) {
  Values v;
  v.bytes.resize(size_t(n * elem_bytes(t)));
  v.values.resize(size_t(n));
  SplitMix64 rng{seed};
  const int mantissa_bits = t == DType::F32 ? 23 : t == DType::BF16 ? 7 : 10;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t r = rng.next();
    const int exponent = min_exp + int((r >> 32) % uint64_t(max_exp - min_exp + 1));
    const uint32_t mantissa = uint32_t(r) & ((1u << mantissa_bits) - 1);
    const float f = std::ldexp(float((1u << mantissa_bits) + mantissa), exponent - mantissa_bits);
    store_float(v.bytes.data(), t, i, (r >> 63) ? -f : f);  // exact: no rounding happens
    v.values[size_t(i)] = load_float(v.bytes.data(), t, i);
  }
  return v;
}

// "" when every got[i] is within atol + rtol * |want[i]| of want[i]; else how many are not and the worst.
inline std::string compare(const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
                           double rtol, double atol) {
  if (got.size() != want.size()) return what + ": " + std::to_string(got.size()) + " values, want " +
                                        std::to_string(want.size());
  size_t bad = 0, worst = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]), allowed = atol + rtol * std::fabs(want[i]);
    if (!(err <= allowed)) {  // NaN counts as out
      ++bad;
      const double excess = std::isnan(err) ? INFINITY : err / (allowed > 0 ? allowed : 1e-300);
      if (excess > worst_excess) worst_excess = excess, worst = i;
    }
  }
  if (bad == 0) return "";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: %zu of %zu values beyond %g + %g |want|; worst [%zu]: got %.9g, want %.9g",
                what.c_str(), bad, got.size(), atol, rtol, worst, double(got[worst]), want[worst]);
  return buf;
}

// The same for a result that only agrees as a whole (an accumulation of rounding, such as a matmul over 8-bit
// activations): "" when ||got - want|| <= tol * ||want||.
inline std::string compare_norm(const std::string& what, const std::vector<float>& got,
                                const std::vector<double>& want, double tol) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    ref += want[i] * want[i];
  }
  const double rel = std::sqrt(err / ref);
  if (got.size() == want.size() && rel <= tol) return "";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: ||got - want|| / ||want|| = %.3g over %zu values, more than %g", what.c_str(),
                rel, want.size(), tol);
  return buf;
}

// Runs check() (which returns "" when the kernel's output matched its reference, else what differed) the first
// time `key` comes by, and keeps its answer: Google Benchmark calls a benchmark function several times (to size
// the iteration count, then per repetition), and one check of a case is enough. On a mismatch (or an exception
// from the check) the run is marked failed, the message printed and the benchmark skipped: false.
template <class Check>
bool check_once(benchmark::State& state, const std::string& key, Check&& check) {
  static std::map<std::string, std::string> results;
  auto it = results.find(key);
  if (it == results.end()) {
    std::string result;
    try {
      result = check();
    } catch (const std::exception& e) {
      result = std::string("the check raised: ") + e.what();
    }
    if (!result.empty()) std::fprintf(stderr, "MISMATCH %s: %s\n", key.c_str(), result.c_str());
    it = results.emplace(key, result).first;
  }
  if (it->second.empty()) return true;
  all_checks_passed() = false;
  state.SkipWithError(("does not match its reference: " + it->second).c_str());
  return false;
}

}  // namespace bench
