// Fused AdamW: one pass over a parameter that reads param, grad and both moments and writes param and the
// moments back, with torch.optim.AdamW's semantics (decoupled weight decay, bias-corrected moments):
//   p *= 1 - lr * weight_decay
//   m  = m + (1 - beta1) * (g - m)            (torch: exp_avg.lerp_(g, 1 - beta1))
//   v  = beta2 * v + (1 - beta2) * g * g
//   p += (-lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// g is -grad when maximize is set. The arithmetic is f32; param and grad share a dtype (F32 or BF16 on the
// CPU, F32, F16 or BF16 on CUDA) and the moments are always F32 (a bf16 model keeps f32 optimizer state).
#pragma once

#include <cstdint>
#include <vector>

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::optim {

struct AdamWParams {
  TensorView param;       // updated in place
  TensorView grad;        // same dtype, device and element count as param
  TensorView exp_avg;     // F32, updated in place
  TensorView exp_avg_sq;  // F32, updated in place
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  int64_t step = 1;  // the step count after this update (1 for the first update)
  bool maximize = false;
};

// One parameter. Every view must be contiguous and on one device; `stream` is a cudaStream_t for CUDA views.
FLASHLM_API void adamw_step(const AdamWParams& params, void* stream = nullptr);

// Many parameters in one call (all on one device): on the CPU the elements of all of them are shared out
// over the thread pool together, so a model of many small tensors still keeps every thread busy. Every
// entry is checked before any is updated.
FLASHLM_API void adamw_step_multi(const std::vector<AdamWParams>& params, void* stream = nullptr);

}  // namespace flashlm::optim
