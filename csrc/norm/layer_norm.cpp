// LayerNorm dispatcher: checks every argument (naming it) and runs the CUDA kernels or the CPU kernels (AVX2
// where cpu_isa() allows, else scalar), rows shared out over the thread pool when there are enough of them.
// Reference: torch's nn.LayerNorm (tests/test_layer_norm.py).
#include "flashlm/norm/layer_norm.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "layer_norm_kernels.h"
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
using detail::LayerNormArgs;
using detail::overlap;
using detail::Span;
using detail::span_of;
using detail::span_of_f32_vector;
using detail::span_of_weight;

// Elements per pool range, as rms_norm.cpp's (the same memory-bound row passes, a few more of them).
constexpr int64_t kGrainElements = 32768;

void check_contiguous_rows(const TensorView& t, const char* name, const TensorView& x, bool written) {
  check_rows(t, name, x, written);
  FLASHLM_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

// x, weight, bias and eps: what the forward and the backward share.
void check_inputs(const TensorView& x, const TensorView& weight, const TensorView* bias, double eps) {
  check_x(x);
  FLASHLM_CHECK(x.is_contiguous(), "x: must be contiguous");
  check_param(weight, "weight", x);
  if (bias && has(*bias)) {
    FLASHLM_CHECK(bias->dtype == weight.dtype, "bias: dtype must be weight's (", dtype_name(weight.dtype), "), got ",
                  dtype_name(bias->dtype));
    check_param(*bias, "bias", x);
  }
  check_eps(eps);
}

// mean and rstd: both or neither, each F32 [rows], contiguous, with data, on x's device, apart from each other
// and from `others` (the call's other views).
void check_stats(const TensorView& mean, const TensorView& rstd, const TensorView& x,
                 std::initializer_list<Span> others) {
  FLASHLM_CHECK(has(mean) == has(rstd), has(mean) ? "rstd" : "mean", ": must be given with ",
                has(mean) ? "mean" : "rstd");
  if (!has(mean)) return;
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    FLASHLM_CHECK(t->ndim == 1 && t->shape[0] == x.shape[0], name, ": expected shape [rows] = [", x.shape[0],
                  "], got ", t->shape_string());
    FLASHLM_CHECK(t->dtype == DType::F32, name, ": dtype must be F32, got ", dtype_name(t->dtype));
    FLASHLM_CHECK(t->device == x.device, name, ": must be on x's device");
    FLASHLM_CHECK(t->is_contiguous() && (t->numel() == 0 || t->data), name, ": must be contiguous with data");
    for (const Span s : others) FLASHLM_CHECK(!overlap(span_of_f32_vector(*t), s), name, ": overlaps another argument");
  }
  FLASHLM_CHECK(!overlap(span_of_f32_vector(mean), span_of_f32_vector(rstd)), "rstd: overlaps mean");
}

void check_params(const LayerNormParams& p) {
  check_inputs(p.x, p.weight, &p.bias, p.eps);
  check_contiguous_rows(p.out, "out", p.x, true);
  const Span os = span_of(p.out);
  FLASHLM_CHECK(!overlap(os, span_of(p.x)), "out: overlaps x");
  FLASHLM_CHECK(!overlap(os, span_of_weight(p.weight)), "out: overlaps weight");
  FLASHLM_CHECK(!has(p.bias) || !overlap(os, span_of_weight(p.bias)), "out: overlaps bias");
  check_stats(p.mean, p.rstd, p.x, {span_of(p.x), os, span_of_weight(p.weight), span_of_weight(p.bias)});
}

void check_backward_params(const LayerNormBackwardParams& p) {
  const TensorView& x = p.x;
  check_inputs(x, p.weight, nullptr, p.eps);
  check_contiguous_rows(p.dout, "dout", x, false);
  check_contiguous_rows(p.dx, "dx", x, true);
  check_f32_vector(p.dweight, "dweight", x);
  if (has(p.dbias)) check_f32_vector(p.dbias, "dbias", x);
  const Span xs = span_of(x), ds = span_of(p.dout), dxs = span_of(p.dx), ws = span_of_weight(p.weight);
  FLASHLM_CHECK(p.dx.data == p.dout.data || !overlap(dxs, ds), "dx: overlaps dout (it may be dout itself)");
  FLASHLM_CHECK(!overlap(dxs, xs), "dx: overlaps x");
  FLASHLM_CHECK(!overlap(dxs, ws), "dx: overlaps weight");
  const Span dws = span_of_f32_vector(p.dweight), dbs = has(p.dbias) ? span_of_f32_vector(p.dbias) : Span{};
  for (const Span s : {xs, ds, dxs, ws}) {
    FLASHLM_CHECK(!overlap(dws, s), "dweight: overlaps another argument");
    FLASHLM_CHECK(!overlap(dbs, s), "dbias: overlaps another argument");
  }
  FLASHLM_CHECK(!overlap(dws, dbs), "dbias: overlaps dweight");
  check_stats(p.mean, p.rstd, x, {dxs, dws, dbs});
}

// The kernels' arguments that the forward and the backward (Params) take alike, from checked params.
template <class Params>
LayerNormArgs shared_args(const Params& p) {
  LayerNormArgs a;
  a.dtype = p.x.dtype;
  a.weight_dtype = p.weight.dtype;
  a.x = p.x.data;
  a.weight = p.weight.data;
  if (has(p.mean)) a.mean = static_cast<float*>(p.mean.data), a.rstd = static_cast<float*>(p.rstd.data);
  a.rows = p.x.shape[0];
  a.d = p.x.shape[1];
  a.eps = float(p.eps);
  return a;
}

}  // namespace

void layer_norm(const LayerNormParams& p, void* stream) {
  check_params(p);
  LayerNormArgs a = shared_args(p);
  a.bias = has(p.bias) ? p.bias.data : nullptr;
  a.out = p.out.data;
  if (a.rows == 0 || a.d == 0) return;
  if (p.x.device.is_cuda()) {
    detail::layer_norm_cuda(a, p.x.device.index, stream);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / a.d);
  parallel_for(a.rows, grain, [&](int64_t begin, int64_t end) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
    if (cpu_isa() == CpuIsa::AVX2) {
      detail::layer_norm_avx2(a, begin, end);
      return;
    }
#endif
    detail::layer_norm_scalar(a, begin, end);
  });
}

void layer_norm_backward(const LayerNormBackwardParams& p, void* stream) {
  check_backward_params(p);
  LayerNormArgs a = shared_args(p);
  a.dout = p.dout.data;
  a.dx = p.dx.data;
  auto* dweight = static_cast<float*>(p.dweight.data);
  auto* dbias = has(p.dbias) ? static_cast<float*>(p.dbias.data) : nullptr;
  if (a.d == 0) return;
  if (p.x.device.is_cuda()) {
    detail::layer_norm_backward_cuda(a, dweight, dbias, p.x.device.index, stream);
    return;
  }
  float* outputs[] = {dweight, dbias};
  detail::sum_row_blocks(a.rows, a.d, outputs, [&](int64_t r0, int64_t r1, float* const* partial) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
    if (cpu_isa() == CpuIsa::AVX2) {
      detail::layer_norm_backward_avx2(a, r0, r1, partial[0], partial[1]);
      return;
    }
#endif
    detail::layer_norm_backward_scalar(a, r0, r1, partial[0], partial[1]);
  });
}

}  // namespace flashlm::norm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::norm::detail {
void layer_norm_cuda(const LayerNormArgs&, int, void*) {
  throw NotImplementedError("layer_norm: flashlm was built without CUDA");
}
void layer_norm_backward_cuda(const LayerNormArgs&, float*, float*, int, void*) {
  throw NotImplementedError("layer_norm_backward: flashlm was built without CUDA");
}
}  // namespace flashlm::norm::detail
#endif
