/*
bench_optim: Google Benchmark microbenchmarks of flashlm::optim's fused AdamW step (adamw_step on one
parameter, adamw_step_multi on many) on the CPU (f32, bf16 parameters) and, in a CUDA build with a GPU
present, on the GPU (f32, f16, bf16), reported as bytes moved per second next to a copy's.

Reference: each case's first step is checked against torch.optim.AdamW's formula (the header's) computed in
double from the same parameter, gradient and moments: the moments and f32 parameters within 1e-6 relative
(a few f32 roundings), 16-bit parameters within one rounding to their dtype more. A mismatch skips the case
and the program exits 1.

What is measured
  adamw_cpu/<dtype>/n<N>                   one parameter of N elements (10M; --numel=), f32 moments. On the
      library's thread pool (FLASHLM_NUM_THREADS or --threads=) with the run-time ISA (--isa=).
  adamw_multi_cpu/<dtype>/n<N>/tensors<T>  the same N elements as T parameters (100; --tensors=) in one call,
      as the trainer steps a model of many tensors.
  adamw_cuda/..., adamw_multi_cuda/...     the same on GPU 0, timed with CUDA events.

Columns
  bytes     bytes a step moves per second (decimal): param, grad and both moments read, param and both moments
            written (28 bytes an element for f32 parameters, 22 for 16-bit ones).
  pct_copy  bytes as a percentage of a copy moving as many bytes, measured in the same run (a memcpy over the
            same pool; on the GPU cudaMemcpyAsync).
The peer comparison (torch.optim.AdamW) is bench/compare_optim.py; figures in bench/results/optim.md.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j2 --target bench_optim
  build/bench/bench/bench_optim --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_optim --quick                                                    # smoke run
Own flags, taken out before Google Benchmark's: --numel=N, --tensors=T, --threads=N, --isa=scalar|avx2, --quick.
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
using flashlm::optim::AdamWParams;

int64_t g_numel = 10'000'000, g_tensors = 100;

// The hyperparameters of a step late enough that both bias corrections matter.
AdamWParams hyperparameters() {
  AdamWParams a;
  a.lr = 1e-3;
  a.beta1 = 0.9;
  a.beta2 = 0.999;
  a.eps = 1e-8;
  a.weight_decay = 0.1;
  a.step = 10;
  return a;
}

// Parameters in +-[2^-4, 2), gradients in +-[2^-6, 1), first moments in +-[2^-8, 2^-3), second moments in
// [2^-12, 2^-5): f32 moments of a few earlier steps.
struct Problem {
  DType dtype;
  bench::Values param, grad;
  std::vector<float> m, v;
  explicit Problem(DType t)
      : dtype(t), param(bench::random_values(g_numel, t, -4, 0, 1)), grad(bench::random_values(g_numel, t, -6, -1, 2)),
        m(bench::random_values(g_numel, DType::F32, -8, -4, 3).values),
        v(bench::random_values(g_numel, DType::F32, -12, -6, 4).values) {
    for (float& x : v) x = std::fabs(x);
  }
  double bytes() const { return double(g_numel) * double(3 * bench::elem_bytes(dtype) + 16); }

  // The views of `tensors` parameters that split the buffers at p, g, m, v (host or device) into near-equal parts.
  std::vector<AdamWParams> params(void* p, void* g, void* m_, void* v_, int64_t tensors, flashlm::Device dev) const {
    std::vector<AdamWParams> out;
    const int64_t es = bench::elem_bytes(dtype);
    for (int64_t i = 0, begin = 0; i < tensors; ++i) {
      const int64_t n = g_numel / tensors + (i < g_numel % tensors ? 1 : 0);
      AdamWParams a = hyperparameters();
      a.param = TensorView::contiguous(static_cast<uint8_t*>(p) + begin * es, dtype, {n}, dev);
      a.grad = TensorView::contiguous(static_cast<uint8_t*>(g) + begin * es, dtype, {n}, dev);
      a.exp_avg = TensorView::contiguous(static_cast<float*>(m_) + begin, DType::F32, {n}, dev);
      a.exp_avg_sq = TensorView::contiguous(static_cast<float*>(v_) + begin, DType::F32, {n}, dev);
      out.push_back(a);
      begin += n;
    }
    return out;
  }

  // One step's results (param in `dtype`, the moments) against the formula in double from the initial state.
  std::string check(const std::vector<uint8_t>& p_after, const std::vector<float>& m_after,
                    const std::vector<float>& v_after) const {
    const AdamWParams h = hyperparameters();
    const double bc1 = 1 - std::pow(h.beta1, double(h.step)), bc2 = 1 - std::pow(h.beta2, double(h.step));
    std::vector<double> p_want(m.size()), m_want(m.size()), v_want(m.size());
    for (size_t i = 0; i < m.size(); ++i) {
      const double g = grad.values[i];
      m_want[i] = h.beta1 * m[i] + (1 - h.beta1) * g;
      v_want[i] = h.beta2 * v[i] + (1 - h.beta2) * g * g;
      p_want[i] = param.values[i] * (1 - h.lr * h.weight_decay) -
                  h.lr / bc1 * m_want[i] / (std::sqrt(v_want[i] / bc2) + h.eps);
    }
    // m's update m + (1 - beta1)(g - m) may cancel: its f32 rounding is bounded by the inputs' size (< 1), not
    // the result's, hence the absolute 1e-7. A 16-bit parameter is rounded once more, by u = 2^-8 or 2^-11.
    const double p_rtol = dtype == DType::F32 ? 1e-6 : (dtype == DType::BF16 ? 0x1p-8 : 0x1p-11) + 1e-6;
    std::string err = bench::compare("exp_avg", m_after, m_want, 1e-6, 1e-7);
    if (err.empty()) err = bench::compare("exp_avg_sq", v_after, v_want, 1e-6, 0.0);
    if (err.empty()) err = bench::compare("param", bench::to_floats(p_after, dtype), p_want, p_rtol, 0.0);
    return err;
  }
};

std::string case_name(const std::string& device, DType dtype, int64_t tensors) {
  return std::string(tensors == 1 ? "adamw_" : "adamw_multi_") + device + "/" + bench::dtype_label(dtype) + "/n" +
         std::to_string(g_numel) + (tensors == 1 ? "" : "/tensors" + std::to_string(tensors));
}

void step(const std::vector<AdamWParams>& params, void* stream) {
  if (params.size() == 1) flashlm::optim::adamw_step(params[0], stream);
  else flashlm::optim::adamw_step_multi(params, stream);
}

void BM_adamw_cpu(benchmark::State& state, DType dtype, int64_t tensors) {
  const Problem pr(dtype);
  std::vector<uint8_t> p = pr.param.bytes;
  std::vector<float> m = pr.m, v = pr.v;
  const auto params = pr.params(p.data(), const_cast<uint8_t*>(pr.grad.bytes.data()), m.data(), v.data(), tensors, {});
  auto run = [&] { step(params, nullptr); };
  try {
    run();  // the step that is checked; a clean skip for what this build does not serve
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  if (!bench::check_once(state, case_name("cpu", dtype, tensors), [&] { return pr.check(p, m, v); })) return;
  const double seconds = bench::timed_loop(state, run);  // later steps from the updated state
  bench::set_bandwidth(state, pr.bytes(), seconds, bench::cpu_copy_rate(int64_t(pr.bytes() / 2)));
}

#ifdef FLASHLM_WITH_CUDA
void BM_adamw_cuda(benchmark::State& state, DType dtype, int64_t tensors) {
  try {
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    const Problem pr(dtype);
    const size_t moment_bytes = pr.m.size() * 4;
    bench::DeviceBuffer p(pr.param.bytes.data(), pr.param.bytes.size()), g(pr.grad.bytes.data(), pr.grad.bytes.size()),
        m(pr.m.data(), moment_bytes), v(pr.v.data(), moment_bytes);
    const auto params = pr.params(p.ptr, g.ptr, m.ptr, v.ptr, tensors, flashlm::Device{flashlm::DeviceType::CUDA, 0});
    bench::CudaTimer timer;
    auto run = [&] { step(params, timer.stream); };
    timer.time(run);
    std::vector<uint8_t> p_after(pr.param.bytes.size());
    std::vector<float> m_after(pr.m.size()), v_after(pr.v.size());
    BENCH_CUDA_CHECK(cudaMemcpy(p_after.data(), p.ptr, p_after.size(), cudaMemcpyDeviceToHost));
    BENCH_CUDA_CHECK(cudaMemcpy(m_after.data(), m.ptr, moment_bytes, cudaMemcpyDeviceToHost));
    BENCH_CUDA_CHECK(cudaMemcpy(v_after.data(), v.ptr, moment_bytes, cudaMemcpyDeviceToHost));
    auto check = [&] { return pr.check(p_after, m_after, v_after); };
    if (!bench::check_once(state, case_name("cuda", dtype, tensors), check)) return;
    const double seconds = bench::timed_loop_cuda(state, timer, run);
    bench::set_bandwidth(state, pr.bytes(), seconds, bench::cuda_copy_rate(int64_t(pr.bytes() / 2)));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // e.g. the CUDA kernels are not built
  }
}
#endif  // FLASHLM_WITH_CUDA

using AdamWBench = void (*)(benchmark::State&, DType, int64_t);

void register_device(const std::string& device, AdamWBench bench, std::initializer_list<DType> dtypes,
                     bool manual_time) {
  for (DType dtype : dtypes)
    for (int64_t tensors : {int64_t{1}, g_tensors})
      bench::register_case(case_name(device, dtype, tensors), manual_time, benchmark::kMillisecond, bench, dtype,
                           tensors);
}

void register_all() {
  register_device("cpu", BM_adamw_cpu, {DType::F32, DType::BF16}, false);
  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    register_device("cuda", BM_adamw_cuda, {DType::F32, DType::F16, DType::BF16}, true);
#endif
  });
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_numel = 100'003, g_tensors = 7;
  if (!bench::take_flags(argc, argv, "bench_optim", {{"numel", &g_numel, 1, int64_t{1} << 32},
                                                     {"tensors", &g_tensors, 2, 1 << 20}}))
    return false;
  if (g_tensors > g_numel) {
    std::fprintf(stderr, "bench_optim: --tensors must be at most --numel\n");
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
