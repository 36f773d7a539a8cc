// What the activation dispatchers share: the checks of their views (each message names the argument) and the
// CPU/CUDA routing of the training kernels, shared out over the thread pool only for large calls.
#include <cstdint>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "train_kernels.h"

namespace flashlm::activation::detail {
namespace {

// Elements per pool range: a decode step's MLP (a few thousand values, ~1 us with AVX2) stays on the caller.
constexpr int64_t kGrainElements = 32768;

}  // namespace

void check_dtype(const TensorView& t, const char* name) {
  const bool cuda = t.device.is_cuda();
  const bool ok = t.dtype == DType::F32 || t.dtype == DType::BF16 || (cuda && t.dtype == DType::F16);
  FLASHLM_CHECK(ok, name, ": dtype must be F32 or BF16", cuda ? " or F16" : " on the CPU", ", got ",
                dtype_name(t.dtype));
}

void check_like(const TensorView& t, const char* name, const TensorView& ref, const char* ref_name) {
  FLASHLM_CHECK(t.ndim == ref.ndim, name, ": shape ", t.shape_string(), " differs from ", ref_name, "'s ",
                ref.shape_string());
  for (int d = 0; d < t.ndim; ++d)
    FLASHLM_CHECK(t.shape[d] == ref.shape[d], name, ": shape ", t.shape_string(), " differs from ", ref_name, "'s ",
                  ref.shape_string());
  FLASHLM_CHECK(t.dtype == ref.dtype, name, ": dtype ", dtype_name(t.dtype), " differs from ", ref_name, "'s ",
                dtype_name(ref.dtype));
  FLASHLM_CHECK(t.device == ref.device, name, ": must be on ", ref_name, "'s device");
  FLASHLM_CHECK(t.is_contiguous(), name, ": must be contiguous");
  FLASHLM_CHECK(t.numel() == 0 || t.data, name, ": null data");
}

void check_out(const TensorView& out, const char* out_name, const TensorView& in, const char* in_name) {
  const auto o = reinterpret_cast<uintptr_t>(out.data), i = reinterpret_cast<uintptr_t>(in.data);
  const auto bytes = static_cast<uintptr_t>(out.nbytes());
  FLASHLM_CHECK(o == i || o + bytes <= i || i + bytes <= o, out_name, ": overlaps ", in_name, " (it may be ",
                in_name, " itself)");
}

void run(const TrainArgs& a, const TensorView& device_of, const char* op, void* stream) {
  if (a.n == 0) return;
  if (device_of.device.is_cuda()) {
    const int index = device_of.device.index;
    FLASHLM_CHECK(cuda_compiled(), op, ": a CUDA tensor, but flashlm was built without CUDA");
    FLASHLM_CHECK(index >= 0 && index < cuda_device_count(), op, ": no CUDA device ", index, " (", cuda_status(), ")");
    train_cuda(a, index, stream);
    return;
  }
  parallel_for(a.n, kGrainElements, [&](int64_t begin, int64_t end) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
    if (cpu_isa() == CpuIsa::AVX2) {
      train_avx2(a, begin, end);
      return;
    }
#endif
    train_scalar(a, begin, end);
  });
}

}  // namespace flashlm::activation::detail

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::activation::detail {
void train_cuda(const TrainArgs&, int, void*) {
  throw NotImplementedError("activation: flashlm was built without CUDA");
}
}  // namespace flashlm::activation::detail
#endif
