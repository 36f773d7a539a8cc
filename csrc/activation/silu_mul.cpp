// silu_mul dispatcher: checks the views (naming them) and runs the CUDA kernel or the CPU kernel (AVX2 where
// cpu_isa() allows, else scalar), shared out over the thread pool only for large calls. Its backward runs on
// the training kernels (train_kernels.h).
#include "flashlm/activation/silu_mul.h"

#include <cstdint>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "silu_mul_kernels.h"
#include "train_kernels.h"

namespace flashlm::activation {
namespace {

// Elements per pool range: a decode step's MLP (a few thousand values, ~1 us with AVX2) stays on the caller.
constexpr int64_t kGrainElements = 32768;

}  // namespace

void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out, void* stream) {
  const bool cuda = gate.device.is_cuda();
  detail::check_dtype(gate, "gate");
  detail::check_like(gate, "gate", gate, "gate");
  detail::check_like(up, "up", gate, "gate");
  detail::check_like(out, "out", gate, "gate");
  detail::check_out(out, "out", gate, "gate");
  detail::check_out(out, "out", up, "up");
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

void silu_mul_backward(const TensorView& gate, const TensorView& up, const TensorView& dout, const TensorView& dgate,
                       const TensorView& dup, void* stream) {
  detail::check_dtype(gate, "gate");
  detail::check_like(gate, "gate", gate, "gate");
  detail::check_like(up, "up", gate, "gate");
  detail::check_like(dout, "dout", gate, "gate");
  detail::check_like(dgate, "dgate", gate, "gate");
  detail::check_like(dup, "dup", gate, "gate");
  for (const TensorView* out : {&dgate, &dup}) {
    const char* name = out == &dgate ? "dgate" : "dup";
    detail::check_out(*out, name, gate, "gate");
    detail::check_out(*out, name, up, "up");
    detail::check_out(*out, name, dout, "dout");
  }
  const bool same = dgate.data == dup.data && dgate.numel() > 0;
  FLASHLM_CHECK(!same, "dup: must not be dgate itself");
  detail::check_out(dup, "dup", dgate, "dgate");
  detail::TrainArgs a;
  a.op = detail::TrainOp::SiluMulBackward;
  a.dtype = gate.dtype;
  a.in0 = gate.data;
  a.in1 = up.data;
  a.in2 = dout.data;
  a.out = dgate.data;
  a.out2 = dup.data;
  a.n = gate.numel();
  detail::run(a, gate, "silu_mul_backward", stream);
}

}  // namespace flashlm::activation

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::activation::detail {
void silu_mul_cuda(const SiluMulArgs&, int, void*) {
  throw NotImplementedError("silu_mul: flashlm was built without CUDA");
}
}  // namespace flashlm::activation::detail
#endif
