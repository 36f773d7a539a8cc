// RMSNorm dispatcher: checks every argument (naming it) and runs the CUDA kernel or the CPU kernel (AVX2
// where cpu_isa() allows, else scalar), rows shared out over the thread pool when there are enough of them.
// Reference: HF's LlamaRMSNorm and vLLM's fused_add_rms_norm (tests/test_norm.py).
#include "flashlm/norm/rms_norm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "rms_norm_kernels.h"

namespace flashlm::norm {
namespace {

using detail::RMSNormArgs;

// Elements per pool range: calls of fewer than twice this many (up to 15 rows of 4096: every decode step of
// a small batch) run on the caller's thread. Waking the workers costs ~2 us (2 f32 rows of 256: 1.0 us on
// the caller's thread, 2.8 us split over 2 threads), about what the AVX2 kernel takes for 8 Ki elements, and
// on a busy 2-core machine the other core is often taken: 8 f32 rows of 4096 took 6 us inline, 13 us split.
constexpr int64_t kGrainElements = 32768;

bool has(const TensorView& t) { return t.ndim != 0 || t.data != nullptr; }

int64_t element_size(DType t) { return t == DType::F32 ? 4 : 2; }

// [first byte, one past the last byte] of a [rows, d] view with row stride `stride`; empty views span nothing.
struct Span {
  uintptr_t begin = 0, end = 0;
};
Span span_of(const TensorView& t) {
  const int64_t rows = t.shape[0], d = t.shape[1];
  if (rows == 0 || d == 0) return {};
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  return {begin, begin + uintptr_t(((rows - 1) * t.strides[0] + d) * element_size(t.dtype))};
}
Span span_of_weight(const TensorView& w) {
  if (w.ndim != 1 || w.shape[0] == 0) return {};
  const auto begin = reinterpret_cast<uintptr_t>(w.data);
  return {begin, begin + uintptr_t(w.shape[0] * element_size(w.dtype))};
}
bool overlap(Span a, Span b) { return a.begin < b.end && b.begin < a.end; }

// A [rows, d] view like x: shape, dtype, device, a contiguous last dimension and non-negative row stride;
// rows that are written must not overlap one another.
void check_rows(const TensorView& t, const char* name, const TensorView& x, bool written) {
  FLASHLM_CHECK(t.ndim == 2, name, ": expected 2 dimensions [rows, d], got shape ", t.shape_string());
  FLASHLM_CHECK(t.shape[0] == x.shape[0] && t.shape[1] == x.shape[1], name, ": shape ", t.shape_string(),
                " differs from x's ", x.shape_string());
  FLASHLM_CHECK(t.dtype == x.dtype, name, ": dtype ", dtype_name(t.dtype), " differs from x's ", dtype_name(x.dtype));
  FLASHLM_CHECK(t.device == x.device, name, ": must be on x's device");
  FLASHLM_CHECK(t.shape[1] <= 1 || t.strides[1] == 1, name, ": the last dimension must be contiguous, got stride ",
                t.strides[1]);
  FLASHLM_CHECK(t.strides[0] >= 0, name, ": row stride must be >= 0, got ", t.strides[0]);
  FLASHLM_CHECK(!written || t.shape[0] <= 1 || t.strides[0] >= t.shape[1], name, ": rows overlap (row stride ",
                t.strides[0], " < d = ", t.shape[1], ")");
  FLASHLM_CHECK(t.numel() == 0 || t.data != nullptr, name, ": null data");
}

void check_params(const RMSNormParams& p) {
  const TensorView& x = p.x;
  FLASHLM_CHECK(x.ndim == 2, "x: expected 2 dimensions [rows, d], got shape ", x.shape_string());
  const bool cuda = x.device.is_cuda();
  const bool dtype_ok = x.dtype == DType::F32 || x.dtype == DType::BF16 || (cuda && x.dtype == DType::F16);
  FLASHLM_CHECK(dtype_ok, "x: dtype must be F32 or BF16", cuda ? " or F16" : " on the CPU", ", got ",
                dtype_name(x.dtype));
  check_rows(x, "x", x, false);
  check_rows(p.out, "out", x, true);
  const TensorView& w = p.weight;
  FLASHLM_CHECK(w.ndim == 1 && w.shape[0] == x.shape[1], "weight: expected shape [d] = [", x.shape[1], "], got ",
                w.shape_string());
  FLASHLM_CHECK(w.dtype == x.dtype || w.dtype == DType::F32, "weight: dtype must be x's (", dtype_name(x.dtype),
                ") or F32, got ", dtype_name(w.dtype));
  FLASHLM_CHECK(w.device == x.device, "weight: must be on x's device");
  FLASHLM_CHECK(w.shape[0] <= 1 || w.strides[0] == 1, "weight: must be contiguous, got stride ", w.strides[0]);
  FLASHLM_CHECK(w.numel() == 0 || w.data != nullptr, "weight: null data");
  FLASHLM_CHECK(std::isfinite(p.eps) && p.eps >= 0.0, "eps: must be finite and >= 0, got ", p.eps);

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
  if (cuda) {
    FLASHLM_CHECK(cuda_compiled(), "x: a CUDA tensor, but flashlm was built without CUDA");
    FLASHLM_CHECK(x.device.index >= 0 && x.device.index < cuda_device_count(), "x: no CUDA device ", x.device.index,
                  " (", cuda_status(), ")");
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
  const TensorView& dw = p.dweight;
  FLASHLM_CHECK(dw.ndim == 1 && dw.shape[0] == x.shape[1], "dweight: expected shape [d] = [", x.shape[1], "], got ",
                dw.shape_string());
  FLASHLM_CHECK(dw.dtype == DType::F32, "dweight: dtype must be F32, got ", dtype_name(dw.dtype));
  FLASHLM_CHECK(dw.device == x.device, "dweight: must be on x's device");
  FLASHLM_CHECK(dw.is_contiguous() && (dw.numel() == 0 || dw.data), "dweight: must be contiguous with data");
  const Span xs = span_of(x), ds = span_of(p.dout), dxs = span_of(p.dx);
  const auto dw0 = reinterpret_cast<uintptr_t>(dw.data);
  const Span dws = dw.numel() == 0 ? Span{} : Span{dw0, dw0 + uintptr_t(dw.numel() * 4)};
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
  // The weight's gradient: each block of rows sums into its own f32 row, and the blocks are added in order,
  // so the result does not depend on the thread count. At most kWeightBlocks blocks of at least 16 rows.
  constexpr int64_t kWeightBlocks = 64, kMinBlockRows = 16;
  const int64_t block_rows = std::max(kMinBlockRows, (a.rows + kWeightBlocks - 1) / kWeightBlocks);
  const int64_t blocks = (a.rows + block_rows - 1) / block_rows;
  std::vector<float> partial(size_t(std::max<int64_t>(blocks, 1) * a.d), 0.0f);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (block_rows * a.d));
  parallel_for(blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * block_rows, r1 = std::min(a.rows, r0 + block_rows);
      float* dw = partial.data() + b * a.d;
#ifdef FLASHLM_HAVE_AVX2_KERNELS
      if (cpu_isa() == CpuIsa::AVX2) {
        detail::rms_norm_backward_avx2(a, r0, r1, dw);
        continue;
      }
#endif
      detail::rms_norm_backward_scalar(a, r0, r1, dw);
    }
  });
  for (int64_t i = 0; i < a.d; ++i) {
    float sum = partial[size_t(i)];
    for (int64_t b = 1; b < blocks; ++b) sum += partial[size_t(b * a.d + i)];
    dweight[i] = sum;
  }
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
