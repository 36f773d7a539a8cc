// RMSNorm dispatcher: checks every argument (naming it) and runs the CUDA kernel or the CPU kernel (AVX2
// where cpu_isa() allows, else scalar), rows shared out over the thread pool when there are enough of them.
// Reference: HF's LlamaRMSNorm and vLLM's fused_add_rms_norm (tests/test_norm.py).
#include "flashlm/norm/rms_norm.h"

#include <algorithm>
#include <cstdint>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "rms_norm_kernels.h"
#include "row_blocks.h"
#include "views.h"

namespace flashlm::norm {
namespace {

using detail::check_eps;
using detail::check_f32_vector;
using detail::check_param;
using detail::check_rows;
using detail::check_x;
using detail::has;
using detail::overlap;
using detail::Span;
using detail::span_of;
using detail::span_of_f32_vector;
using detail::span_of_weight;
using detail::RMSNormArgs;

// Elements per pool range: calls of fewer than twice this many (up to 15 rows of 4096: every decode step of
// a small batch) run on the caller's thread. Waking the workers costs ~2 us (2 f32 rows of 256: 1.0 us on
// the caller's thread, 2.8 us split over 2 threads), about what the AVX2 kernel takes for 8 Ki elements, and
// on a busy 2-core machine the other core is often taken: 8 f32 rows of 4096 took 6 us inline, 13 us split.
constexpr int64_t kGrainElements = 32768;

void check_params(const RMSNormParams& p) {
  const TensorView& x = p.x;
  check_x(x);
  check_rows(p.out, "out", x, true);
  const TensorView& w = p.weight;
  check_param(w, "weight", x);
  check_eps(p.eps);

  // Written views may not overlap what else the call reads or writes; out may be x itself.
  const Span xs = span_of(x), os = span_of(p.out);
  const Span ws = span_of_weight(w);
  const bool out_is_x = p.out.data == x.data && (x.shape[0] <= 1 || p.out.strides[0] == x.strides[0]);
  FLASHLM_CHECK(out_is_x || !overlap(os, xs), "out: overlaps x (it may be x itself, with x's row stride)");
  FLASHLM_CHECK(!overlap(os, ws), "out: overlaps weight");
  if (has(p.residual)) {
    check_rows(p.residual, "residual", x, true);
    const Span rs = span_of(p.residual);
    FLASHLM_CHECK(!overlap(rs, xs), "residual: overlaps x");
    FLASHLM_CHECK(!overlap(rs, os), "residual: overlaps out");
    FLASHLM_CHECK(!overlap(rs, ws), "residual: overlaps weight");
  }
}

void check_backward_params(const RMSNormBackwardParams& p) {
  const TensorView& x = p.x;
  RMSNormParams forward;  // the forward's checks of x, weight and eps
  forward.x = x;
  forward.weight = p.weight;
  forward.out = x;
  forward.eps = p.eps;
  check_params(forward);
  FLASHLM_CHECK(x.is_contiguous(), "x: must be contiguous");
  check_rows(p.dout, "dout", x, false);
  FLASHLM_CHECK(p.dout.is_contiguous(), "dout: must be contiguous");
  check_rows(p.dx, "dx", x, true);
  FLASHLM_CHECK(p.dx.is_contiguous(), "dx: must be contiguous");
  check_f32_vector(p.dweight, "dweight", x);
  const Span xs = span_of(x), ds = span_of(p.dout), dxs = span_of(p.dx), dws = span_of_f32_vector(p.dweight);
  FLASHLM_CHECK(p.dx.data == p.dout.data || !overlap(dxs, ds), "dx: overlaps dout (it may be dout itself)");
  FLASHLM_CHECK(!overlap(dxs, xs), "dx: overlaps x");
  FLASHLM_CHECK(!overlap(dxs, span_of_weight(p.weight)), "dx: overlaps weight");
  for (const Span s : {xs, ds, dxs, span_of_weight(p.weight)})
    FLASHLM_CHECK(!overlap(dws, s), "dweight: overlaps another argument");
}

void run_cpu_rows(const RMSNormArgs& a, int64_t begin, int64_t end) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
  if (cpu_isa() == CpuIsa::AVX2) {
    detail::rms_norm_avx2(a, begin, end);
    return;
  }
#endif
  detail::rms_norm_scalar(a, begin, end);
}

}  // namespace

void rms_norm(const RMSNormParams& p, void* stream) {
  check_params(p);
  RMSNormArgs a;
  a.dtype = p.x.dtype;
  a.weight_dtype = p.weight.dtype;
  a.x = p.x.data;
  a.out = p.out.data;
  a.weight = p.weight.data;
  a.x_stride = p.x.strides[0];
  a.out_stride = p.out.strides[0];
  if (has(p.residual)) {
    a.residual = p.residual.data;
    a.residual_stride = p.residual.strides[0];
  }
  a.rows = p.x.shape[0];
  a.d = p.x.shape[1];
  a.eps = float(p.eps);
  if (a.rows == 0 || a.d == 0) return;
  if (p.x.device.is_cuda()) {
    detail::rms_norm_cuda(a, p.x.device.index, stream);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / a.d);
  parallel_for(a.rows, grain, [&](int64_t begin, int64_t end) { run_cpu_rows(a, begin, end); });
}

void rms_norm_backward(const RMSNormBackwardParams& p, void* stream) {
  check_backward_params(p);
  detail::RMSNormBackwardArgs a;
  a.dtype = p.x.dtype;
  a.weight_dtype = p.weight.dtype;
  a.x = p.x.data;
  a.weight = p.weight.data;
  a.dout = p.dout.data;
  a.dx = p.dx.data;
  a.rows = p.x.shape[0];
  a.d = p.x.shape[1];
  a.eps = float(p.eps);
  auto* dweight = static_cast<float*>(p.dweight.data);
  if (a.d == 0) return;
  if (p.x.device.is_cuda()) {
    detail::rms_norm_backward_cuda(a, dweight, p.x.device.index, stream);
    return;
  }
  float* outputs[] = {dweight};
  detail::sum_row_blocks(a.rows, a.d, outputs, [&](int64_t r0, int64_t r1, float* const* partial) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
    if (cpu_isa() == CpuIsa::AVX2) {
      detail::rms_norm_backward_avx2(a, r0, r1, partial[0]);
      return;
    }
#endif
    detail::rms_norm_backward_scalar(a, r0, r1, partial[0]);
  });
}

}  // namespace flashlm::norm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::norm::detail {
void rms_norm_cuda(const RMSNormArgs&, int, void*) {
  throw NotImplementedError("rms_norm: flashlm was built without CUDA");
}
void rms_norm_backward_cuda(const RMSNormBackwardArgs&, float*, int, void*) {
  throw NotImplementedError("rms_norm_backward: flashlm was built without CUDA");
}
}  // namespace flashlm::norm::detail
#endif
