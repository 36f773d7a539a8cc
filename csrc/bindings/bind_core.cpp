// Build and machine information, the thread pool, the CPU ISA switch, dtypes, and dequantize.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "convert.h"
#include "flashlm/flashlm.h"

namespace nb = nanobind;

namespace flashlm::bindings {

namespace {

nb::dict build_info_dict() {
  const BuildInfo& b = build_info();
  nb::dict d;
  d["version"] = b.version;
  d["compiler"] = b.compiler;
  d["cuda"] = b.cuda;
  d["cuda_archs"] = b.cuda_archs;
  d["cuda_version"] = b.cuda_version;
  d["nccl"] = b.nccl;
  return d;
}

nb::dict cpu_features_dict() {
  const CpuFeatures& f = cpu_features();
  nb::dict d;
  d["sse4.2"] = f.sse42;
  d["avx"] = f.avx;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512_vnni"] = f.avx512_vnni;
  d["avx_vnni"] = f.avx_vnni;
  d["amd"] = f.amd;
  return d;
}

CpuIsa isa_from_name(const std::string& name) {
  if (name == "scalar") return CpuIsa::Scalar;
  if (name == "avx2") return CpuIsa::AVX2;
  throw ValueError("isa must be 'scalar' or 'avx2', got '" + name + "'");
}

// A GGML dtype from its name ("Q4_K") or its ggml_type id.
DType ggml_dtype(const nb::handle& type) {
  std::optional<DType> d;
  if (nb::isinstance<nb::str>(type)) {
    std::string name = nb::cast<std::string>(type);
    d = dtype_from_name(name);
    FLASHLM_CHECK(d && dtype_info(*d).ggml_id >= 0, "ggml_type: unknown type name '", name, "'");
  } else if (nb::isinstance<nb::int_>(type)) {
    int64_t id = nb::cast<int64_t>(type);
    FLASHLM_CHECK(id >= 0 && id <= 0xFFFFFFFFll, "ggml_type: unknown type id ", id);
    d = dtype_from_ggml(static_cast<uint32_t>(id));
    FLASHLM_CHECK(d.has_value(), "ggml_type: unknown type id ", id);
  } else {
    throw ValueError("ggml_type must be a type name such as 'Q4_K' or a ggml type id");
  }
  return *d;
}

void dequantize_binding(Array raw, nb::handle ggml_type, Array out, uintptr_t stream) {
  DType type = ggml_dtype(ggml_type);
  TensorView raw_view = to_view(raw, "raw");
  TensorView out_view = to_view(out, "out");
  FLASHLM_CHECK(raw_view.dtype == DType::U8, "raw: must be a uint8 tensor of blocks");
  FLASHLM_CHECK(raw_view.is_contiguous(), "raw: must be contiguous");
  FLASHLM_CHECK(raw_view.device == out_view.device, "raw and out must be on the same device");
  FLASHLM_CHECK(dequantize_supported(type), "ggml_type: dequantizing ", dtype_name(type), " is not supported");
  const DTypeInfo& info = dtype_info(type);
  int64_t inner = out_view.ndim ? out_view.shape[out_view.ndim - 1] : 1;
  FLASHLM_CHECK(inner % info.block_size == 0, "shape: the innermost dimension (", inner, ") must be a multiple of ",
                info.name, "'s block size ", info.block_size);
  int64_t expected = storage_bytes(type, out_view.numel());
  FLASHLM_CHECK(raw_view.numel() == expected, "raw: ", out_view.shape_string(), " of ", info.name, " takes ", expected,
                " bytes, raw has ", raw_view.numel());
  TensorView src = TensorView::contiguous(raw_view.data, type, out_view.ndim, out_view.shape, raw_view.device);
  nb::gil_scoped_release release;
  dequantize(src, out_view, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_core(nb::module_& m) {
  m.attr("__version__") = build_info().version;
  m.def("build_info", &build_info_dict, "How libflashlm was built");
  m.def("cpu_features", &cpu_features_dict, "CPU features detected at run time");
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, nb::arg("n"));
  m.attr("MAX_THREADS") = kMaxThreads;
  m.def("cpu_isa", [] { return std::string(cpu_isa_name(cpu_isa())); });
  m.def("set_cpu_isa", [](const std::string& name) { set_cpu_isa(isa_from_name(name)); }, nb::arg("isa"));
  m.def("cpu_isa_supported", [](const std::string& name) { return cpu_isa_supported(isa_from_name(name)); },
        nb::arg("isa"));
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_status", &cuda_status);

  // (name, ggml id, block size, block bytes) for every dtype, in DType order.
  m.def("dtypes", [] {
    std::vector<std::tuple<std::string, int, int64_t, int64_t>> out;
    for (int i = 0; i < kNumDTypes; ++i) {
      const DTypeInfo& info = dtype_info(static_cast<DType>(i));
      out.emplace_back(info.name, info.ggml_id, info.block_size, info.block_bytes);
    }
    return out;
  });
  m.def("dequantize_supported", [](nb::handle t) { return dequantize_supported(ggml_dtype(t)); }, nb::arg("ggml_type"));
  m.def("dequantize", &dequantize_binding, nb::arg("raw"), nb::arg("ggml_type"), nb::arg("out"), nb::arg("stream") = 0,
        "Dequantize the GGML blocks in `raw` (uint8) into `out` (f32/f16/bf16, its shape is the tensor's)");
}

}  // namespace flashlm::bindings
