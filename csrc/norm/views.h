// Checks of the [rows, d] views the norm dispatchers (rms_norm.cpp, layer_norm.cpp) take, and the byte spans
// they use to refuse outputs that overlap inputs.
#pragma once

#include <cmath>
#include <cstdint>

#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/tensor.h"

namespace flashlm::norm::detail {

inline bool has(const TensorView& t) { return t.ndim != 0 || t.data != nullptr; }

inline int64_t element_size(DType t) { return t == DType::F32 ? 4 : 2; }

// [first byte, one past the last byte] of a [rows, d] view with row stride `stride`; empty views span nothing.
struct Span {
  uintptr_t begin = 0, end = 0;
};
inline Span span_of(const TensorView& t) {
  const int64_t rows = t.shape[0], d = t.shape[1];
  if (rows == 0 || d == 0) return {};
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  return {begin, begin + uintptr_t(((rows - 1) * t.strides[0] + d) * element_size(t.dtype))};
}
inline Span span_of_weight(const TensorView& w) {
  if (w.ndim != 1 || w.shape[0] == 0) return {};
  const auto begin = reinterpret_cast<uintptr_t>(w.data);
  return {begin, begin + uintptr_t(w.shape[0] * element_size(w.dtype))};
}
inline bool overlap(Span a, Span b) { return a.begin < b.end && b.begin < a.end; }

// A [rows, d] view like x: shape, dtype, device, a contiguous last dimension and non-negative row stride;
// rows that are written must not overlap one another.
inline void check_rows(const TensorView& t, const char* name, const TensorView& x, bool written) {
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

// x [rows, d]: F32 or BF16 (F16 too on CUDA), a contiguous last dimension, on a device flashlm can reach.
inline void check_x(const TensorView& x) {
  FLASHLM_CHECK(x.ndim == 2, "x: expected 2 dimensions [rows, d], got shape ", x.shape_string());
  const bool cuda = x.device.is_cuda();
  const bool dtype_ok = x.dtype == DType::F32 || x.dtype == DType::BF16 || (cuda && x.dtype == DType::F16);
  FLASHLM_CHECK(dtype_ok, "x: dtype must be F32 or BF16", cuda ? " or F16" : " on the CPU", ", got ",
                dtype_name(x.dtype));
  check_rows(x, "x", x, false);
  if (cuda) {
    FLASHLM_CHECK(cuda_compiled(), "x: a CUDA tensor, but flashlm was built without CUDA");
    FLASHLM_CHECK(x.device.index >= 0 && x.device.index < cuda_device_count(), "x: no CUDA device ", x.device.index,
                  " (", cuda_status(), ")");
  }
}

// A [d] parameter of x (a weight or bias): contiguous, with data, on x's device, in x's dtype or F32.
inline void check_param(const TensorView& t, const char* name, const TensorView& x) {
  FLASHLM_CHECK(t.ndim == 1 && t.shape[0] == x.shape[1], name, ": expected shape [d] = [", x.shape[1], "], got ",
                t.shape_string());
  FLASHLM_CHECK(t.dtype == x.dtype || t.dtype == DType::F32, name, ": dtype must be x's (", dtype_name(x.dtype),
                ") or F32, got ", dtype_name(t.dtype));
  FLASHLM_CHECK(t.device == x.device, name, ": must be on x's device");
  FLASHLM_CHECK(t.shape[0] <= 1 || t.strides[0] == 1, name, ": must be contiguous, got stride ", t.strides[0]);
  FLASHLM_CHECK(t.numel() == 0 || t.data != nullptr, name, ": null data");
}

inline void check_eps(double eps) {
  FLASHLM_CHECK(std::isfinite(eps) && eps >= 0.0, "eps: must be finite and >= 0, got ", eps);
}

// An F32 [d] output of the backward passes: contiguous, with data, on x's device.
inline void check_f32_vector(const TensorView& t, const char* name, const TensorView& x) {
  FLASHLM_CHECK(t.ndim == 1 && t.shape[0] == x.shape[1], name, ": expected shape [d] = [", x.shape[1], "], got ",
                t.shape_string());
  FLASHLM_CHECK(t.dtype == DType::F32, name, ": dtype must be F32, got ", dtype_name(t.dtype));
  FLASHLM_CHECK(t.device == x.device, name, ": must be on x's device");
  FLASHLM_CHECK(t.is_contiguous() && (t.numel() == 0 || t.data), name, ": must be contiguous with data");
}

inline Span span_of_f32_vector(const TensorView& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  return t.numel() == 0 ? Span{} : Span{begin, begin + uintptr_t(t.numel() * 4)};
}

}  // namespace flashlm::norm::detail
