// What the Google Benchmark executables in bench/ share: a seeded generator, the --isa= flag, the context
// lines (CUDA, ISA, threads), CUDA buffers and event timing, and main's sequence.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

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

// main: this program's flags (taken out of argv first: Google Benchmark rejects flags it does not know),
// then Google Benchmark's, the registrations, the run.
inline int run_main(int argc, char** argv, bool (*parse_own_flags)(int*, char**), void (*register_all)()) {
  if (!parse_own_flags(&argc, argv)) return 2;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace bench
