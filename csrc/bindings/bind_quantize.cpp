// GGUF quantization: float arrays (numpy or torch, via DLPack) into a caller's uint8 buffer of blocks.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "convert.h"
#include "flashlm/gguf/quantize.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

DType quant_type(const std::string& name) {
  std::optional<DType> type = dtype_from_name(name);
  FLASHLM_CHECK(type && quantize_supported(*type), "ggml_type: cannot quantize to '", name, "'");
  return *type;
}

}  // namespace

void bind_quantize(nb::module_& m) {
  m.def("quantize_supported", [](const std::string& name) {
    std::optional<DType> type = dtype_from_name(name);
    return type.has_value() && quantize_supported(*type);
  }, nb::arg("ggml_type"));
  // The source may be read-only (a memory-mapped file's weights).
  m.def("gguf_quantize", [](nb::ndarray<nb::ro> src, const std::string& ggml_type, Array out,
                            std::optional<nb::ndarray<nb::ro>> importance) {
    const DType type = quant_type(ggml_type);
    const TensorView src_view = to_view(nb::ndarray<>(src), "data"), out_view = to_view(out, "out");
    if (importance) {
      const TensorView importance_view = to_view(nb::ndarray<>(*importance), "importance");
      nb::gil_scoped_release release;
      gguf_quantize(src_view, type, out_view, importance_view);
    } else {
      nb::gil_scoped_release release;
      gguf_quantize(src_view, type, out_view);
    }
  }, nb::arg("data"), nb::arg("ggml_type"), nb::arg("out"), nb::arg("importance") = nb::none(),
     "Quantize float rows (innermost dimension) into `out`, a contiguous uint8 array of the blocks' size; "
     "importance: optional float32 imatrix values, one per column");
}

}  // namespace flashlm::bindings
