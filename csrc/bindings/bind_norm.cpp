// Normalisation kernels: RMSNorm, with vLLM's fused residual add, and LayerNorm (forward and backward). out is
// allocated by the caller (flashlm.ops) and written in place, as is the residual; the CUDA stream comes as an
// integer.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "convert.h"
#include "flashlm/norm/layer_norm.h"
#include "flashlm/norm/rms_norm.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

// a [..., d] as the [rows, d] view the kernel takes: the leading dimensions must collapse into one row stride
// (dimensions of size 1 have any stride). A 1-D array is one row.
TensorView as_rows(const Array& a, const char* name) {
  TensorView v = to_view(a, name);
  if (v.ndim == 2) return v;
  FLASHLM_CHECK(v.ndim >= 1, name, ": expected shape [..., d], got a 0-dim array");
  const int last = v.ndim - 1;
  int64_t rows = 1, row_stride = v.shape[last], expect = -1;
  bool collapses = true;
  for (int k = last - 1; k >= 0; --k) {
    rows *= v.shape[k];
    if (v.shape[k] == 1) continue;
    if (expect < 0) row_stride = v.strides[k];
    else collapses = collapses && v.strides[k] == expect;
    expect = v.strides[k] * v.shape[k];
  }
  FLASHLM_CHECK(collapses || rows == 0, name, ": the leading dimensions of shape ", v.shape_string(),
                " cannot be seen as one dimension of rows (their strides do not nest)");
  const int64_t d = v.shape[last], d_stride = v.strides[last];
  v.ndim = 2;
  v.shape[0] = rows, v.shape[1] = d;
  v.strides[0] = row_stride, v.strides[1] = d_stride;
  return v;
}

void rms_norm(Array x, Array weight, Array out, std::optional<Array> residual, double eps, uintptr_t stream) {
  norm::RMSNormParams p;
  p.x = as_rows(x, "x");
  p.weight = to_view(weight, "weight");
  p.out = as_rows(out, "out");
  if (residual) p.residual = as_rows(*residual, "residual");
  p.eps = eps;
  nb::gil_scoped_release release;
  norm::rms_norm(p, reinterpret_cast<void*>(stream));
}

void rms_norm_backward(Array x, Array weight, Array dout, Array dx, Array dweight, double eps, uintptr_t stream) {
  norm::RMSNormBackwardParams p;
  p.x = as_rows(x, "x");
  p.weight = to_view(weight, "weight");
  p.dout = as_rows(dout, "dout");
  p.dx = as_rows(dx, "dx");
  p.dweight = to_view(dweight, "dweight");
  p.eps = eps;
  nb::gil_scoped_release release;
  norm::rms_norm_backward(p, reinterpret_cast<void*>(stream));
}

void layer_norm(Array x, Array weight, std::optional<Array> bias, Array out, std::optional<Array> mean,
                std::optional<Array> rstd, double eps, uintptr_t stream) {
  norm::LayerNormParams p;
  p.x = as_rows(x, "x");
  p.weight = to_view(weight, "weight");
  p.bias = optional_view(bias, "bias");
  p.out = as_rows(out, "out");
  p.mean = optional_view(mean, "mean");
  p.rstd = optional_view(rstd, "rstd");
  p.eps = eps;
  nb::gil_scoped_release release;
  norm::layer_norm(p, reinterpret_cast<void*>(stream));
}

void layer_norm_backward(Array x, Array weight, Array dout, Array dx, Array dweight, std::optional<Array> dbias,
                         std::optional<Array> mean, std::optional<Array> rstd, double eps, uintptr_t stream) {
  norm::LayerNormBackwardParams p;
  p.x = as_rows(x, "x");
  p.weight = to_view(weight, "weight");
  p.dout = as_rows(dout, "dout");
  p.dx = as_rows(dx, "dx");
  p.dweight = to_view(dweight, "dweight");
  p.dbias = optional_view(dbias, "dbias");
  p.mean = optional_view(mean, "mean");
  p.rstd = optional_view(rstd, "rstd");
  p.eps = eps;
  nb::gil_scoped_release release;
  norm::layer_norm_backward(p, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_norm(nb::module_& m) {
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("out"), nb::arg("residual").none(),
        nb::arg("eps"), nb::arg("stream") = 0,
        "out = weight * rmsnorm(x) over x [..., d] (residual += x first when given); see flashlm/norm/rms_norm.h");
  m.def("rms_norm_backward", &rms_norm_backward, nb::arg("x"), nb::arg("weight"), nb::arg("dout"), nb::arg("dx"),
        nb::arg("dweight"), nb::arg("eps"), nb::arg("stream") = 0,
        "dx and dweight (f32) of out = weight * rmsnorm(x); see flashlm/norm/rms_norm.h");
  m.def("layer_norm", &layer_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias").none(), nb::arg("out"),
        nb::arg("mean").none(), nb::arg("rstd").none(), nb::arg("eps"), nb::arg("stream") = 0,
        "out = layernorm(x) * weight + bias over x [..., d] (contiguous), and each row's mean and rstd when given; "
        "see flashlm/norm/layer_norm.h");
  m.def("layer_norm_backward", &layer_norm_backward, nb::arg("x"), nb::arg("weight"), nb::arg("dout"), nb::arg("dx"),
        nb::arg("dweight"), nb::arg("dbias").none(), nb::arg("mean").none(), nb::arg("rstd").none(), nb::arg("eps"),
        nb::arg("stream") = 0,
        "dx, dweight and dbias (f32) of out = layernorm(x) * weight + bias (the forward's mean and rstd when given); "
        "see flashlm/norm/layer_norm.h");
}

}  // namespace flashlm::bindings
