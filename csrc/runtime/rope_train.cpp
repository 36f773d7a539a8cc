// The training rope's dispatcher (flashlm/runtime/rope.h): checks the views (naming them) and runs the CUDA
// kernel or the CPU kernel (AVX2 where cpu_isa() allows, else scalar), rows shared out over the thread pool
// for large calls.
#include <algorithm>
#include <cstdint>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "flashlm/runtime/rope.h"
#include "rope_train_kernels.h"

namespace flashlm::runtime {
namespace {

constexpr int64_t kGrainElements = 32768;  // as the element-wise kernels: small calls stay on the caller

void check_table(const TensorView& t, const char* name, const TensorView& x, int64_t T, int64_t hd) {
  FLASHLM_CHECK(t.ndim == 2 && t.shape[0] == T && t.shape[1] == hd, name, ": expected shape [T, hd] = [", T, ", ",
                hd, "], got ", t.shape_string());
  FLASHLM_CHECK(t.dtype == x.dtype, name, ": dtype ", dtype_name(t.dtype), " differs from x's ", dtype_name(x.dtype));
  FLASHLM_CHECK(t.device == x.device, name, ": must be on x's device");
  FLASHLM_CHECK(t.is_contiguous() && (t.numel() == 0 || t.data), name, ": must be contiguous with data");
}

}  // namespace

void rope_rotate(const RopeParams& p, void* stream) {
  const TensorView& x = p.x;
  FLASHLM_CHECK(x.ndim >= 3, "x: expected [..., T, heads, hd], got shape ", x.shape_string());
  const bool cuda = x.device.is_cuda();
  const bool dtype_ok = x.dtype == DType::F32 || x.dtype == DType::BF16 || (cuda && x.dtype == DType::F16);
  FLASHLM_CHECK(dtype_ok, "x: dtype must be F32 or BF16", cuda ? " or F16" : " on the CPU", ", got ",
                dtype_name(x.dtype));
  FLASHLM_CHECK(x.is_contiguous() && (x.numel() == 0 || x.data), "x: must be contiguous with data");
  const int64_t T = x.shape[x.ndim - 3], heads = x.shape[x.ndim - 2], hd = x.shape[x.ndim - 1];
  FLASHLM_CHECK(hd % 2 == 0, "x: the head dimension must be even, got ", hd);
  check_table(p.cos, "cos", x, T, hd);
  check_table(p.sin, "sin", x, T, hd);
  const TensorView& out = p.out;
  FLASHLM_CHECK(out.ndim == x.ndim && out.numel() == x.numel() && out.dtype == x.dtype && out.device == x.device,
                "out: must have x's shape, dtype and device, got ", out.shape_string(), " ", dtype_name(out.dtype));
  for (int d = 0; d < x.ndim; ++d)
    FLASHLM_CHECK(out.shape[d] == x.shape[d], "out: shape ", out.shape_string(), " differs from x's ", x.shape_string());
  FLASHLM_CHECK(out.is_contiguous() && (out.numel() == 0 || out.data), "out: must be contiguous with data");
  const auto o = reinterpret_cast<uintptr_t>(out.data), xb = reinterpret_cast<uintptr_t>(x.data);
  const auto bytes = uintptr_t(x.nbytes());
  FLASHLM_CHECK(o == xb || o + bytes <= xb || xb + bytes <= o, "out: overlaps x (it may be x itself)");
  for (const TensorView* t : {&p.cos, &p.sin}) {
    const auto tb = reinterpret_cast<uintptr_t>(t->data);
    FLASHLM_CHECK(o + bytes <= tb || tb + uintptr_t(t->nbytes()) <= o, "out: overlaps ", t == &p.cos ? "cos" : "sin");
  }
  detail::RopeArgs a;
  a.dtype = x.dtype;
  a.x = x.data;
  a.cos = p.cos.data;
  a.sin = p.sin.data;
  a.out = out.data;
  a.T = T;
  a.heads = heads;
  a.hd = hd;
  a.rows = hd == 0 ? 0 : x.numel() / hd;
  a.transpose = p.transpose;
  if (a.rows == 0) return;
  if (cuda) {
    FLASHLM_CHECK(cuda_compiled(), "x: a CUDA tensor, but flashlm was built without CUDA");
    FLASHLM_CHECK(x.device.index >= 0 && x.device.index < cuda_device_count(), "x: no CUDA device ", x.device.index,
                  " (", cuda_status(), ")");
    detail::rope_rows_cuda(a, x.device.index, stream);
    return;
  }
  parallel_for(a.rows, std::max<int64_t>(1, kGrainElements / hd), [&](int64_t begin, int64_t end) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
    if (cpu_isa() == CpuIsa::AVX2) {
      detail::rope_rows_avx2(a, begin, end);
      return;
    }
#endif
    detail::rope_rows_scalar(a, begin, end);
  });
}

}  // namespace flashlm::runtime

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::runtime::detail {
void rope_rows_cuda(const RopeArgs&, int, void*) {
  throw NotImplementedError("rope_rotate: flashlm was built without CUDA");
}
}  // namespace flashlm::runtime::detail
#endif
