// What the Google Benchmark executables in bench/ share: a seeded generator, their flags (--isa=, --threads=,
// --quick and integer sizes), the context lines (CUDA, ISA, threads), timed loops, the copy ceiling a
// memory-bound kernel is held against, CUDA buffers and event timing, and main's sequence (whose exit status
// says whether every kernel matched its reference: see bench_check.h).
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "flashlm/flashlm.h"

#ifdef FLASHLM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace bench {

struct SplitMix64 {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

// --- flags ---------------------------------------------------------------------------------------------

// Set by --quick, which run_main takes out before the program's own flags: each program then picks small
// sizes, and Google Benchmark gets --benchmark_min_time=0.01 (unless one is given): a CI smoke run of seconds.
inline bool& quick() {
  static bool q = false;
  return q;
}

// Handles --isa=scalar|avx2; false (after a message naming `prog`) for anything else.
inline bool set_isa_flag(const std::string& isa, const char* prog) {
  try {
    if (isa == "scalar") flashlm::set_cpu_isa(flashlm::CpuIsa::Scalar);
    else if (isa == "avx2") flashlm::set_cpu_isa(flashlm::CpuIsa::AVX2);
    else throw std::runtime_error("--isa must be scalar or avx2, got '" + isa + "'");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return false;
  }
  return true;
}

// `--<name>=N` with N an integer in [lo, hi].
struct IntFlag {
  const char* name;
  int64_t* value;
  int64_t lo, hi;
};

// Takes `prog`'s own flags out of argv (Google Benchmark rejects flags it does not know): `flags`, then
// --threads=N (the library's pool) and --isa=; --help lists them before Google Benchmark's. False after a
// message naming the flag when a value is bad.
inline bool take_flags(int* argc, char** argv, const char* prog, std::initializer_list<IntFlag> flags) {
  int kept = 1;
  int64_t threads = 0;
  for (int i = 1; i < *argc; ++i) {
    const std::string arg = argv[i];
    const IntFlag* flag = nullptr;
    const IntFlag threads_flag{"threads", &threads, 1, 1024};
    for (const IntFlag& f : flags)
      if (arg.rfind(std::string("--") + f.name + "=", 0) == 0) flag = &f;
    if (arg.rfind("--threads=", 0) == 0) flag = &threads_flag;
    if (flag) {
      const char* text = arg.c_str() + std::strlen(flag->name) + 3;
      char* end = nullptr;
      const long long v = std::strtoll(text, &end, 10);
      if (*text == '\0' || *end != '\0' || v < flag->lo || v > flag->hi) {
        std::fprintf(stderr, "%s: --%s must be an integer in [%lld, %lld], got '%s'\n", prog, flag->name,
                     static_cast<long long>(flag->lo), static_cast<long long>(flag->hi), text);
        return false;
      }
      *flag->value = v;
    } else if (arg.rfind("--isa=", 0) == 0) {
      if (!set_isa_flag(arg.substr(6), prog)) return false;
    } else {
      if (arg == "--help") {
        std::printf("%s [--quick] [--isa=scalar|avx2] [--threads=N]", prog);
        for (const IntFlag& f : flags)
          std::printf(" [--%s=N (default %lld)]", f.name, static_cast<long long>(*f.value));
        std::printf(" [Google Benchmark flags]\n");
      }
      argv[kept++] = argv[i];
    }
  }
  if (threads > 0) flashlm::set_num_threads(static_cast<int>(threads));
  *argc = kept;
  return true;
}

#ifdef FLASHLM_WITH_CUDA
#define BENCH_CUDA_CHECK(call)                                                                  \
  do {                                                                                          \
    cudaError_t err_ = (call);                                                                  \
    if (err_ != cudaSuccess)                                                                    \
      throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(err_));           \
  } while (0)

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { BENCH_CUDA_CHECK(cudaMalloc(&ptr, bytes)); }
  DeviceBuffer(const void* host, size_t bytes) : DeviceBuffer(bytes) {
    BENCH_CUDA_CHECK(cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// A stream and a pair of events; `time(fn)` returns the seconds the GPU spent on what fn queued.
struct CudaTimer {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  CudaTimer() {
    BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    BENCH_CUDA_CHECK(cudaEventCreate(&start));
    BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~CudaTimer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaStreamDestroy(stream);
  }
  template <class Fn>
  double time(Fn&& fn) {
    BENCH_CUDA_CHECK(cudaEventRecord(start, stream));
    fn();
    BENCH_CUDA_CHECK(cudaEventRecord(stop, stream));
    BENCH_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms * 1e-3;
  }
};

inline std::string gpu_name() {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "?";
  return std::string(prop.name) + ", " + std::to_string(prop.totalGlobalMem >> 30) + " GiB";
}

// The benchmark loop over what fn queues on timer.stream, after 3 warm-ups (module load, clocks), each
// iteration timed by CUDA events: the GPU seconds in all.
template <class Fn>
double timed_loop_cuda(benchmark::State& state, CudaTimer& timer, Fn&& fn) {
  for (int i = 0; i < 3; ++i) timer.time(fn);
  double total = 0;
  for (auto _ : state) {
    const double seconds = timer.time(fn);
    state.SetIterationTime(seconds);
    total += seconds;
  }
  return total;
}

// Bytes read + written per second by a device-to-device cudaMemcpyAsync of `bytes` bytes on GPU 0, the median
// of 5 after a warm-up, measured by each benchmark after its own loop.
inline double cuda_copy_rate(int64_t bytes) {
  DeviceBuffer src(static_cast<size_t>(bytes)), dst(static_cast<size_t>(bytes));
  CudaTimer timer;
  std::vector<double> seconds;
  for (int i = 0; i < 6; ++i) {
    const double t = timer.time([&] {
      BENCH_CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                                       timer.stream));
    });
    if (i >= 1) seconds.push_back(t);
  }
  std::nth_element(seconds.begin(), seconds.begin() + 2, seconds.end());
  return 2.0 * double(bytes) / seconds[2];
}
#endif  // FLASHLM_WITH_CUDA

// Calls register_cuda() when the build has CUDA and a GPU is present, and adds the context lines that say
// which (and why not), the ISA and the thread count.
template <class RegisterCuda>
void register_cuda_and_context(RegisterCuda&& register_cuda) {
  std::string cuda = flashlm::cuda_status();
#ifdef FLASHLM_WITH_CUDA
  if (flashlm::cuda_device_count() > 0) {
    cuda = gpu_name() + " (" + cuda + ")";
    register_cuda();
  } else {
    cuda += "; CUDA benchmarks not run";
  }
#else
  (void)register_cuda;
  cuda += "; CUDA benchmarks not built";
#endif
  benchmark::AddCustomContext("flashlm_cuda", cuda);
  benchmark::AddCustomContext("flashlm_cpu_isa", flashlm::cpu_isa_name(flashlm::cpu_isa()));
  benchmark::AddCustomContext("flashlm_threads", std::to_string(flashlm::num_threads()));
}

// --- timing ----------------------------------------------------------------------------------------------

// The benchmark loop over fn (warmed up and checked before): the wall seconds it took.
template <class Fn>
double timed_loop(benchmark::State& state, Fn&& fn) {
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    fn();
    benchmark::ClobberMemory();
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Bytes read + written per second by a memcpy of `bytes` bytes split over the library's pool in ranges of at
// least 64 KiB (bench_dequant's memcpy_cpu), or made by the calling thread alone (one_thread): the ceiling of
// a kernel that moves as many bytes. The median of 5 copies after a warm-up, measured by each benchmark right
// after its own loop, so that on a shared machine both see about the same background load.
inline double cpu_copy_rate(int64_t bytes, bool one_thread = false) {
  std::vector<uint8_t> src(static_cast<size_t>(bytes), 1), dst(static_cast<size_t>(bytes), 0);
  auto copy = [&](int64_t begin, int64_t end) {
    std::memcpy(dst.data() + begin, src.data() + begin, static_cast<size_t>(end - begin));
  };
  std::vector<double> seconds;
  for (int i = 0; i < 6; ++i) {
    const auto start = std::chrono::steady_clock::now();
    if (one_thread) copy(0, bytes);
    else flashlm::parallel_for(bytes, 64 << 10, copy);
    benchmark::DoNotOptimize(dst.data());
    if (i >= 1) seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(seconds.begin(), seconds.begin() + 2, seconds.end());
  return 2.0 * double(bytes) / seconds[2];
}

// The counters of a memory-bound kernel that moved `bytes_per_iter` per iteration in `seconds` in all:
// "bytes" (moved per second, decimal) and "pct_copy" (that rate as a percentage of `ceiling`, bytes moved per
// second by a copy in the same run).
inline void set_bandwidth(benchmark::State& state, double bytes_per_iter, double seconds, double ceiling) {
  const double iters = static_cast<double>(state.iterations());
  state.counters["bytes"] = benchmark::Counter(iters * bytes_per_iter, benchmark::Counter::kIsRate,
                                               benchmark::Counter::kIs1000);
  if (seconds > 0 && ceiling > 0) state.counters["pct_copy"] = 100.0 * iters * bytes_per_iter / seconds / ceiling;
}

// Registers fn(state, args...) as `name`, in `unit`, timed by the wall clock or (manual_time: CUDA) by the
// times its iterations report.
template <class Fn, class... Args>
void register_case(const std::string& name, bool manual_time, benchmark::TimeUnit unit, Fn fn, Args... args) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), fn, args...);
  b->Unit(unit);
  manual_time ? b->UseManualTime() : b->UseRealTime();
}

// --- main -------------------------------------------------------------------------------------------------

// Whether every kernel checked in this run matched its reference (bench_check.h); main's exit status.
inline bool& all_checks_passed() {
  static bool ok = true;
  return ok;
}

// main: --quick, this program's flags (taken out of argv first: Google Benchmark rejects flags it does not
// know), then Google Benchmark's, the registrations, the run. Exits 1 when a kernel did not match its
// reference, 2 on a bad flag.
inline int run_main(int argc, char** argv, bool (*parse_own_flags)(int*, char**), void (*register_all)()) {
  std::vector<char*> args;
  bool min_time_given = false;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--quick") == 0) {
      quick() = true;
      continue;
    }
    min_time_given = min_time_given || std::strncmp(argv[i], "--benchmark_min_time", 20) == 0;
    args.push_back(argv[i]);
  }
  static char smoke_min_time[] = "--benchmark_min_time=0.01";  // libbenchmark 1.7: plain seconds
  if (quick() && !min_time_given) args.push_back(smoke_min_time);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  if (!parse_own_flags(&n, args.data())) return 2;
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 2;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!all_checks_passed()) {
    std::fprintf(stderr, "%s: a kernel did not match its reference (above); its figures are not reported\n", argv[0]);
    return 1;
  }
  return 0;
}

}  // namespace bench
