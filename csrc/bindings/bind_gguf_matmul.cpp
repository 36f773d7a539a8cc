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

void gguf_repack_binding(Array src, Array dst, const std::string& ggml_type, int64_t n, int64_t k, bool to_x4) {
  const DType type = weight_type_from_name(ggml_type);
  const TensorView sv = to_view(src, "src"), dv = to_view(dst, "dst");
  nb::gil_scoped_release release;
  gguf_repack(sv, dv, type, n, k, to_x4);
}

void gguf_matmul_repacked_binding(Array x, Array packed, const std::string& ggml_type, int64_t n,
                                  std::optional<Array> bias, Array y) {
  const DType type = weight_type_from_name(ggml_type);
  const TensorView xv = to_view(x, "x"), pv = to_view(packed, "packed"), yv = to_view(y, "y");
  std::optional<TensorView> bv;
  if (bias) bv = to_view(*bias, "bias");
  nb::gil_scoped_release release;
  gguf_matmul_repacked(xv, pv, type, n, bv ? &*bv : nullptr, yv);
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
  m.def("gguf_repack_supported", [](const std::string& name, int64_t n, int64_t k) {
    std::optional<DType> t = dtype_from_name(name);
    return t && gguf_repack_supported(*t, n, k);
  }, nb::arg("ggml_type"), nb::arg("n"), nb::arg("k"));
  m.def("gguf_repack", &gguf_repack_binding, nb::arg("src"), nb::arg("dst"), nb::arg("ggml_type"), nb::arg("n"),
        nb::arg("k"), nb::arg("to_x4"),
        "dst = the N x K weight in src regrouped four rows at a time (to_x4) or back to plain blocks");
  m.def("gguf_matmul_repacked", &gguf_matmul_repacked_binding, nb::arg("x"), nb::arg("packed"), nb::arg("ggml_type"),
        nb::arg("n"), nb::arg("bias").none(), nb::arg("y"),
        "gguf_matmul (CPU, float32) with the weight regrouped by gguf_repack; equal to it bit for bit");
  m.def("set_gguf_matmul_vnni", &set_gguf_matmul_vnni, nb::arg("allowed"),
        "whether the GGUF matmul's CPU kernels may use VNNI (else AVX2, the same results); returns the previous");
}

}  // namespace flashlm::bindings
