/*
bench_dequant: Google Benchmark microbenchmarks of flashlm::dequantize (GGML blocks -> f32/f16/bf16), on the
CPU and, in a CUDA build with a GPU present, on the GPU, each next to its ceiling: a memcpy of the same
output size.

What is measured
  dequant_cpu/<type>/<out>   flashlm::dequantize of a large tensor (16M elements by default, well beyond
                             the caches) of random blocks whose fp16/bf16/f32 scales are finite. Runs on the
                             library's thread pool (FLASHLM_NUM_THREADS) with the run-time ISA (--isa=).
  memcpy_cpu/<out>           memcpy of the f32 (or f16) output size, split over the same thread pool.
  dequant_cuda/<type>/<out>  the same on GPU 0 from cudaMalloc'd buffers, timed with CUDA events.
  memcpy_cuda/<out>          cudaMemcpyAsync device to device of the output size, timed with CUDA events.
  The CUDA benchmarks are only registered when the build has CUDA and cuda_device_count() > 0; the
  context lines at the top say why they are missing otherwise.

Columns
  bytes_per_second  dequant: output bytes written. memcpy: bytes read + written (2 x size), the ceiling.
                    Google Benchmark prints it in binary units (GiB/s).
  read              bytes of blocks read per second (decimal: G/s = GB/s).
  rw                bytes read + written per second (decimal), the figure to hold against memcpy's.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j --target bench_dequant
  build/bench/bench/bench_dequant --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
      --benchmark_report_aggregates_only=true          # medians; interleaving spreads background load
  build/bench/bench/bench_dequant --benchmark_filter='Q4_K|memcpy'              # a subset
  build/bench/bench/bench_dequant --quick        # smoke run, seconds: 1M elements, --benchmark_min_time=0.01
  (libbenchmark 1.7 takes --benchmark_min_time in plain seconds, without the "s" suffix of 1.8.)
Own flags, taken out before Google Benchmark's: --elements=N (rounded up to whole 256-element blocks),
--threads=N, --isa=scalar|avx2 (CPU kernels; default: the best this CPU supports), --quick.

The peer comparison (gguf-py, torch copy) lives in bench/compare_dequant.py; figures in bench/results/dequant.md.
*/
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;
namespace gg = flashlm::gguf;
using bench::SplitMix64;

int64_t g_elements = int64_t{1} << 24;  // 16M: 64 MiB of f32 output

// The source types and, for a few, the 16-bit outputs as well.
const DType kTypes[] = {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0,
                        DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K,
                        DType::Q8_K, DType::IQ4_NL, DType::IQ4_XS, DType::F16, DType::BF16};
const DType kTypesWith16BitOut[] = {DType::Q4_0, DType::Q8_0, DType::Q4_K, DType::Q6_K};

int64_t out_elem_bytes(DType out) { return out == DType::F32 ? 4 : 2; }
const char* out_name(DType out) { return out == DType::F32 ? "f32" : out == DType::F16 ? "f16" : "bf16"; }

// --- random blocks --------------------------------------------------------------------------------------

// Random bit patterns of finite, normal numbers with magnitudes in [2^-8, 2^2): scales of that size keep
// every dequantized value finite, so outputs can be compared bit for bit.
uint16_t random_f16_scale(SplitMix64& rng) {
  uint64_t r = rng.next();
  uint16_t exponent = 15 - 8 + (r & 7);  // bias 15
  return static_cast<uint16_t>(((r >> 3) & 1) << 15 | exponent << 10 | ((r >> 4) & 0x3FF));
}
uint32_t random_f32_scale(SplitMix64& rng) {
  uint64_t r = rng.next();
  uint32_t exponent = 127 - 8 + (r & 7);  // bias 127
  return static_cast<uint32_t>(((r >> 3) & 1) << 31 | exponent << 23 | ((r >> 4) & 0x7FFFFF));
}
// Plain F16/BF16 elements: any finite value (exponent not all ones).
uint16_t random_finite_f16(SplitMix64& rng) {
  uint64_t r = rng.next();
  return static_cast<uint16_t>((r & 0x8000) | (((r >> 16) % 31) << 10) | ((r >> 32) & 0x3FF));
}
uint16_t random_finite_bf16(SplitMix64& rng) {
  uint64_t r = rng.next();
  return static_cast<uint16_t>((r & 0x8000) | (((r >> 16) % 255) << 7) | ((r >> 32) & 0x7F));
}

template <class T>
void put(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof v);
}

// Overwrites the floating-point fields of one block with finite scales (the quants stay random).
void make_scales_finite(DType type, uint8_t* b, SplitMix64& rng) {
  auto f16 = [&](size_t offset) { put(b + offset, random_f16_scale(rng)); };
  switch (type) {
    case DType::Q4_0: f16(offsetof(gg::block_q4_0, d)); break;
    case DType::Q4_1: f16(offsetof(gg::block_q4_1, d)); f16(offsetof(gg::block_q4_1, m)); break;
    case DType::Q5_0: f16(offsetof(gg::block_q5_0, d)); break;
    case DType::Q5_1: f16(offsetof(gg::block_q5_1, d)); f16(offsetof(gg::block_q5_1, m)); break;
    case DType::Q8_0: f16(offsetof(gg::block_q8_0, d)); break;
    case DType::Q2_K: f16(offsetof(gg::block_q2_K, d)); f16(offsetof(gg::block_q2_K, dmin)); break;
    case DType::Q3_K: f16(offsetof(gg::block_q3_K, d)); break;
    case DType::Q4_K: f16(offsetof(gg::block_q4_K, d)); f16(offsetof(gg::block_q4_K, dmin)); break;
    case DType::Q5_K: f16(offsetof(gg::block_q5_K, d)); f16(offsetof(gg::block_q5_K, dmin)); break;
    case DType::Q6_K: f16(offsetof(gg::block_q6_K, d)); break;
    case DType::Q8_K: put(b + offsetof(gg::block_q8_K, d), random_f32_scale(rng)); break;
    case DType::IQ4_NL: f16(offsetof(gg::block_iq4_nl, d)); break;
    case DType::IQ4_XS: f16(offsetof(gg::block_iq4_xs, d)); break;
    case DType::F16: put(b, random_finite_f16(rng)); break;
    case DType::BF16: put(b, random_finite_bf16(rng)); break;
    default: break;
  }
}

// `n` elements of `type` as random blocks. The last one built is kept: Google Benchmark calls a benchmark
// several times (to pick the iteration count, then per repetition), and the same input serves them all.
const std::vector<uint8_t>& random_blocks(DType type, int64_t n) {
  static DType cached_type = DType::F32;
  static int64_t cached_n = -1;
  static std::vector<uint8_t> blocks;
  if (cached_type == type && cached_n == n) return blocks;
  const flashlm::DTypeInfo& info = flashlm::dtype_info(type);
  blocks.assign(static_cast<size_t>(flashlm::storage_bytes(type, n)), 0);
  SplitMix64 rng{0x5EEDull + static_cast<uint64_t>(type)};
  size_t i = 0;
  for (; i + 8 <= blocks.size(); i += 8) put(blocks.data() + i, rng.next());
  for (; i < blocks.size(); ++i) blocks[i] = static_cast<uint8_t>(rng.next());
  for (int64_t b = 0; b < n / info.block_size; ++b) make_scales_finite(type, blocks.data() + b * info.block_bytes, rng);
  cached_type = type;
  cached_n = n;
  return blocks;
}

void set_counters(benchmark::State& state, int64_t read_bytes, int64_t written_bytes, int64_t bytes_processed) {
  const double iters = static_cast<double>(state.iterations());
  state.SetBytesProcessed(state.iterations() * bytes_processed);
  state.counters["read"] = benchmark::Counter(iters * read_bytes, benchmark::Counter::kIsRate,
                                              benchmark::Counter::kIs1000);
  state.counters["rw"] = benchmark::Counter(iters * (read_bytes + written_bytes), benchmark::Counter::kIsRate,
                                            benchmark::Counter::kIs1000);
}

// --- CPU --------------------------------------------------------------------------------------------------

void BM_dequant_cpu(benchmark::State& state, DType type, DType out) {
  const int64_t n = g_elements;
  const std::vector<uint8_t>& src = random_blocks(type, n);
  std::vector<uint8_t> dst(static_cast<size_t>(n * out_elem_bytes(out)));  // zero-filled: pages touched
  const auto src_view = flashlm::TensorView::contiguous(const_cast<uint8_t*>(src.data()), type, {n});
  const auto dst_view = flashlm::TensorView::contiguous(dst.data(), out, {n});
  try {
    flashlm::dequantize(src_view, dst_view);  // warm-up, and a clean skip if this type is not served
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    flashlm::dequantize(src_view, dst_view);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  const int64_t written = static_cast<int64_t>(dst.size());
  set_counters(state, static_cast<int64_t>(src.size()), written, written);
}

void BM_memcpy_cpu(benchmark::State& state, DType out) {
  const int64_t bytes = g_elements * out_elem_bytes(out);
  std::vector<uint8_t> src(static_cast<size_t>(bytes), 1), dst(static_cast<size_t>(bytes), 0);
  // Split as the dequantization is: ranges of >= 64 KiB over the library's pool.
  auto copy = [&] {
    flashlm::parallel_for(bytes, 64 << 10, [&](int64_t begin, int64_t end) {
      std::memcpy(dst.data() + begin, src.data() + begin, static_cast<size_t>(end - begin));
    });
  };
  copy();
  for (auto _ : state) {
    copy();
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, bytes, bytes, 2 * bytes);
}

// --- CUDA -------------------------------------------------------------------------------------------------

#ifdef FLASHLM_WITH_CUDA
using bench::CudaTimer;
using bench::DeviceBuffer;

void BM_dequant_cuda(benchmark::State& state, DType type, DType out) {
  try {
    const int64_t n = g_elements;
    const std::vector<uint8_t>& host = random_blocks(type, n);
    const int64_t written = n * out_elem_bytes(out);
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    DeviceBuffer src(host.size()), dst(static_cast<size_t>(written));
    BENCH_CUDA_CHECK(cudaMemcpy(src.ptr, host.data(), host.size(), cudaMemcpyHostToDevice));
    const flashlm::Device gpu{flashlm::DeviceType::CUDA, 0};
    const auto src_view = flashlm::TensorView::contiguous(src.ptr, type, {n}, gpu);
    const auto dst_view = flashlm::TensorView::contiguous(dst.ptr, out, {n}, gpu);
    CudaTimer timer;
    auto run = [&] { flashlm::dequantize(src_view, dst_view, timer.stream); };
    for (int i = 0; i < 3; ++i) timer.time(run);  // warm-up (module load, clocks)
    for (auto _ : state) state.SetIterationTime(timer.time(run));
    set_counters(state, static_cast<int64_t>(host.size()), written, written);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // e.g. the CUDA kernel is not built for this type yet
  }
}

void BM_memcpy_cuda(benchmark::State& state, DType out) {
  try {
    const int64_t bytes = g_elements * out_elem_bytes(out);
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    DeviceBuffer src(static_cast<size_t>(bytes)), dst(static_cast<size_t>(bytes));
    BENCH_CUDA_CHECK(cudaMemset(src.ptr, 1, static_cast<size_t>(bytes)));
    CudaTimer timer;
    auto run = [&] {
      BENCH_CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                                       timer.stream));
    };
    for (int i = 0; i < 3; ++i) timer.time(run);
    for (auto _ : state) state.SetIterationTime(timer.time(run));
    set_counters(state, bytes, bytes, 2 * bytes);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

#endif  // FLASHLM_WITH_CUDA

// --- registration -----------------------------------------------------------------------------------------

using DequantBench = void (*)(benchmark::State&, DType, DType);
using CopyBench = void (*)(benchmark::State&, DType);

// One device's set: every type to f32, some to f16/bf16, and the copy ceilings. CPU runs are timed by the
// wall clock, CUDA runs by the events each benchmark records (manual time).
void register_device(const std::string& device, DequantBench dequant, CopyBench copy, bool manual_time) {
  auto timing = [&](benchmark::internal::Benchmark* b) { manual_time ? b->UseManualTime() : b->UseRealTime(); };
  auto add = [&](DType type, DType out) {
    const std::string name = "dequant_" + device + "/" + flashlm::dtype_name(type) + "/" + out_name(out);
    timing(benchmark::RegisterBenchmark(name.c_str(), dequant, type, out));
  };
  for (DType type : kTypes) add(type, DType::F32);
  for (DType type : kTypesWith16BitOut)
    for (DType out : {DType::F16, DType::BF16}) add(type, out);
  for (DType out : {DType::F32, DType::F16})
    timing(benchmark::RegisterBenchmark(("memcpy_" + device + "/" + out_name(out)).c_str(), copy, out));
}

void register_all() {
  register_device("cpu", BM_dequant_cpu, BM_memcpy_cpu, false);

  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    register_device("cuda", BM_dequant_cuda, BM_memcpy_cuda, true);
#endif
  });
  benchmark::AddCustomContext("flashlm_elements", std::to_string(g_elements));
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_elements = 1 << 20;
  if (!bench::take_flags(argc, argv, "bench_dequant", {{"elements", &g_elements, 1, int64_t{1} << 40}})) return false;
  g_elements = (g_elements + 255) / 256 * 256;  // whole blocks of every type
  return true;
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
