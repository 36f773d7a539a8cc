// The check of ALiBi slopes, shared by flash attention (flash_attention.cpp) and paged attention (kvcache/):
// f32 [heads] (one row for every sequence) or [batch, heads], contiguous, on q's device. The values are not
// checked (nor read, on CUDA): any float is a slope.
#pragma once

#include <cstdint>

#include "flashlm/core/error.h"
#include "flashlm/core/tensor.h"

namespace flashlm::attention {
namespace {

// The slopes' batch stride (0: one row for all sequences), or -1 when none were given (data and ndim 0).
inline int64_t check_alibi_slopes(const TensorView& t, int64_t batch, int64_t heads, const Device& device) {
  if (t.data == nullptr && t.ndim == 0) return -1;
  FLASHLM_CHECK(t.dtype == DType::F32, "alibi_slopes: must be float32, got ", dtype_name(t.dtype));
  FLASHLM_CHECK(t.device == device, "alibi_slopes: on a different device than q");
  const bool per_head = t.ndim == 1 && t.shape[0] == heads;
  const bool per_batch = t.ndim == 2 && t.shape[0] == batch && t.shape[1] == heads;
  FLASHLM_CHECK(per_head || per_batch, "alibi_slopes: expected shape [heads] = [", heads, "] or [batch, heads] = [",
                batch, ", ", heads, "], got ", t.shape_string());
  FLASHLM_CHECK(t.is_contiguous(), "alibi_slopes: must be contiguous");
  FLASHLM_CHECK(t.data != nullptr, "alibi_slopes: missing tensor");
  return per_batch ? heads : 0;
}

}  // namespace
}  // namespace flashlm::attention
