// The quantized linear layers' input gradient, dx = dy @ W (backward_input.h). dx is allocated by the
// caller (flashlm.ops) and written in place.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>

#include "convert.h"
#include "flashlm/gemm/backward_input.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

void gguf(Array dy, Array raw, const std::string& ggml_type, Array dx, uintptr_t stream) {
  const std::optional<DType> t = dtype_from_name(ggml_type);
  FLASHLM_CHECK(t && gguf_backward_input_supported(*t), "ggml_type: '", ggml_type,
                "' is not a GGML block type gguf_linear_backward_input reads");
  const TensorView dyv = to_view(dy, "dy"), wv = to_view(raw, "raw"), dxv = to_view(dx, "dx");
  nb::gil_scoped_release release;
  gguf_linear_backward_input(dyv, wv, *t, dxv, reinterpret_cast<void*>(stream));
}

void int8(Array dy, Array w, Array w_scales, Array dx, uintptr_t stream) {
  const TensorView dyv = to_view(dy, "dy"), wv = to_view(w, "w"), sv = to_view(w_scales, "w_scales");
  const TensorView dxv = to_view(dx, "dx");
  nb::gil_scoped_release release;
  int8_linear_backward_input(dyv, wv, sv, dxv, reinterpret_cast<void*>(stream));
}

void int4(Array dy, Array w, Array scales, std::optional<Array> zeros, int64_t group_size, Array dx,
          uintptr_t stream) {
  const TensorView dyv = to_view(dy, "dy"), wv = to_view(w, "w"), sv = to_view(scales, "scales");
  const TensorView zv = zeros ? to_view(*zeros, "zeros") : TensorView{}, dxv = to_view(dx, "dx");
  nb::gil_scoped_release release;
  int4_linear_backward_input(dyv, wv, sv, zv, group_size, dxv, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_backward_input(nb::module_& m) {
  m.def("set_backward_input_avx512", &set_backward_input_avx512, nb::arg("allowed"),
        "let the AVX2 ISA use the AVX-512 few-rows kernels where the CPU has AVX-512F and BW; returns the previous "
        "setting");
  m.def("set_backward_input_gemm", &set_backward_input_gemm, nb::arg("allowed"),
        "let the AVX2 ISA multiply 8 or more rows of dy as a GEMM over decoded panels of W rather than row by row; "
        "returns the previous setting");
  m.def("gguf_backward_input_supported", [](const std::string& name) {
    const std::optional<DType> t = dtype_from_name(name);
    return t && gguf_backward_input_supported(*t);
  }, nb::arg("ggml_type"));
  m.def("gguf_linear_backward_input", &gguf, nb::arg("dy"), nb::arg("raw"), nb::arg("ggml_type"), nb::arg("dx"),
        nb::arg("stream") = 0, "dx[M, K] = dy[M, N] @ W, W the N x K matrix of GGML blocks in `raw` (uint8)");
  m.def("int8_linear_backward_input", &int8, nb::arg("dy"), nb::arg("w"), nb::arg("w_scales"), nb::arg("dx"),
        nb::arg("stream") = 0, "dx = dy @ (w * w_scales[:, None]), w int8 [N, K]");
  m.def("int4_linear_backward_input", &int4, nb::arg("dy"), nb::arg("w"), nb::arg("scales"), nb::arg("zeros").none(),
        nb::arg("group_size"), nb::arg("dx"), nb::arg("stream") = 0,
        "dx = dy @ dequantize(w), w packed int4 [N, K / 2] (see int_gemm.h)");
}

}  // namespace flashlm::bindings
