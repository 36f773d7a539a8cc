/*
bench_gguf_matmul: Google Benchmark microbenchmarks of flashlm::gguf_matmul (y = x @ W.T with W in GGML
blocks), on the CPU and, in a CUDA build with a GPU present, on the GPU.

What is measured
  gguf_matmul_cpu/<type>/M<m>   x [M, K] f32 times W [N, K] of random blocks (finite scales), on the
                                library's thread pool with the run-time ISA (--isa=). Weights are cold: each
                                iteration uses the next of several copies of W totalling >= --rotate-mib
                                (default 256 MiB, beyond the last-level cache), as a decoder reads each
                                layer's weights once per token.
  gguf_matmul_repacked_cpu/<type>/M<m>  the same for Q4_0, Q8_0, Q4_K, Q6_K with W regrouped (gguf_repack) and
                                multiplied by gguf_matmul_repacked, as the native decoder does.
  gguf_matmul_cuda/<type>/M<m>  the same with f16 x on GPU 0, timed with CUDA events (one copy of W: an
                                H100's 50 MiB L2 is smaller than the 4096 x 11008 weights of the default
                                shapes' larger cases, not the 4096 x 4096 ones; say --n/--k accordingly).
  The ceiling (memcpy on the same pool / device) is bench_dequant's memcpy_cpu and memcpy_cuda.

Columns
  read   weight bytes read per second (decimal G/s = GB/s): against memcpy's rw for M = 1, which is
         memory-bound.
  macs   multiply-adds per second (M * N * K).

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j --target bench_gguf_matmul bench_dequant
  build/bench/bench/bench_gguf_matmul --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_dequant --benchmark_filter=memcpy_cpu/f32          # the ceiling
  build/bench/bench/bench_gguf_matmul --quick   # smoke: --n=256 --k=512 --rotate-mib=0 --benchmark_min_time=0.01
Own flags, taken out before Google Benchmark's: --n=N --k=K (default 4096 x 4096; K a multiple of 256),
--rotate-mib=MiB, --threads=N, --isa=scalar|avx2, --quick.

The comparison with torch's GEMV lives in bench/compare_gguf_matmul.py; figures in bench/results/gguf_matmul.md.
*/
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "bench_common.h"
#include "flashlm/flashlm.h"
#include "flashlm/gemm/gguf_matmul.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;

int64_t g_n = 4096, g_k = 4096, g_rotate_mib = 256;

const DType kTypes[] = {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0,
                        DType::Q4_K, DType::Q5_K, DType::Q6_K};
const int64_t kRows[] = {1, 16, 128};

// Byte offsets of each block's IEEE-half scale fields (ggml-common.h): random bytes there could be NaN.
std::vector<int> half_fields(DType type) {
  if (type == DType::Q4_1 || type == DType::Q5_1 || type == DType::Q4_K || type == DType::Q5_K) return {0, 2};
  if (type == DType::Q6_K) return {208};
  return {0};
}

// N x K of `type` as random blocks whose scales are random halves in +-[2^-8, 2^-4).
std::vector<uint8_t> random_weights(DType type, uint64_t seed) {
  const flashlm::DTypeInfo& info = flashlm::dtype_info(type);
  std::vector<uint8_t> w(static_cast<size_t>(flashlm::storage_bytes(type, g_n * g_k)));
  bench::SplitMix64 rng{seed};
  for (auto& byte : w) byte = static_cast<uint8_t>(rng.next());
  const std::vector<int> fields = half_fields(type);
  for (size_t b = 0; b < w.size(); b += static_cast<size_t>(info.block_bytes)) {
    for (int offset : fields) {
      const uint64_t r = rng.next();
      const uint16_t h = static_cast<uint16_t>((r & 1) << 15 | (7 + (r >> 1) % 4) << 10 | ((r >> 8) & 0x3FF));
      std::memcpy(&w[b + offset], &h, 2);
    }
  }
  return w;
}

void set_counters(benchmark::State& state, int64_t weight_bytes, int64_t m) {
  const double iters = static_cast<double>(state.iterations());
  state.counters["read"] = benchmark::Counter(iters * weight_bytes, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["macs"] = benchmark::Counter(iters * m * g_n * g_k, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

// repacked: the weights regrouped (gguf_repack) and multiplied by gguf_matmul_repacked, as the native decoder
// keeps and multiplies Q4_0/Q8_0/Q4_K/Q6_K weights.
void BM_gguf_matmul_cpu(benchmark::State& state, DType type, int64_t m, bool repacked) {
  std::vector<uint8_t> first = random_weights(type, 0x5EED + static_cast<uint64_t>(type));
  if (repacked) {
    std::vector<uint8_t> plain = first;
    const int64_t size = static_cast<int64_t>(first.size());
    flashlm::gguf_repack(TensorView::contiguous(plain.data(), DType::U8, {size}),
                         TensorView::contiguous(first.data(), DType::U8, {size}), type, g_n, g_k, true);
  }
  const int64_t bytes = static_cast<int64_t>(first.size());
  const int64_t copies = std::max<int64_t>(1, ((g_rotate_mib << 20) + bytes - 1) / bytes);
  std::vector<std::vector<uint8_t>> ws(static_cast<size_t>(copies), first);
  std::vector<float> x(static_cast<size_t>(m * g_k)), y(static_cast<size_t>(m * g_n));
  bench::SplitMix64 rng{1};
  for (auto& v : x) v = static_cast<float>(static_cast<int64_t>(rng.next() >> 40) - (1 << 23)) / (1 << 23);
  const TensorView xv = TensorView::contiguous(x.data(), DType::F32, {m, g_k});
  const TensorView yv = TensorView::contiguous(y.data(), DType::F32, {m, g_n});
  size_t i = 0;
  auto run = [&] {
    const TensorView wv = TensorView::contiguous(ws[i].data(), DType::U8, {bytes});
    if (repacked) flashlm::gguf_matmul_repacked(xv, wv, type, g_n, nullptr, yv);
    else flashlm::gguf_matmul(xv, wv, type, g_n, nullptr, yv);
    i = (i + 1) % ws.size();
  };
  bool ok = true;
  try {
    run();  // warm-up, and a clean skip for what the build or this type does not serve
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    ok = false;
  }
  for (auto _ : state) {
    if (!ok) break;
    run();
    benchmark::DoNotOptimize(y.data());
  }
  if (ok) set_counters(state, bytes, m);
}

#ifdef FLASHLM_WITH_CUDA
void BM_gguf_matmul_cuda(benchmark::State& state, DType type, int64_t m) {
  try {
    const std::vector<uint8_t> host = random_weights(type, 0x5EED + static_cast<uint64_t>(type));
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    bench::DeviceBuffer w(host.data(), host.size()), x(static_cast<size_t>(m * g_k * 2)), y(static_cast<size_t>(m * g_n * 2));
    BENCH_CUDA_CHECK(cudaMemset(x.ptr, 0x3C, static_cast<size_t>(m * g_k * 2)));  // halves of ~1.06
    const flashlm::Device gpu{flashlm::DeviceType::CUDA, 0};
    const TensorView wv = TensorView::contiguous(w.ptr, DType::U8, {static_cast<int64_t>(host.size())}, gpu);
    const TensorView xv = TensorView::contiguous(x.ptr, DType::F16, {m, g_k}, gpu);
    const TensorView yv = TensorView::contiguous(y.ptr, DType::F16, {m, g_n}, gpu);
    bench::CudaTimer timer;
    auto run = [&] { flashlm::gguf_matmul(xv, wv, type, g_n, nullptr, yv, timer.stream); };
    for (int i = 0; i < 3; ++i) timer.time(run);
    for (auto _ : state) state.SetIterationTime(timer.time(run));
    set_counters(state, static_cast<int64_t>(host.size()), m);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
#endif

void register_all() {
  for (DType type : kTypes) {
    for (int64_t m : kRows) {
      const std::string name = std::string("gguf_matmul_cpu/") + flashlm::dtype_name(type) + "/M" + std::to_string(m);
      benchmark::RegisterBenchmark(name.c_str(), BM_gguf_matmul_cpu, type, m, false)->UseRealTime();
    }
  }
  for (DType type : {DType::Q4_0, DType::Q8_0, DType::Q4_K, DType::Q6_K}) {
    for (int64_t m : kRows) {
      const std::string name = std::string("gguf_matmul_repacked_cpu/") + flashlm::dtype_name(type) + "/M" +
                               std::to_string(m);
      benchmark::RegisterBenchmark(name.c_str(), BM_gguf_matmul_cpu, type, m, true)->UseRealTime();
    }
  }
  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    for (DType type : kTypes) {
      for (int64_t m : kRows) {
        const std::string name = std::string("gguf_matmul_cuda/") + flashlm::dtype_name(type) + "/M" + std::to_string(m);
        benchmark::RegisterBenchmark(name.c_str(), BM_gguf_matmul_cuda, type, m)->UseManualTime();
      }
    }
#endif
  });
  benchmark::AddCustomContext("flashlm_shape", std::to_string(g_n) + " x " + std::to_string(g_k));
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_n = 256, g_k = 512, g_rotate_mib = 0;
  if (!bench::take_flags(argc, argv, "bench_gguf_matmul", {{"n", &g_n, 1, 1 << 24}, {"k", &g_k, 256, 1 << 24},
                                                            {"rotate-mib", &g_rotate_mib, 0, 1 << 20}}))
    return false;
  if (g_k % 256) {
    std::fprintf(stderr, "bench_gguf_matmul: --k must be a multiple of 256, got %lld\n", static_cast<long long>(g_k));
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
