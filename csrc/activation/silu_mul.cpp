// silu_mul dispatcher: checks the views (naming them) and runs the CUDA kernel or the CPU kernel (AVX2 where
// cpu_isa() allows, else scalar), shared out over the thread pool only for large calls.
#include "flashlm/activation/silu_mul.h"

#include <cstdint>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "silu_mul_kernels.h"

namespace flashlm::activation {
namespace {

// Elements per pool range: a decode step's MLP (a few thousand values, ~1 us with AVX2) stays on the caller.
constexpr int64_t kGrainElements = 32768;

void check_like(const TensorView& t, const char* name, const TensorView& gate) {
  FLASHLM_CHECK(t.ndim == gate.ndim, name, ": shape ", t.shape_string(), " differs from gate's ", gate.shape_string());
  for (int d = 0; d < t.ndim; ++d)
    FLASHLM_CHECK(t.shape[d] == gate.shape[d], name, ": shape ", t.shape_string(), " differs from gate's ",
                  gate.shape_string());
  FLASHLM_CHECK(t.dtype == gate.dtype, name, ": dtype ", dtype_name(t.dtype), " differs from gate's ",
                dtype_name(gate.dtype));
  FLASHLM_CHECK(t.device == gate.device, name, ": must be on gate's device");
  FLASHLM_CHECK(t.is_contiguous(), name, ": must be contiguous");
  FLASHLM_CHECK(t.numel() == 0 || t.data, name, ": null data");
}

// out may be gate or up exactly, but not overlap either in part.
void check_out(const TensorView& out, const TensorView& in, const char* name) {
  const auto o = reinterpret_cast<uintptr_t>(out.data), i = reinterpret_cast<uintptr_t>(in.data);
  const auto bytes = static_cast<uintptr_t>(out.nbytes());
  FLASHLM_CHECK(o == i || o + bytes <= i || i + bytes <= o, "out: overlaps ", name, " (it may be ", name, " itself)");
}

}  // namespace

void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out, void* stream) {
  const bool cuda = gate.device.is_cuda();
  const bool dtype_ok = gate.dtype == DType::F32 || gate.dtype == DType::BF16 || (cuda && gate.dtype == DType::F16);
  FLASHLM_CHECK(dtype_ok, "gate: dtype must be F32 or BF16", cuda ? " or F16" : " on the CPU", ", got ",
                dtype_name(gate.dtype));
  check_like(gate, "gate", gate);
  check_like(up, "up", gate);
  check_like(out, "out", gate);
  check_out(out, gate, "gate");
  check_out(out, up, "up");
  detail::SiluMulArgs a{gate.dtype, gate.data, up.data, out.data, gate.numel()};
  if (a.n == 0) return;
  if (cuda) {
    FLASHLM_CHECK(cuda_compiled(), "gate: a CUDA tensor, but flashlm was built without CUDA");
    FLASHLM_CHECK(gate.device.index >= 0 && gate.device.index < cuda_device_count(), "gate: no CUDA device ",
                  gate.device.index, " (", cuda_status(), ")");
    detail::silu_mul_cuda(a, gate.device.index, stream);
    return;
  }
  parallel_for(a.n, kGrainElements, [&](int64_t begin, int64_t end) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
    if (cpu_isa() == CpuIsa::AVX2) {
      detail::silu_mul_avx2(a, begin, end);
      return;
    }
#endif
    detail::silu_mul_scalar(a, begin, end);
  });
}

}  // namespace flashlm::activation

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::activation::detail {
void silu_mul_cuda(const SiluMulArgs&, int, void*) {
  throw NotImplementedError("silu_mul: flashlm was built without CUDA");
}
}  // namespace flashlm::activation::detail
#endif
