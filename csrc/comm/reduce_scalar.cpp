// The scalar reduction: dst := (a + b) / divisor, in f32, rounded once to the dtype (dst may be a). The oracle for the
// AVX2 (reduce_avx2.cpp) and CUDA (reduce_cuda.cu) kernels, which must match it bit for bit.
#include <cstdint>

#include "../core/half.h"
#include "ring_transport.h"

namespace flashlm::comm::detail {
namespace {

using core::bf16_to_f32;
using core::f16_to_f32;
using core::f32_to_bf16;
using core::f32_to_f16;

template <class Load, class Store, class T>
void reduce_loop(T* dst, const T* a, const T* b, int64_t n, float divisor, Load load, Store store) {
  if (divisor == 1.0f) {
    for (int64_t i = 0; i < n; ++i) dst[i] = store(load(a[i]) + load(b[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = store((load(a[i]) + load(b[i])) / divisor);
  }
}

}  // namespace

void reduce_add_scalar(DType dtype, void* dst, const void* a, const void* b, int64_t n, float divisor) {
  using H = uint16_t;
  auto* d16 = static_cast<H*>(dst);
  const auto *a16 = static_cast<const H*>(a), *b16 = static_cast<const H*>(b);
  switch (dtype) {
    case DType::F32:
      reduce_loop(static_cast<float*>(dst), static_cast<const float*>(a), static_cast<const float*>(b), n, divisor,
                  [](float x) { return x; }, [](float x) { return x; });
      break;
    case DType::F16:
      reduce_loop(d16, a16, b16, n, divisor, [](H h) { return f16_to_f32(h); }, [](float x) { return f32_to_f16(x); });
      break;
    case DType::BF16:
      reduce_loop(d16, a16, b16, n, divisor, [](H h) { return bf16_to_f32(h); }, [](float x) { return f32_to_bf16(x); });
      break;
    default:
      break;  // the dispatcher checked the dtype
  }
}

}  // namespace flashlm::comm::detail
