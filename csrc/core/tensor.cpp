#include "flashlm/core/tensor.h"

#include <limits>

#include "flashlm/core/error.h"

namespace flashlm {

TensorView TensorView::contiguous(void* data, DType dtype, int ndim, const int64_t* shape, Device device) {
  FLASHLM_CHECK(ndim >= 0 && ndim <= kMaxDims, "tensor: ndim must be in [0, ", kMaxDims, "], got ", ndim);
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = ndim;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    FLASHLM_CHECK(shape[d] >= 0, "tensor: shape[", d, "] must be >= 0, got ", shape[d]);
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    FLASHLM_CHECK(!__builtin_mul_overflow(stride, shape[d] > 0 ? shape[d] : 1, &stride),
                  "tensor: element count overflows int64");
  }
  return v;
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device) {
  return contiguous(data, dtype, static_cast<int>(shape.size()), shape.begin(), device);
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

int64_t TensorView::nbytes() const { return storage_bytes(dtype, numel()); }

bool TensorView::is_contiguous() const {
  // An empty view has no element to be out of place (torch agrees, whatever its strides: [4, 0] may have
  // strides [1, 1]); the product below would otherwise drop to zero and reject it.
  if (numel() == 0) return true;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != stride) return false;
    stride *= shape[d];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::string out = "[";
  for (int d = 0; d < ndim; ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
  return out + "]";
}

int count_as_int(int64_t value, const char* name, const char* what) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  FLASHLM_CHECK(value >= 0 && value <= kMax, name, ": ", what, " = ", value, " is outside the kernels' range [0, ", kMax,
                "]");
  return static_cast<int>(value);
}

}  // namespace flashlm
