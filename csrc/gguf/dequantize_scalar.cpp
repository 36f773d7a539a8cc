// Scalar dequantization: the per-type decoders of shared_decoders.h, one element at a time. The oracle
// for the AVX2 and CUDA kernels, and the fallback on CPUs without AVX2.
#include <cstring>

#include "shared_decoders.h"
#include "dequantize_kernels.h"
#include "flashlm/core/error.h"

namespace flashlm::gguf::detail {
namespace {

template <DType Out>
void store(void* dst, int64_t index, float v) {
  if constexpr (Out == DType::F32) {
    static_cast<float*>(dst)[index] = v;
  } else if constexpr (Out == DType::F16) {
    static_cast<uint16_t*>(dst)[index] = f32_to_f16(v);
  } else {
    static_cast<uint16_t*>(dst)[index] = f32_to_bf16(v);
  }
}

template <class D, DType Out>
void blocks(const uint8_t* src, int64_t begin, int64_t end, void* dst) {
  float y[8];
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* block = src + b * D::kBytes;
    for (int c = 0; c < D::kChunks; ++c) {
      D::chunk8(block, c, y);
      for (int k = 0; k < 8; ++k) store<Out>(dst, b * D::kBlock + 8 * c + k, y[k]);
    }
  }
}

template <DType Out>
void plain(DType type, const uint8_t* src, int64_t begin, int64_t end, void* dst) {
  if (type == Out) {  // same type: a copy
    int64_t size = dtype_info(type).block_bytes;
    std::memcpy(static_cast<uint8_t*>(dst) + begin * size, src + begin * size, (end - begin) * size);
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    float v;
    if (type == DType::F32) {
      std::memcpy(&v, src + 4 * i, 4);
    } else {
      uint32_t bits = ld_u16(src + 2 * i);
      v = type == DType::F16 ? f16_to_f32(bits) : bf16_to_f32(bits);
    }
    store<Out>(dst, i, v);
  }
}

template <DType Out>
void run(DType type, const uint8_t* src, int64_t begin, int64_t end, void* dst) {
  if (type == DType::F32 || type == DType::F16 || type == DType::BF16) return plain<Out>(type, src, begin, end, dst);
  bool ok = dispatch_block_type(type, [&](auto decoder) { blocks<decltype(decoder), Out>(src, begin, end, dst); });
  FLASHLM_CHECK(ok, "dequantize: no kernel for ", dtype_name(type));
}

}  // namespace

void dequantize_scalar(DType type, const uint8_t* src, int64_t begin, int64_t end, void* dst, DType out) {
  switch (out) {
    case DType::F32: return run<DType::F32>(type, src, begin, end, dst);
    case DType::F16: return run<DType::F16>(type, src, begin, end, dst);
    case DType::BF16: return run<DType::BF16>(type, src, begin, end, dst);
    default: throw ValueError(std::string("dequantize: output dtype must be F32, F16 or BF16, got ") + dtype_name(out));
  }
}

}  // namespace flashlm::gguf::detail
