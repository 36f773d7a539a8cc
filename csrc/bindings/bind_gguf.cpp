// The GGUF reader: metadata as Python values, tensor infos as tuples, tensor bytes as zero-copy uint8
// arrays that keep the file's mapping alive.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/shared_ptr.h>

#include "flashlm/gguf/reader.h"

namespace nb = nanobind;

namespace flashlm::bindings {

using gguf::File;
using gguf::Value;
using gguf::ValueType;

namespace {

nb::object to_python(const Value& v);

nb::object scalar_to_python(const Value& v) {
  switch (v.type) {
    case ValueType::BOOL: return nb::bool_(v.u != 0);
    case ValueType::UINT8: case ValueType::UINT16: case ValueType::UINT32: case ValueType::UINT64:
      return nb::int_(v.u);
    case ValueType::INT8: case ValueType::INT16: case ValueType::INT32: case ValueType::INT64:
      return nb::int_(v.i);
    case ValueType::FLOAT32: case ValueType::FLOAT64: return nb::float_(v.f);
    case ValueType::STRING: return nb::str(v.string.data(), v.string.size());
    default: return to_python(v);
  }
}

nb::object to_python(const Value& v) {
  if (v.type != ValueType::ARRAY) return scalar_to_python(v);
  nb::list out;
  if (v.array_type == ValueType::STRING) {
    for (std::string_view s : v.strings) out.append(nb::str(s.data(), s.size()));
  } else if (v.array_type == ValueType::ARRAY) {
    for (const Value& item : v.arrays) out.append(to_python(item));
  } else {
    for (uint64_t k = 0; k < v.array_size; ++k) out.append(scalar_to_python(v.array_item(k)));
  }
  return out;
}

// "UINT32", "ARRAY[STRING]", "ARRAY[ARRAY]"
std::string type_string(const Value& v) {
  std::string t = gguf::value_type_name(v.type);
  if (v.type == ValueType::ARRAY) t += std::string("[") + gguf::value_type_name(v.array_type) + "]";
  return t;
}

struct Reader {
  std::shared_ptr<File> file;
  const File& get() const {
    if (!file) throw ValueError("GGUF file is closed");
    return *file;
  }
};

}  // namespace

void bind_gguf(nb::module_& m) {
  nb::exception<gguf::GGUFError>(m, "GGUFError", PyExc_ValueError);

  nb::class_<Reader>(m, "GGUFReader")
      .def("__init__", [](Reader* self, const std::string& path) {
        std::shared_ptr<File> file;
        {
          nb::gil_scoped_release release;
          file = std::make_shared<File>(File::open(path));
        }
        new (self) Reader{std::move(file)};
      }, nb::arg("path"))
      .def_prop_ro("version", [](const Reader& r) { return r.get().version(); })
      .def_prop_ro("alignment", [](const Reader& r) { return r.get().alignment(); })
      .def_prop_ro("data_offset", [](const Reader& r) { return r.get().data_offset(); })
      .def_prop_ro("file_size", [](const Reader& r) { return r.get().file_size(); })
      .def("metadata", [](const Reader& r) {
        nb::list out;
        for (const auto& [key, value] : r.get().metadata())
          out.append(nb::make_tuple(nb::str(key.data(), key.size()), type_string(value), to_python(value)));
        return out;
      }, "[(key, type, value)] in file order")
      .def("tensors", [](const Reader& r) {
        nb::list out;
        for (const auto& t : r.get().tensors()) {
          nb::list dims;
          for (int64_t d : t.dims) dims.append(d);
          out.append(nb::make_tuple(t.name, t.ggml_type, dtype_name(t.type), nb::tuple(dims), t.offset, t.nbytes));
        }
        return out;
      }, "[(name, ggml type id, type name, dims in GGUF order, absolute offset, nbytes)] in file order")
      .def("raw", [](const Reader& r, size_t index) {
        const File& f = r.get();
        FLASHLM_CHECK(index < f.tensors().size(), "index: ", index, " out of range (", f.tensors().size(), " tensors)");
        const auto& t = f.tensors()[index];
        // The capsule holds a reference to the mapping: the array stays valid after the reader closes.
        auto* keep = new std::shared_ptr<gguf::Mapping>(f.mapping());
        nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<std::shared_ptr<gguf::Mapping>*>(p); });
        size_t shape[1] = {static_cast<size_t>(t.nbytes)};
        return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(f.mapping()->mutable_data() + t.offset, 1, shape, owner);
      }, nb::arg("index"), "The tensor's bytes: a uint8 array viewing the mapping")
      .def("close", [](Reader& r) { r.file.reset(); })
      .def_prop_ro("closed", [](const Reader& r) { return !r.file; });
}

}  // namespace flashlm::bindings
