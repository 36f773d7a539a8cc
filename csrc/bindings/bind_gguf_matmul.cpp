// The GGUF-native matmul: y = x @ W.T (+ bias) with W given as the uint8 bytes of its GGML blocks.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>

#include "convert.h"
#include "flashlm/gemm/gguf_matmul.h"

namespace flashlm::bindings {

namespace {

DType weight_type_from_name(const std::string& name) {
  std::optional<DType> t = dtype_from_name(name);
  FLASHLM_CHECK(t && gguf_matmul_supported(*t), "ggml_type: '", name,
                "' is not a type gguf_matmul reads (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)");
  return *t;
}

void gguf_matmul_binding(Array x, Array raw, const std::string& ggml_type, int64_t n,
                         std::optional<Array> bias, Array y, uintptr_t stream) {
  const DType type = weight_type_from_name(ggml_type);
  const TensorView xv = to_view(x, "x"), wv = to_view(raw, "raw"), yv = to_view(y, "y");
  std::optional<TensorView> bv;
  if (bias) bv = to_view(*bias, "bias");
  nb::gil_scoped_release release;
  gguf_matmul(xv, wv, type, n, bv ? &*bv : nullptr, yv, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_gguf_matmul(nb::module_& m) {
  m.def("gguf_matmul_supported", [](const std::string& name) {
    std::optional<DType> t = dtype_from_name(name);
    return t && gguf_matmul_supported(*t);
  }, nb::arg("ggml_type"));
  m.def("gguf_matmul", &gguf_matmul_binding, nb::arg("x"), nb::arg("raw"), nb::arg("ggml_type"), nb::arg("n"),
        nb::arg("bias").none(), nb::arg("y"), nb::arg("stream") = 0,
        "y[M, N] = x[M, K] @ W.T (+ bias), W the N x K matrix of GGML blocks of `ggml_type` in `raw` (uint8)");
}

}  // namespace flashlm::bindings
