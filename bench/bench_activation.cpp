/*
bench_activation: Google Benchmark microbenchmarks of flashlm::activation::silu_mul (SwiGLU's gate,
out = silu(gate) * up) on the CPU (f32, bf16) and, in a CUDA build with a GPU present, on the GPU (f16, bf16,
f32), reported as bytes moved per second next to a copy's.

Reference: each case is first checked against silu(g) * u computed in double from the same inputs, within
the rounding the header documents (f32: 1e-6 relative; bf16/f16: the silu and the product each rounded to
the dtype); a mismatch skips the case and the program exits 1.

What is measured
  silu_mul_cpu/<dtype>/rows<R>/d<D>   gate, up [R, D] -> out. R = 1 is a decode step, 512 a prefill chunk;
      D = 11008 (Llama-7B's d_ff; --d=). On the library's thread pool (FLASHLM_NUM_THREADS or --threads=)
      with the run-time ISA (--isa=).
  silu_mul_cuda/<dtype>/...           the same on GPU 0, timed with CUDA events.

Columns
  bytes     bytes a call moves per second (decimal): gate and up read, out written.
  pct_copy  bytes as a percentage of a copy moving as many bytes, measured in the same run (a memcpy over the
            same pool; on the GPU cudaMemcpyAsync). At R = 1 the time is the call's fixed cost.
The peer comparison (torch's F.silu(g) * u) is bench/compare_activation.py; figures in bench/results/activation.md.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j2 --target bench_activation
  build/bench/bench/bench_activation --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_activation --quick                                               # smoke run
Own flags, taken out before Google Benchmark's: --d=N, --threads=N, --isa=scalar|avx2, --quick.
*/
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "bench_check.h"
#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;

int64_t g_d = 11008;

// gate in +-[2^-6, 8): silu's whole curve (saturated at both ends, bent near 0); up in +-[2^-4, 2).
struct Problem {
  int64_t rows;
  DType dtype;
  bench::Values gate, up;
  std::vector<uint8_t> out;
  Problem(int64_t r, DType t)
      : rows(r), dtype(t), gate(bench::random_values(r * g_d, t, -6, 2, 1)),
        up(bench::random_values(r * g_d, t, -4, 0, 2)), out(gate.bytes.size(), 0) {}
  int64_t numel() const { return rows * g_d; }
  double bytes() const { return 3.0 * double(numel() * bench::elem_bytes(dtype)); }
  TensorView view(void* data, flashlm::Device device) const {
    return TensorView::contiguous(data, dtype, {rows, g_d}, device);
  }
  // out as computed by the kernel against silu(g) * u in double.
  std::string check(const std::vector<uint8_t>& result) const {
    std::vector<double> want(static_cast<size_t>(numel()));
    for (size_t i = 0; i < want.size(); ++i) {
      const double g = gate.values[i];
      want[i] = g / (1.0 + std::exp(-g)) * up.values[i];
    }
    // f32: Cephes' expf within 2 ulp, then a sum, a division and a product (1e-6 covers them). 16-bit: silu
    // rounded to the dtype, then the product, two roundings of u = 2^-8 (bf16) or 2^-11 (f16) each.
    const double u = dtype == DType::BF16 ? 0x1p-8 : 0x1p-11;
    const double rtol = dtype == DType::F32 ? 1e-6 : 2 * u + u * u + 1e-6;
    return bench::compare("out", bench::to_floats(result, dtype), want, rtol, 0.0);
  }
};

std::string case_name(const std::string& device, DType dtype, int64_t rows) {
  return "silu_mul_" + device + "/" + bench::dtype_label(dtype) + "/rows" + std::to_string(rows) + "/d" +
         std::to_string(g_d);
}

void BM_silu_mul_cpu(benchmark::State& state, DType dtype, int64_t rows) {
  Problem pr(rows, dtype);
  const TensorView gate = pr.view(pr.gate.bytes.data(), {}), up = pr.view(pr.up.bytes.data(), {}),
                   out = pr.view(pr.out.data(), {});
  auto run = [&] { flashlm::activation::silu_mul(gate, up, out); };
  try {
    run();  // warm-up, and a clean skip for what this build does not serve
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  if (!bench::check_once(state, case_name("cpu", dtype, rows), [&] { return pr.check(pr.out); })) return;
  const double seconds = bench::timed_loop(state, run);
  bench::set_bandwidth(state, pr.bytes(), seconds, bench::cpu_copy_rate(int64_t(pr.bytes() / 2)));
}

#ifdef FLASHLM_WITH_CUDA
void BM_silu_mul_cuda(benchmark::State& state, DType dtype, int64_t rows) {
  try {
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    Problem pr(rows, dtype);
    bench::DeviceBuffer g(pr.gate.bytes.data(), pr.gate.bytes.size()), u(pr.up.bytes.data(), pr.up.bytes.size()),
        o(pr.out.size());
    const flashlm::Device gpu{flashlm::DeviceType::CUDA, 0};
    bench::CudaTimer timer;
    auto run = [&] { flashlm::activation::silu_mul(pr.view(g.ptr, gpu), pr.view(u.ptr, gpu), pr.view(o.ptr, gpu),
                                                   timer.stream); };
    timer.time(run);
    BENCH_CUDA_CHECK(cudaMemcpy(pr.out.data(), o.ptr, pr.out.size(), cudaMemcpyDeviceToHost));
    if (!bench::check_once(state, case_name("cuda", dtype, rows), [&] { return pr.check(pr.out); })) return;
    const double seconds = bench::timed_loop_cuda(state, timer, run);
    bench::set_bandwidth(state, pr.bytes(), seconds, bench::cuda_copy_rate(int64_t(pr.bytes() / 2)));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // e.g. the CUDA kernels are not built
  }
}
#endif  // FLASHLM_WITH_CUDA

using SiluMulBench = void (*)(benchmark::State&, DType, int64_t);

void register_device(const std::string& device, SiluMulBench bench, std::initializer_list<DType> dtypes,
                     bool manual_time) {
  for (DType dtype : dtypes)
    for (int64_t rows : {int64_t{1}, bench::quick() ? int64_t{16} : int64_t{512}})
      bench::register_case(case_name(device, dtype, rows), manual_time, benchmark::kMicrosecond, bench, dtype, rows);
}

void register_all() {
  register_device("cpu", BM_silu_mul_cpu, {DType::F32, DType::BF16}, false);
  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    register_device("cuda", BM_silu_mul_cuda, {DType::F16, DType::BF16, DType::F32}, true);
#endif
  });
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_d = 1024;
  return bench::take_flags(argc, argv, "bench_activation", {{"d", &g_d, 1, 1 << 24}});
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
