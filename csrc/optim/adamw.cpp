// AdamW dispatcher: checks every argument (naming it), computes the step's scalars once in double and runs
// the CUDA kernel or the CPU kernel (AVX2 where cpu_isa() allows, else scalar) on the thread pool. The
// multi-tensor entry concatenates its parameters' elements into one index range, so the pool's ranges
// cross tensor boundaries and many small tensors cost one parallel_for.
// Reference: torch.optim.AdamW (tests/test_adamw.py).
#include "flashlm/optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "adamw_kernels.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"

namespace flashlm::optim {
namespace {

using detail::AdamWScalars;

// Elements per pool range: 64 Ki f32 elements move 1.8 MB, enough that the split costs nothing.
constexpr int64_t kGrain = int64_t(1) << 16;

void check_view(const TensorView& t, const std::string& name, const TensorView& param) {
  FLASHLM_CHECK(t.device == param.device, name, ": must be on the same device as param");
  FLASHLM_CHECK(t.is_contiguous(), name, ": must be contiguous, got shape ", t.shape_string());
  FLASHLM_CHECK(t.numel() == param.numel(), name, ": has ", t.numel(), " elements, param has ", param.numel());
  FLASHLM_CHECK(t.numel() == 0 || t.data != nullptr, name, ": null data");
}

void check_params(const AdamWParams& a, const std::string& where) {
  const TensorView& p = a.param;
  const bool cuda = p.device.is_cuda();
  const bool dtype_ok = p.dtype == DType::F32 || p.dtype == DType::BF16 || (cuda && p.dtype == DType::F16);
  FLASHLM_CHECK(dtype_ok, where, "param: dtype must be F32 or BF16", cuda ? " or F16" : " on the CPU", ", got ",
                dtype_name(p.dtype));
  FLASHLM_CHECK(p.is_contiguous(), where, "param: must be contiguous, got shape ", p.shape_string());
  FLASHLM_CHECK(p.numel() == 0 || p.data != nullptr, where, "param: null data");
  FLASHLM_CHECK(a.grad.dtype == p.dtype, where, "grad: dtype ", dtype_name(a.grad.dtype), " differs from param's ",
                dtype_name(p.dtype));
  FLASHLM_CHECK(a.exp_avg.dtype == DType::F32, where, "exp_avg: dtype must be F32, got ", dtype_name(a.exp_avg.dtype));
  FLASHLM_CHECK(a.exp_avg_sq.dtype == DType::F32, where, "exp_avg_sq: dtype must be F32, got ",
                dtype_name(a.exp_avg_sq.dtype));
  check_view(a.grad, where + "grad", p);
  check_view(a.exp_avg, where + "exp_avg", p);
  check_view(a.exp_avg_sq, where + "exp_avg_sq", p);
  FLASHLM_CHECK(std::isfinite(a.lr) && a.lr >= 0.0, where, "lr: must be finite and >= 0, got ", a.lr);
  FLASHLM_CHECK(a.beta1 >= 0.0 && a.beta1 < 1.0, where, "beta1: must be in [0, 1), got ", a.beta1);
  FLASHLM_CHECK(a.beta2 >= 0.0 && a.beta2 < 1.0, where, "beta2: must be in [0, 1), got ", a.beta2);
  FLASHLM_CHECK(std::isfinite(a.eps) && a.eps >= 0.0, where, "eps: must be finite and >= 0, got ", a.eps);
  FLASHLM_CHECK(std::isfinite(a.weight_decay) && a.weight_decay >= 0.0, where,
                "weight_decay: must be finite and >= 0, got ", a.weight_decay);
  FLASHLM_CHECK(a.step >= 1, where, "step: must be >= 1 (the count after this update), got ", a.step);
  if (cuda) {
    FLASHLM_CHECK(cuda_compiled(), where, "param: a CUDA tensor, but flashlm was built without CUDA");
    FLASHLM_CHECK(p.device.index >= 0 && p.device.index < cuda_device_count(), where, "param: no CUDA device ",
                  p.device.index, " (", cuda_status(), ")");
  }
}

// torch computes these in Python floats (double) and rounds them to f32 when it applies them to f32 tensors.
AdamWScalars scalars_of(const AdamWParams& a) {
  const double step = double(a.step);
  const double bc1 = 1.0 - std::pow(a.beta1, step);
  const double bc2 = 1.0 - std::pow(a.beta2, step);
  AdamWScalars s;
  s.apply_decay = a.weight_decay != 0.0;
  s.decay = float(1.0 - a.lr * a.weight_decay);
  s.one_minus_beta1 = float(1.0 - a.beta1);
  s.beta2 = float(a.beta2);
  s.one_minus_beta2 = float(1.0 - a.beta2);
  s.neg_step_size = float(-(a.lr / bc1));
  s.bc2_sqrt = float(std::sqrt(bc2));
  s.eps = float(a.eps);
  s.maximize = a.maximize;
  return s;
}

void run_cpu_kernel(DType dtype, void* p, const void* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
  if (cpu_isa() == CpuIsa::AVX2) {
    detail::adamw_avx2(dtype, p, g, m, v, n, s);
    return;
  }
#endif
  detail::adamw_scalar(dtype, p, g, m, v, n, s);
}

// Elements [begin, end) of parameter a.
void update_range(const AdamWParams& a, const AdamWScalars& s, int64_t begin, int64_t end) {
  const int64_t esize = a.param.dtype == DType::F32 ? 4 : 2;
  run_cpu_kernel(a.param.dtype, static_cast<char*>(a.param.data) + begin * esize,
                 static_cast<const char*>(a.grad.data) + begin * esize, static_cast<float*>(a.exp_avg.data) + begin,
                 static_cast<float*>(a.exp_avg_sq.data) + begin, end - begin, s);
}

void run_cpu(const std::vector<AdamWParams>& params, const std::vector<AdamWScalars>& scalars) {
  // offsets[i]: where parameter i starts in the concatenation of all of them.
  std::vector<int64_t> offsets(params.size() + 1, 0);
  for (size_t i = 0; i < params.size(); ++i) offsets[i + 1] = offsets[i] + params[i].param.numel();
  parallel_for(offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
    // The last parameter starting at or before `begin` (empty parameters share their offset with the next).
    size_t i = size_t(std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin()) - 1;
    while (begin < end && i < params.size()) {
      const int64_t stop = std::min(end, offsets[i + 1]);
      if (stop > begin) update_range(params[i], scalars[i], begin - offsets[i], stop - offsets[i]);
      begin = std::max(begin, stop);
      ++i;
    }
  });
}

}  // namespace

void adamw_step_multi(const std::vector<AdamWParams>& params, void* stream) {
  if (params.empty()) return;
  const Device device = params[0].param.device;
  std::vector<AdamWScalars> scalars;
  scalars.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string where = params.size() == 1 ? "adamw_step: " : "adamw_step: params[" + std::to_string(i) + "].";
    check_params(params[i], where);
    FLASHLM_CHECK(params[i].param.device == device, where, "param: every parameter must be on one device");
    scalars.push_back(scalars_of(params[i]));
  }
  if (device.is_cuda()) {
    for (size_t i = 0; i < params.size(); ++i) {
      const AdamWParams& a = params[i];
      if (a.param.numel() == 0) continue;
      detail::adamw_cuda(a.param.dtype, a.param.data, a.grad.data, static_cast<float*>(a.exp_avg.data),
                         static_cast<float*>(a.exp_avg_sq.data), a.param.numel(), scalars[i], device.index, stream);
    }
    return;
  }
  run_cpu(params, scalars);
}

void adamw_step(const AdamWParams& params, void* stream) { adamw_step_multi({params}, stream); }

}  // namespace flashlm::optim

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::optim::detail {
void adamw_cuda(DType, void*, const void*, float*, float*, int64_t, const AdamWScalars&, int, void*) {
  throw NotImplementedError("adamw_step: flashlm was built without CUDA");
}
}  // namespace flashlm::optim::detail
#endif
