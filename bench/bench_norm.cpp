/*
bench_norm: Google Benchmark microbenchmarks of flashlm::norm::rms_norm, the kernel alone (no Python), on the
CPU (f32, bf16) and, in a CUDA build with a GPU present, on the GPU (f16, bf16, f32), reported as bytes moved
per second.

What is measured
  rms_norm_cpu/<dtype>/rows<R>/d<D>[/residual]   x [R, D] -> out, weight in x's dtype; with /residual the
      fused form (residual += x, out = norm(residual)). R = 1 is a decode step, 512 a prefill chunk. On the
      library's thread pool (FLASHLM_NUM_THREADS or --threads=) with the run-time ISA (--isa=).
  rms_norm_cuda/<dtype>/...                      the same on GPU 0, timed with CUDA events.

Columns
  bytes   bytes a call must move per second (decimal): x read and out written, plus the residual read and
          written; the weight once. Hold it against the machine's copy bandwidth (bench/compare_norm.py
          measures one). At R = 1 the time is the call's fixed cost, not bandwidth.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j2 --target bench_norm
  build/bench/bench/bench_norm --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_norm --quick                          # smoke run: 64 rows, --benchmark_min_time=0.01
Own flags, taken out before Google Benchmark's: --d=N, --threads=N, --isa=scalar|avx2, --quick.
*/
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;

int64_t g_d = 4096;

int64_t elem_bytes(DType t) { return t == DType::F32 ? 4 : 2; }

// n values in [-1, 1) as `t` (f16/bf16: the top bits of the f32, which is all a norm's input needs).
std::vector<uint8_t> filled(int64_t n, DType t, uint64_t seed) {
  std::vector<uint8_t> out(size_t(n * elem_bytes(t)));
  bench::SplitMix64 rng{seed};
  for (int64_t i = 0; i < n; ++i) {
    const float f = float(int32_t(rng.next() >> 40) - (1 << 23)) / float(1 << 23);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if (t == DType::F32) std::memcpy(&out[size_t(i) * 4], &f, 4);
    else if (t == DType::BF16) std::memcpy(&out[size_t(i) * 2], reinterpret_cast<const char*>(&bits) + 2, 2);
    else {  // f16 of magnitude < 1: sign, exponent 14 (0.5..1), 10 mantissa bits
      const uint16_t h = uint16_t(((bits >> 16) & 0x8000u) | 0x3800u | ((bits >> 13) & 0x3FFu));
      std::memcpy(&out[size_t(i) * 2], &h, 2);
    }
  }
  return out;
}

struct Problem {
  int64_t rows;
  DType dtype;
  std::vector<uint8_t> x, weight, out, residual;
  Problem(int64_t r, DType t) : rows(r), dtype(t) {
    x = filled(r * g_d, t, 1);
    weight = filled(g_d, t, 2);
    residual = filled(r * g_d, t, 3);
    out.assign(x.size(), 0);
  }
  double bytes(bool with_residual) const {
    return double((with_residual ? 4 : 2) * rows * g_d * elem_bytes(dtype) + g_d * elem_bytes(dtype));
  }
};

flashlm::norm::RMSNormParams params(const Problem& pr, void* x, void* w, void* out, void* residual,
                                    flashlm::Device device) {
  flashlm::norm::RMSNormParams p;
  p.x = TensorView::contiguous(x, pr.dtype, {pr.rows, g_d}, device);
  p.weight = TensorView::contiguous(w, pr.dtype, {g_d}, device);
  p.out = TensorView::contiguous(out, pr.dtype, {pr.rows, g_d}, device);
  if (residual) p.residual = TensorView::contiguous(residual, pr.dtype, {pr.rows, g_d}, device);
  return p;
}

void set_rate(benchmark::State& state, double bytes_per_iter) {
  state.counters["bytes"] = benchmark::Counter(bytes_per_iter * double(state.iterations()),
                                               benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

void BM_norm_cpu(benchmark::State& state, DType dtype, int64_t rows, bool with_residual) {
  Problem pr(rows, dtype);
  // The residual grows by x every call; a norm does not care about scale, and the values stay finite.
  const auto p = params(pr, pr.x.data(), pr.weight.data(), pr.out.data(),
                        with_residual ? pr.residual.data() : nullptr, flashlm::Device{});
  try {
    flashlm::norm::rms_norm(p);  // warm-up
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    flashlm::norm::rms_norm(p);
    benchmark::ClobberMemory();
  }
  set_rate(state, pr.bytes(with_residual));
}

#ifdef FLASHLM_WITH_CUDA
void BM_norm_cuda(benchmark::State& state, DType dtype, int64_t rows, bool with_residual) {
  try {
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    Problem pr(rows, dtype);
    bench::DeviceBuffer x(pr.x.data(), pr.x.size()), w(pr.weight.data(), pr.weight.size()), out(pr.out.size()),
        residual(pr.residual.data(), pr.residual.size());
    const auto p = params(pr, x.ptr, w.ptr, out.ptr, with_residual ? residual.ptr : nullptr,
                          flashlm::Device{flashlm::DeviceType::CUDA, 0});
    bench::CudaTimer timer;
    auto run = [&] { flashlm::norm::rms_norm(p, timer.stream); };
    for (int i = 0; i < 3; ++i) timer.time(run);  // warm-up (module load, clocks)
    for (auto _ : state) state.SetIterationTime(timer.time(run));
    set_rate(state, pr.bytes(with_residual));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // e.g. the CUDA kernels are not built
  }
}
#endif  // FLASHLM_WITH_CUDA

using NormBench = void (*)(benchmark::State&, DType, int64_t, bool);

void register_device(const std::string& device, NormBench bench, std::initializer_list<DType> dtypes,
                     bool manual_time) {
  for (DType dtype : dtypes)
    for (int64_t rows : {int64_t{1}, bench::quick() ? int64_t{64} : int64_t{512}})
      for (bool with_residual : {false, true}) {
        const char* label = dtype == DType::F32 ? "f32" : dtype == DType::BF16 ? "bf16" : "f16";
        const std::string name = "rms_norm_" + device + "/" + label + "/rows" + std::to_string(rows) + "/d" +
                                 std::to_string(g_d) + (with_residual ? "/residual" : "");
        auto* b = benchmark::RegisterBenchmark(name.c_str(), bench, dtype, rows, with_residual);
        b->Unit(benchmark::kMicrosecond);
        manual_time ? b->UseManualTime() : b->UseRealTime();
      }
}

void register_all() {
  register_device("cpu", BM_norm_cpu, {DType::F32, DType::BF16}, false);
  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    register_device("cuda", BM_norm_cuda, {DType::F16, DType::BF16, DType::F32}, true);
#endif
  });
}

bool parse_own_flags(int* argc, char** argv) {
  return bench::take_flags(argc, argv, "bench_norm", {{"d", &g_d, 1, 1 << 20}});
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
