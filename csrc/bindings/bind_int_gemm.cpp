// Integer GEMMs (W8A8, W4A16) and the per-token activation quantizer. Outputs are allocated by the caller
// (flashlm.ops) and written in place; see int_gemm.h for the layouts.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "convert.h"
#include "flashlm/gemm/int_gemm.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

using OptionalArray = std::optional<Array>;

void quantize(Array x, Array q, Array scales, uintptr_t stream) {
  QuantizePerTokenParams p;
  p.x = to_view(x, "x"), p.q = to_view(q, "q"), p.scales = to_view(scales, "scales");
  nb::gil_scoped_release release;
  quantize_per_token(p, reinterpret_cast<void*>(stream));
}

void quantize_static_scale(Array x, Array scale, Array q, Array scales, uintptr_t stream) {
  QuantizePerTokenParams p;
  p.x = to_view(x, "x"), p.scale = to_view(scale, "scale"), p.q = to_view(q, "q"), p.scales = to_view(scales, "scales");
  nb::gil_scoped_release release;
  quantize_static(p, reinterpret_cast<void*>(stream));
}

void int8(Array x, Array x_scales, Array w, Array w_scales, OptionalArray bias,
          Array out, uintptr_t stream) {
  Int8GemmParams p;
  p.x = to_view(x, "x"), p.x_scales = to_view(x_scales, "x_scales");
  p.w = to_view(w, "w"), p.w_scales = to_view(w_scales, "w_scales");
  p.bias = optional_view(bias, "bias"), p.out = to_view(out, "out");
  nb::gil_scoped_release release;
  int8_gemm(p, reinterpret_cast<void*>(stream));
}

void int4(Array x, Array w, Array scales, OptionalArray zeros, OptionalArray bias,
          Array out, int64_t group_size, uintptr_t stream) {
  Int4GemmParams p;
  p.x = to_view(x, "x"), p.w = to_view(w, "w"), p.scales = to_view(scales, "scales");
  p.zeros = optional_view(zeros, "zeros"), p.bias = optional_view(bias, "bias"), p.out = to_view(out, "out");
  p.group_size = group_size;
  nb::gil_scoped_release release;
  int4_gemm(p, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_int_gemm(nb::module_& m) {
  m.def("quantize_per_token", &quantize, nb::arg("x"), nb::arg("q"), nb::arg("scales"), nb::arg("stream") = 0,
        "x [M, K] -> int8 q [M, K] and f32 scales [M] (absmax / 127), written in place");
  m.def("quantize_static", &quantize_static_scale, nb::arg("x"), nb::arg("scale"), nb::arg("q"), nb::arg("scales"),
        nb::arg("stream") = 0,
        "x [M, K] -> int8 q [M, K] = clamp(round_half_even(x / scale), -127, 127) and scales [M] = scale, in place");
  m.def("int8_gemm", &int8, nb::arg("x"), nb::arg("x_scales"), nb::arg("w"), nb::arg("w_scales"),
        nb::arg("bias").none(), nb::arg("out"), nb::arg("stream") = 0,
        "out = (x @ w.T) * x_scales[:, None] * w_scales[None, :] + bias, int32 accumulation");
  m.def("int4_gemm", &int4, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("zeros").none(),
        nb::arg("bias").none(), nb::arg("out"), nb::arg("group_size"), nb::arg("stream") = 0,
        "out = x @ dequantize(w).T + bias, w packed int4 (see int_gemm.h)");
}

}  // namespace flashlm::bindings
