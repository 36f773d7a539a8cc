// The training rope's kernels (flashlm/runtime/rope.h): rope_train.cpp checks the views and routes between the
// scalar kernel (the oracle), AVX2 (bit for bit: the same FMA) and CUDA.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::runtime::detail {

struct RopeArgs {
  DType dtype = DType::F32;
  const void* x = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
  int64_t rows = 0;   // rows of hd: (..., T, heads) flattened
  int64_t T = 0, heads = 0, hd = 0;
  bool transpose = false;
};

// Rows [begin, end).
void rope_rows_scalar(const RopeArgs& a, int64_t begin, int64_t end);
void rope_rows_avx2(const RopeArgs& a, int64_t begin, int64_t end);
void rope_rows_cuda(const RopeArgs& a, int device, void* stream);

}  // namespace flashlm::runtime::detail
