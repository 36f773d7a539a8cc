// The CPU backward passes' sums over rows (a norm's weight and bias gradients): each block of rows sums into
// its own f32 rows, and the blocks are added in order, so the result does not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "flashlm/core/thread_pool.h"

namespace flashlm::norm::detail {

// outputs: kOutputs f32 vectors [d] (nullptr: not wanted), written. fn(r0, r1, partial) runs the rows
// [r0, r1) of one block, adding into partial[k] (kOutputs zeroed f32 [d] rows; partial[k] is a scratch row
// where outputs[k] is nullptr).
template <size_t kOutputs, class Fn>
void sum_row_blocks(int64_t rows, int64_t d, float* const (&outputs)[kOutputs], Fn fn) {
  // At most kBlocks blocks of at least kMinBlockRows rows; pool ranges of about kGrainElements elements.
  constexpr int64_t kBlocks = 64, kMinBlockRows = 16, kGrainElements = 32768;
  if (d == 0) return;
  const int64_t block_rows = std::max(kMinBlockRows, (rows + kBlocks - 1) / kBlocks);
  const int64_t blocks = std::max<int64_t>(1, (rows + block_rows - 1) / block_rows);
  const int64_t stride = int64_t(kOutputs) * d;  // one block's rows
  std::vector<float> partial(size_t(blocks * stride), 0.0f);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (block_rows * d));
  parallel_for(blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* rows_of_block[kOutputs];
      for (size_t k = 0; k < kOutputs; ++k) rows_of_block[k] = partial.data() + b * stride + int64_t(k) * d;
      fn(b * block_rows, std::min(rows, (b + 1) * block_rows), rows_of_block);
    }
  });
  for (size_t k = 0; k < kOutputs; ++k) {
    if (!outputs[k]) continue;
    for (int64_t i = 0; i < d; ++i) {
      float sum = partial[size_t(int64_t(k) * d + i)];
      for (int64_t b = 1; b < blocks; ++b) sum += partial[size_t(b * stride + int64_t(k) * d + i)];
      outputs[k][i] = sum;
    }
  }
}

}  // namespace flashlm::norm::detail
