/*
bench_int_gemm: Google Benchmark microbenchmarks of flashlm's integer GEMMs (flashlm/gemm/int_gemm.h) on the
CPU and, in a CUDA build with a GPU present, on the GPU.

What is measured (y = x @ W.T, W [N, K]; N = K = --size, 4096 by default)
  int8_gemm_cpu/M     flashlm::int8_gemm: int8 x (already quantized) times int8 W, f32 out. GFLOP/s (2MNK).
  quantize_cpu/M      flashlm::quantize_per_token of f32 x [M, K].
  int4_gemm_cpu/M     flashlm::int4_gemm, f32 x, symmetric int4 W, group 128. "read": weight bytes read per
                      second (packed nibbles + f32 scales), the figure that bounds M = 1.
  *_cuda/M            the same on GPU 0 with f16 x/out, timed with CUDA events.
Threads: the library's pool (FLASHLM_NUM_THREADS or --threads=); ISA: --isa=scalar|avx2 (default: the best this
CPU has).
The peer comparison (torch) lives in bench/compare_int_gemm.py; figures in bench/results/int_gemm.md.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j --target bench_int_gemm
  build/bench/bench/bench_int_gemm --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_int_gemm --quick        # smoke run, seconds: --size=512 --benchmark_min_time=0.01
*/
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;

int64_t g_size = 4096;

template <class T>
std::vector<T> random_vector(size_t n, uint64_t seed, int lo, int hi) {
  bench::SplitMix64 rng{seed};
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(lo + static_cast<int>(rng.next() % uint64_t(hi - lo + 1)));
  return v;
}

std::vector<float> random_floats(size_t n, uint64_t seed, float scale) {
  bench::SplitMix64 rng{seed};
  std::vector<float> v(n);
  for (auto& e : v) e = scale * (static_cast<float>(rng.next() >> 40) / float(1 << 24) - 0.5f);
  return v;
}

void set_counters(benchmark::State& state, int64_t M, int64_t weight_bytes) {
  const double iters = static_cast<double>(state.iterations());
  state.counters["flops"] = benchmark::Counter(iters * 2.0 * M * g_size * g_size, benchmark::Counter::kIsRate,
                                               benchmark::Counter::kIs1000);
  state.counters["read"] = benchmark::Counter(iters * weight_bytes, benchmark::Counter::kIsRate,
                                              benchmark::Counter::kIs1000);
}

// The buffers of one case, on the host (device copies are made by the CUDA benchmarks).
struct Int8Case {
  int64_t M, N, K;
  std::vector<int8_t> x, w;
  std::vector<float> xs, ws;
  explicit Int8Case(int64_t m)
      : M(m), N(g_size), K(g_size), x(random_vector<int8_t>(size_t(M * K), 1, -127, 127)),
        w(random_vector<int8_t>(size_t(N * K), 2, -127, 127)), xs(random_floats(size_t(M), 3, 0.01f)),
        ws(random_floats(size_t(N), 4, 0.01f)) {}
  flashlm::Int8GemmParams params(void* x_, void* xs_, void* w_, void* ws_, void* out, DType out_dtype,
                                 flashlm::Device dev) const {
    flashlm::Int8GemmParams p;
    p.x = TensorView::contiguous(x_, DType::I8, {M, K}, dev);
    p.x_scales = TensorView::contiguous(xs_, DType::F32, {M}, dev);
    p.w = TensorView::contiguous(w_, DType::I8, {N, K}, dev);
    p.w_scales = TensorView::contiguous(ws_, DType::F32, {N}, dev);
    p.out = TensorView::contiguous(out, out_dtype, {M, N}, dev);
    return p;
  }
};

struct Int4Case {
  int64_t M, N, K, G = 128;
  std::vector<float> x, scales;
  std::vector<uint8_t> w;
  explicit Int4Case(int64_t m)
      : M(m), N(g_size), K(g_size), x(random_floats(size_t(M * K), 5, 2.f)),
        scales(random_floats(size_t(N * K / G), 6, 0.1f)), w(random_vector<uint8_t>(size_t(N * K / 2), 7, 0, 255)) {}
  int64_t weight_bytes() const { return N * K / 2 + 4 * N * K / G; }
  flashlm::Int4GemmParams params(void* x_, void* w_, void* s_, void* out, DType dtype, flashlm::Device dev) const {
    flashlm::Int4GemmParams p;
    p.x = TensorView::contiguous(x_, dtype, {M, K}, dev);
    p.w = TensorView::contiguous(w_, DType::U8, {N, K / 2}, dev);
    p.scales = TensorView::contiguous(s_, DType::F32, {N, K / G}, dev);
    p.out = TensorView::contiguous(out, dtype, {M, N}, dev);
    p.group_size = G;
    return p;
  }
};

template <class Fn>
void run_cpu(benchmark::State& state, Fn&& fn) {
  try {
    fn();  // warm-up
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    fn();
    benchmark::ClobberMemory();
  }
}

void BM_int8_gemm_cpu(benchmark::State& state) {
  Int8Case c(state.range(0));
  std::vector<float> out(size_t(c.M * c.N));
  const auto p = c.params(c.x.data(), c.xs.data(), c.w.data(), c.ws.data(), out.data(), DType::F32, {});
  run_cpu(state, [&] { flashlm::int8_gemm(p); });
  set_counters(state, c.M, c.N * c.K);
}

void BM_quantize_cpu(benchmark::State& state) {
  const int64_t M = state.range(0), K = g_size;
  std::vector<float> x = random_floats(size_t(M * K), 8, 4.f);
  std::vector<float> scales(static_cast<size_t>(M));
  std::vector<int8_t> q(size_t(M * K));
  flashlm::QuantizePerTokenParams p;
  p.x = TensorView::contiguous(x.data(), DType::F32, {M, K});
  p.q = TensorView::contiguous(q.data(), DType::I8, {M, K});
  p.scales = TensorView::contiguous(scales.data(), DType::F32, {M});
  run_cpu(state, [&] { flashlm::quantize_per_token(p); });
  state.counters["read"] = benchmark::Counter(double(state.iterations()) * 4 * M * K, benchmark::Counter::kIsRate,
                                              benchmark::Counter::kIs1000);
}

void BM_int4_gemm_cpu(benchmark::State& state) {
  Int4Case c(state.range(0));
  std::vector<float> out(size_t(c.M * c.N));
  const auto p = c.params(c.x.data(), c.w.data(), c.scales.data(), out.data(), DType::F32, {});
  run_cpu(state, [&] { flashlm::int4_gemm(p); });
  set_counters(state, c.M, c.weight_bytes());
}

#ifdef FLASHLM_WITH_CUDA
using bench::CudaTimer;
using bench::DeviceBuffer;
const flashlm::Device kGpu{flashlm::DeviceType::CUDA, 0};

template <class Fn>
void run_cuda(benchmark::State& state, CudaTimer& timer, Fn&& fn) {
  for (int i = 0; i < 3; ++i) timer.time(fn);  // warm-up (module load, clocks)
  for (auto _ : state) state.SetIterationTime(timer.time(fn));
}

void BM_int8_gemm_cuda(benchmark::State& state) {
  try {
    Int8Case c(state.range(0));
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    DeviceBuffer x(c.x.data(), c.x.size()), xs(c.xs.data(), 4 * c.xs.size()), w(c.w.data(), c.w.size()),
        ws(c.ws.data(), 4 * c.ws.size()), out(size_t(2 * c.M * c.N));
    const auto p = c.params(x.ptr, xs.ptr, w.ptr, ws.ptr, out.ptr, DType::F16, kGpu);
    CudaTimer timer;
    run_cuda(state, timer, [&] { flashlm::int8_gemm(p, timer.stream); });
    set_counters(state, c.M, c.N * c.K);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_int4_gemm_cuda(benchmark::State& state) {
  try {
    Int4Case c(state.range(0));
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    std::vector<uint16_t> x_half(c.x.size(), 0x3C00);  // 1.0 in f16: the values do not change the time
    DeviceBuffer x(x_half.data(), 2 * x_half.size()), w(c.w.data(), c.w.size()),
        s(c.scales.data(), 4 * c.scales.size()), out(size_t(2 * c.M * c.N));
    const auto p = c.params(x.ptr, w.ptr, s.ptr, out.ptr, DType::F16, kGpu);
    CudaTimer timer;
    run_cuda(state, timer, [&] { flashlm::int4_gemm(p, timer.stream); });
    set_counters(state, c.M, c.weight_bytes());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
#endif

void register_all() {
  for (int64_t m : {1, 16, 128}) benchmark::RegisterBenchmark("int8_gemm_cpu", BM_int8_gemm_cpu)->Arg(m)->UseRealTime();
  for (int64_t m : {1, 128}) benchmark::RegisterBenchmark("quantize_cpu", BM_quantize_cpu)->Arg(m)->UseRealTime();
  for (int64_t m : {1, 4, 16}) benchmark::RegisterBenchmark("int4_gemm_cpu", BM_int4_gemm_cpu)->Arg(m)->UseRealTime();
  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    for (int64_t m : {1, 8, 128, 2048})
      benchmark::RegisterBenchmark("int8_gemm_cuda", BM_int8_gemm_cuda)->Arg(m)->UseManualTime();
    for (int64_t m : {1, 2, 4, 8, 16, 32, 128})
      benchmark::RegisterBenchmark("int4_gemm_cuda", BM_int4_gemm_cuda)->Arg(m)->UseManualTime();
#endif
  });
  benchmark::AddCustomContext("flashlm_size", std::to_string(g_size));
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_size = 512;
  if (!bench::take_flags(argc, argv, "bench_int_gemm", {{"size", &g_size, 128, 1 << 20}})) return false;
  if (g_size % 128 != 0) {
    std::fprintf(stderr, "bench_int_gemm: --size must be a multiple of 128, got %lld\n",
                 static_cast<long long>(g_size));
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
