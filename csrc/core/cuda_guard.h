// Internal CUDA runtime helpers shared by the .cu/.cpp files that call the runtime: a guard that makes a
// device current for a scope, and stream-ordered scratch. (Not a public header: the public API takes device
// indices and streams.)
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "flashlm/core/error.h"

namespace flashlm {

// Throws flashlm::Error "<what>: <CUDA's message>" unless err is cudaSuccess.
inline void throw_on_cuda_error(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw Error(what + ": " + cudaGetErrorString(err));
}

// Stream-ordered scratch (cudaMallocAsync into ptr) freed on its stream when the owner goes out of scope: after
// the launches that use it, or when one of them has thrown.
struct StreamScratch {
  void* ptr = nullptr;
  cudaStream_t stream;
  ~StreamScratch() {
    if (ptr != nullptr) cudaFreeAsync(ptr, stream);
  }
};

// Makes `device` current for its lifetime and restores the previous one.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    throw_on_cuda_error(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) throw_on_cuda_error(cudaSetDevice(device), "cudaSetDevice");
  }
  ~CudaDeviceGuard() { cudaSetDevice(previous_); }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace flashlm
