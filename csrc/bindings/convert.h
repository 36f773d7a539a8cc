// Array arguments -> flashlm::TensorView, with checks that name the argument.
//
// A binding takes its tensors as `Array`, converted in one of two ways:
//   - fast: objects whose type offers DLPack's C exchange API (`__dlpack_c_exchange_api__`, torch >= 2.9)
//     describe themselves through one C call that fills a borrowed DLTensor (~0.1 us per tensor);
//   - otherwise nb::ndarray (the `__dlpack__` protocol or the buffer protocol: numpy, older torch), which
//     costs a Python call per tensor (~8 us for torch), too much for decode-sized kernels.
// The fast path borrows the tensor's memory: the caller's reference keeps it alive for the whole call, GIL
// released or not.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <optional>
#include <string>

#include "flashlm/core/error.h"
#include "flashlm/core/tensor.h"

namespace flashlm::bindings {

namespace nb = nanobind;

// DLPack's exchange API (dlpack.h, v1.2+), declared here so the build needs no framework's headers.
struct DLPackExchangeAPI {
  struct {
    uint32_t major, minor;
  } version;
  void* prev_api;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, nb::dlpack::dltensor* out);
  void* current_work_stream;
};

struct Array {
  void* data = nullptr;
  nb::dlpack::dtype dtype{};
  nb::dlpack::device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  nb::ndarray<> owner;             // set on the slow path: keeps the exported buffer alive
  // Set, instead of the fields above, when the argument is not an array the library can read (None, a list,
  // a meta tensor): to_view reports it under the argument's name. The caller's reference keeps it alive.
  PyObject* unreadable = nullptr;
};

// Why `obj` cannot be read as an array, as a Python exception naming the argument: a TypeError for what is
// no array at all, a ValueError for a tensor on another device or one that requires grad.
[[noreturn]] inline void raise_unreadable(nb::handle obj, const char* name) {
  const std::string type = nb::inst_name(obj).c_str();
  if (nb::hasattr(obj, "__dlpack__") || nb::hasattr(obj, "__array_interface__")) {
    if (nb::hasattr(obj, "device")) {
      const nb::object attr = obj.attr("device");
      const std::string device = nb::str(nb::handle(attr)).c_str();  // str(handle): str(device), not a cast
      if (device.rfind("cpu", 0) != 0 && device.rfind("cuda", 0) != 0)
        throw ValueError(std::string(name) + ": only CPU and CUDA tensors are supported, got a " + type + " on " +
                         device);
    }
    if (nb::hasattr(obj, "requires_grad") && nb::cast<bool>(obj.attr("requires_grad")))
      throw ValueError(std::string(name) + ": a tensor that requires grad cannot be passed to the kernels; detach() it");
    throw ValueError(std::string(name) + ": this " + type + " cannot be exported to the kernels through DLPack");
  }
  throw nb::type_error((std::string(name) + ": expected a tensor, got " + type).c_str());
}

// Fills `out` from a DLTensor (dimensions beyond a TensorView's are counted, not kept: to_view reports them).
inline void from_dltensor(const nb::dlpack::dltensor& t, Array& out) {
  out.data = static_cast<char*>(t.data) + t.byte_offset;
  out.dtype = t.dtype;
  out.device = t.device;
  out.ndim = t.ndim;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {  // strides may be absent: compact row-major
    if (d < kMaxDims) {
      out.shape[d] = t.shape[d];
      out.strides[d] = t.strides ? t.strides[d] : stride;
    }
    stride *= t.shape[d];
  }
}

// The exchange API of `tp`, or nullptr. Cached per type (the type is kept alive while cached); the GIL is
// held by every caller, so the cache needs no lock.
inline const DLPackExchangeAPI* exchange_api(PyTypeObject* tp) {
  struct Entry {
    PyTypeObject* type;
    const DLPackExchangeAPI* api;
  };
  static Entry cache[16];
  static int used = 0;
  for (int i = 0; i < used; ++i)
    if (cache[i].type == tp) return cache[i].api;
  const DLPackExchangeAPI* api = nullptr;
  PyObject* capsule = PyObject_GetAttrString(reinterpret_cast<PyObject*>(tp), "__dlpack_c_exchange_api__");
  if (!capsule) {
    PyErr_Clear();
  } else {
    if (PyCapsule_IsValid(capsule, "dlpack_exchange_api")) {
      auto* a = static_cast<const DLPackExchangeAPI*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
      if (a && a->version.major == 1 && a->dltensor_from_py_object_no_sync) api = a;
    }
    Py_DECREF(capsule);
  }
  if (used < 16) {
    Py_INCREF(tp);
    cache[used++] = {tp, api};
  }
  return api;
}

inline DType dtype_of(nb::dlpack::dtype t, const char* name) {
  using code = nb::dlpack::dtype_code;
  FLASHLM_CHECK(t.lanes == 1, name, ": vector dtypes are not supported");
  switch (static_cast<code>(t.code)) {
    case code::Float:
      if (t.bits == 32) return DType::F32;
      if (t.bits == 16) return DType::F16;
      if (t.bits == 64) return DType::F64;
      break;
    case code::Bfloat:
      if (t.bits == 16) return DType::BF16;
      break;
    case code::Int:
      if (t.bits == 8) return DType::I8;
      if (t.bits == 16) return DType::I16;
      if (t.bits == 32) return DType::I32;
      if (t.bits == 64) return DType::I64;
      break;
    case code::UInt:
      if (t.bits == 8) return DType::U8;
      break;
    default:
      break;
  }
  throw ValueError(std::string(name) + ": unsupported dtype (code " + std::to_string(t.code) + ", " +
                   std::to_string(t.bits) + " bits)");
}

inline Device device_of(nb::dlpack::device dev, const char* name) {
  if (dev.device_type == nb::device::cpu::value) return Device{DeviceType::CPU, 0};
  if (dev.device_type == nb::device::cuda::value) return Device{DeviceType::CUDA, static_cast<int>(dev.device_id)};
  throw ValueError(std::string(name) + ": only CPU and CUDA tensors are supported");
}

inline TensorView to_view(const Array& a, const char* name) {
  if (a.unreadable) raise_unreadable(a.unreadable, name);
  FLASHLM_CHECK(a.ndim <= kMaxDims, name, ": at most ", kMaxDims, " dimensions, got ", a.ndim);
  TensorView v;
  v.data = a.data;
  v.dtype = dtype_of(a.dtype, name);
  v.device = device_of(a.device, name);
  v.ndim = a.ndim;
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = a.shape[d];
    v.strides[d] = a.strides[d];
  }
  return v;
}

inline Array to_array(const nb::ndarray<>& a) {
  nb::dlpack::dltensor t{};
  t.data = a.data();
  t.device = {a.device_type(), a.device_id()};
  t.ndim = static_cast<int32_t>(a.ndim());
  t.dtype = a.dtype();
  int64_t shape[64], strides[64];
  const int n = t.ndim < 64 ? t.ndim : 64;
  for (int d = 0; d < n; ++d) {
    shape[d] = static_cast<int64_t>(a.shape(d));
    strides[d] = static_cast<int64_t>(a.stride(d));
  }
  t.ndim = n;
  t.shape = shape;
  t.strides = strides;
  Array out;
  from_dltensor(t, out);
  out.owner = a;
  return out;
}

inline TensorView to_view(const nb::ndarray<>& a, const char* name) { return to_view(to_array(a), name); }

// An optional argument (None allowed): its view, or the absent view (ndim 0, null data) that the params
// structs hold for one not given.
inline TensorView optional_view(const std::optional<Array>& a, const char* name) {
  return a ? to_view(*a, name) : TensorView{};
}

}  // namespace flashlm::bindings

namespace nanobind::detail {

namespace nb = nanobind;

// Accepts every object: what cannot be read as an array is kept as `unreadable`, so that to_view raises an
// error naming the argument instead of nanobind's list of the function's signatures.
template <>
struct type_caster<flashlm::bindings::Array> {
  NB_TYPE_CASTER(flashlm::bindings::Array, const_name("ndarray"))

  bool from_python(handle src, uint8_t flags, cleanup_list* cleanup) noexcept {
    if (const auto* api = flashlm::bindings::exchange_api(Py_TYPE(src.ptr()))) {
      nb::dlpack::dltensor t{};
      if (api->dltensor_from_py_object_no_sync(src.ptr(), &t) == 0) {
        flashlm::bindings::from_dltensor(t, value);
        value.owner = nb::ndarray<>();  // a list's caster converts every element into the same value
        value.unreadable = nullptr;
        return true;
      }
      PyErr_Clear();  // not exportable this way (e.g. a tensor needing grad): try the protocol below
    }
    make_caster<nb::ndarray<>> slow;
    if (slow.from_python(src, flags, cleanup)) {
      value = flashlm::bindings::to_array(slow.value);
    } else {
      PyErr_Clear();
      value.unreadable = src.ptr();
    }
    return true;
  }

  static handle from_cpp(const flashlm::bindings::Array&, rv_policy, cleanup_list*) noexcept { return handle(); }
};

}  // namespace nanobind::detail
