// nb::ndarray (torch or numpy via DLPack, zero-copy) -> flashlm::TensorView, with checks that name the
// argument.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

#include "flashlm/core/error.h"
#include "flashlm/core/tensor.h"

namespace flashlm::bindings {

namespace nb = nanobind;

inline DType dtype_of(const nb::ndarray<>& a, const char* name) {
  nb::dlpack::dtype t = a.dtype();
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

inline Device device_of(const nb::ndarray<>& a, const char* name) {
  if (a.device_type() == nb::device::cpu::value) return Device{DeviceType::CPU, 0};
  if (a.device_type() == nb::device::cuda::value) return Device{DeviceType::CUDA, static_cast<int>(a.device_id())};
  throw ValueError(std::string(name) + ": only CPU and CUDA tensors are supported");
}

inline TensorView to_view(const nb::ndarray<>& a, const char* name) {
  FLASHLM_CHECK(a.ndim() <= static_cast<size_t>(kMaxDims), name, ": at most ", kMaxDims, " dimensions, got ", a.ndim());
  TensorView v;
  v.data = a.data();
  v.dtype = dtype_of(a, name);
  v.device = device_of(a, name);
  v.ndim = static_cast<int>(a.ndim());
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = static_cast<int64_t>(a.shape(d));
    v.strides[d] = static_cast<int64_t>(a.stride(d));
  }
  return v;
}

}  // namespace flashlm::bindings
