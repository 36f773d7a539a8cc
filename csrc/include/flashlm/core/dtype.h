// Element types: plain numeric types and the GGML block types. A block type stores `block_size` elements
// in `block_bytes` bytes (Q4_0: 32 elements in 18 bytes); plain types have block_size 1.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "flashlm/core/export.h"

namespace flashlm {

enum class DType : int32_t {
  // plain types
  F32, F16, BF16, F64, I8, U8, I16, I32, I64,
  // GGML block types (ggml-common.h)
  Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1,
  Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
  IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, IQ1_M,
  TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0,
};
constexpr int kNumDTypes = static_cast<int>(DType::Q1_0) + 1;

struct DTypeInfo {
  const char* name;     // "F32", "Q4_K": the names ggml and gguf-py use
  int32_t ggml_id;      // ggml_type value, -1 where ggml has none (U8)
  int64_t block_size;   // elements per block
  int64_t block_bytes;  // bytes per block
};

FLASHLM_API const DTypeInfo& dtype_info(DType dtype);
inline const char* dtype_name(DType dtype) { return dtype_info(dtype).name; }
inline bool is_block_type(DType dtype) { return dtype_info(dtype).block_size > 1; }

FLASHLM_API std::optional<DType> dtype_from_ggml(uint32_t ggml_id);
FLASHLM_API std::optional<DType> dtype_from_name(std::string_view name);  // case-insensitive

// Bytes that `n_elements` of `dtype` occupy; throws ValueError if n_elements is not a whole number of
// blocks or the byte count overflows int64.
FLASHLM_API int64_t storage_bytes(DType dtype, int64_t n_elements);

}  // namespace flashlm
