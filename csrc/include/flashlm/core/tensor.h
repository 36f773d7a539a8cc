// TensorView: a non-owning view of device or host memory (pointer, dtype, device, shape, strides).
// Strides count elements. A view of a GGML block type is always contiguous and its shape counts
// elements, not blocks.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "flashlm/core/dtype.h"
#include "flashlm/core/export.h"

namespace flashlm {

enum class DeviceType : int32_t { CPU = 0, CUDA = 1 };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && (is_cpu() || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

constexpr int kMaxDims = 8;

struct FLASHLM_API TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  // A contiguous (row-major) view.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = {});
  static TensorView contiguous(void* data, DType dtype, int ndim, const int64_t* shape, Device device = {});

  int64_t numel() const;
  int64_t nbytes() const;  // storage bytes of numel() elements (contiguous views)
  bool is_contiguous() const;
  std::string shape_string() const;  // "[2, 3, 4]" for error messages
};

// `value` (a dimension, or a count derived from one) as an int, for the kernels that count heads, head_dim,
// block size or batch in 32 bits. A plain cast would wrap: a stride-0 view (torch's expand) has dimensions
// of 2^31 and more without the memory to match. ValueError naming `name` and `what` when it does not fit.
FLASHLM_API int count_as_int(int64_t value, const char* name, const char* what);

}  // namespace flashlm
