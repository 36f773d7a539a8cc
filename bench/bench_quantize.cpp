/*
bench_quantize: Google Benchmark microbenchmarks of flashlm::gguf_quantize (float rows to GGML blocks, ggml's
reference quantizers byte for byte) on the CPU, one case per block type, reported as rows and bytes per second.

Reference: before a type is timed its output is checked twice. (1) The bytes equal those of the scalar code
(--isa=scalar), the library's oracle for its AVX2 searches (and itself matched against ggml's quantizers
byte for byte by tests/test_gguf_quantize.py). (2) For the types with one scale per 32 values, dequantized
again every value lies within the bound of its rounding: |x - x'| <= c * amax of its block, c = 1/8 (Q4_0),
1/14 (Q4_1), 1/16 (Q5_0), 1/28 (Q5_1), 1/127 (Q8_0), each the step, or for Q4_0/Q5_0 the clamped top level,
plus the f16 rounding of the scales (derived in bound() below). A mismatch skips the type and the program
exits 1.

What is measured
  quantize_cpu/<type>/<rows>x<cols>   f32 [rows, cols] of normal values (4096 x 4096; --rows=, --cols=, a
      multiple of 256) to blocks of <type>, rows split over the library's thread pool (FLASHLM_NUM_THREADS or
      --threads=), with the run-time ISA (--isa=).

Columns
  rows      rows quantized per second.
  bytes     bytes read (4 an element) plus bytes written (the blocks) per second (decimal).
  pct_copy  bytes as a percentage of a copy moving as many bytes in the same run: a quantizer is bound by its
            arithmetic (the rounding searches of the K-quants above all), far below it.
The peer comparison (gguf-py's quantizers) is bench/compare_quantize.py; figures in bench/results/quantize.md.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF
  cmake --build build/bench -j2 --target bench_quantize
  build/bench/bench/bench_quantize --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_quantize --quick                                                 # smoke run
Own flags, taken out before Google Benchmark's: --rows=N, --cols=N, --threads=N, --isa=scalar|avx2, --quick.
*/
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "bench_check.h"
#include "bench_common.h"
#include "flashlm/flashlm.h"
#include "flashlm/gguf/quantize.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;

int64_t g_rows = 4096, g_cols = 4096;

const DType kTypes[] = {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0,
                        DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K};

// rows x cols standard normal values (Box-Muller), as a model's weights are roughly; made once.
const std::vector<float>& input() {
  static std::vector<float> x;
  if (!x.empty()) return x;
  x.resize(size_t(g_rows * g_cols));
  bench::SplitMix64 rng{0x5EED};
  auto uniform = [&] { return (double(rng.next() >> 11) + 0.5) * 0x1p-53; };  // in (0, 1)
  for (size_t i = 0; i < x.size(); i += 2) {
    const double r = std::sqrt(-2 * std::log(uniform())), a = 2 * M_PI * uniform();
    x[i] = float(r * std::cos(a));
    if (i + 1 < x.size()) x[i + 1] = float(r * std::sin(a));
  }
  return x;
}

std::vector<uint8_t> quantize(DType type) {
  std::vector<uint8_t> out(size_t(flashlm::storage_bytes(type, g_rows * g_cols)));
  flashlm::gguf_quantize(TensorView::contiguous(const_cast<float*>(input().data()), DType::F32, {g_rows, g_cols}), type,
                         TensorView::contiguous(out.data(), DType::U8, {int64_t(out.size())}));
  return out;
}

// The largest |x - x'| over a 32-value block, as a fraction of the block's amax, that the type's rounding
// allows (0: no bound here). d is the step; the f16 rounding of a scale (relative 2^-11) moves level q by
// |q| d 2^-11, and of a min by |min| 2^-11 <= amax 2^-11.
//   Q8_0: d = amax/127, levels +-127: d/2 + 127 d 2^-11 < d.
//   Q4_0: d = amax/8, levels -8..7: the value at -8d's opposite end is clamped to 7d, an error of d; plus
//         8 d 2^-11: d (1 + 2^-8). Q5_0 likewise with d = amax/16, levels -16..15: d (1 + 2^-7).
//   Q4_1: d = (max - min)/15 <= 2 amax/15, levels 0..15: d/2 + 15 d 2^-11 + amax 2^-11 < amax/14.
//   Q5_1: d <= 2 amax/31, levels 0..31: d/2 + 31 d 2^-11 + amax 2^-11 < amax/28.
double bound(DType type) {
  switch (type) {
    case DType::Q4_0: return (1 + 0x1p-8) / 8;
    case DType::Q4_1: return 1.0 / 14;
    case DType::Q5_0: return (1 + 0x1p-7) / 16;
    case DType::Q5_1: return 1.0 / 28;
    case DType::Q8_0: return 1.0 / 127;
    default: return 0;
  }
}

std::string check(DType type, const std::vector<uint8_t>& got) {
  const flashlm::CpuIsa isa = flashlm::cpu_isa();
  flashlm::set_cpu_isa(flashlm::CpuIsa::Scalar);
  const std::vector<uint8_t> oracle = quantize(type);
  flashlm::set_cpu_isa(isa);
  if (got != oracle) {
    const size_t at = size_t(std::mismatch(got.begin(), got.end(), oracle.begin()).first - got.begin());
    return "byte " + std::to_string(at) + " of " + std::to_string(got.size()) + " differs from the scalar code's";
  }
  const double c = bound(type);
  if (c == 0) return "";
  const std::vector<float>& x = input();
  std::vector<float> back(x.size());
  flashlm::dequantize(TensorView::contiguous(const_cast<uint8_t*>(got.data()), type, {int64_t(x.size())}),
                      TensorView::contiguous(back.data(), DType::F32, {int64_t(x.size())}));
  for (size_t b = 0; b < x.size(); b += 32) {
    double amax = 0, worst = 0;
    size_t at = b;
    for (size_t i = b; i < b + 32; ++i) {
      amax = std::max(amax, std::fabs(double(x[i])));
      if (std::fabs(double(x[i]) - back[i]) > worst) worst = std::fabs(double(x[i]) - back[i]), at = i;
    }
    if (worst > c * amax) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "value %zu: %.9g quantizes to %.9g, off by %.3g > %.4g * the block's amax %.6g",
                    at, double(x[at]), double(back[at]), worst, c, amax);
      return buf;
    }
  }
  return "";
}

std::string case_name(DType type) {
  return std::string("quantize_cpu/") + flashlm::dtype_name(type) + "/" + std::to_string(g_rows) + "x" +
         std::to_string(g_cols);
}

void BM_quantize_cpu(benchmark::State& state, DType type) {
  std::vector<uint8_t> out;
  try {
    out = quantize(type);  // the output checked, and a clean skip for what this build does not serve
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  if (!bench::check_once(state, case_name(type), [&] { return check(type, out); })) return;
  const TensorView src = TensorView::contiguous(const_cast<float*>(input().data()), DType::F32, {g_rows, g_cols});
  const TensorView dst = TensorView::contiguous(out.data(), DType::U8, {int64_t(out.size())});
  const double seconds = bench::timed_loop(state, [&] { flashlm::gguf_quantize(src, type, dst); });
  const double bytes = 4.0 * double(g_rows * g_cols) + double(out.size());
  bench::set_bandwidth(state, bytes, seconds, bench::cpu_copy_rate(int64_t(bytes / 2)));
  state.counters["rows"] = benchmark::Counter(double(state.iterations() * g_rows), benchmark::Counter::kIsRate);
}

void register_all() {
  for (DType type : kTypes)
    bench::register_case(case_name(type), false, benchmark::kMillisecond, BM_quantize_cpu, type);
  bench::register_cuda_and_context([] {});  // the context lines; quantization runs on the CPU only
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_rows = 64, g_cols = 1024;
  if (!bench::take_flags(argc, argv, "bench_quantize",
                         {{"rows", &g_rows, 1, 1 << 20}, {"cols", &g_cols, 256, 1 << 24}}))
    return false;
  if (g_cols % 256) {
    std::fprintf(stderr, "bench_quantize: --cols must be a multiple of 256 (the K-quants' block), got %lld\n",
                 static_cast<long long>(g_cols));
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
