#include "flashlm/core/dtype.h"

#include <cctype>

#include "flashlm/core/error.h"

namespace flashlm {
namespace {

// Indexed by DType. Block sizes and bytes are ggml's (ggml-common.h). gguf-py's GGML_QUANT_SIZES agrees except
// for Q8_1, which it lists as 40 bytes (float d and s); ggml's block_q8_1 holds two halves: 36 bytes.
constexpr DTypeInfo kInfo[kNumDTypes] = {
    {"F32", 0, 1, 4},         {"F16", 1, 1, 2},        {"BF16", 30, 1, 2},     {"F64", 28, 1, 8},
    {"I8", 24, 1, 1},         {"U8", -1, 1, 1},        {"I16", 25, 1, 2},      {"I32", 26, 1, 4},
    {"I64", 27, 1, 8},
    {"Q4_0", 2, 32, 18},      {"Q4_1", 3, 32, 20},     {"Q5_0", 6, 32, 22},    {"Q5_1", 7, 32, 24},
    {"Q8_0", 8, 32, 34},      {"Q8_1", 9, 32, 36},
    {"Q2_K", 10, 256, 84},    {"Q3_K", 11, 256, 110},  {"Q4_K", 12, 256, 144}, {"Q5_K", 13, 256, 176},
    {"Q6_K", 14, 256, 210},   {"Q8_K", 15, 256, 292},
    {"IQ2_XXS", 16, 256, 66}, {"IQ2_XS", 17, 256, 74}, {"IQ3_XXS", 18, 256, 98}, {"IQ1_S", 19, 256, 50},
    {"IQ4_NL", 20, 32, 18},   {"IQ3_S", 21, 256, 110}, {"IQ2_S", 22, 256, 82}, {"IQ4_XS", 23, 256, 136},
    {"IQ1_M", 29, 256, 56},
    {"TQ1_0", 34, 256, 54},   {"TQ2_0", 35, 256, 66},  {"MXFP4", 39, 32, 17},  {"NVFP4", 40, 64, 36},
    {"Q1_0", 41, 128, 18},
};

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::toupper(static_cast<unsigned char>(a[i])) != std::toupper(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

}  // namespace

const DTypeInfo& dtype_info(DType dtype) {
  int i = static_cast<int>(dtype);
  FLASHLM_CHECK(i >= 0 && i < kNumDTypes, "dtype: unknown value ", i);
  return kInfo[i];
}

std::optional<DType> dtype_from_ggml(uint32_t ggml_id) {
  for (int i = 0; i < kNumDTypes; ++i)
    if (kInfo[i].ggml_id >= 0 && static_cast<uint32_t>(kInfo[i].ggml_id) == ggml_id) return static_cast<DType>(i);
  return std::nullopt;
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (int i = 0; i < kNumDTypes; ++i)
    if (iequals(name, kInfo[i].name)) return static_cast<DType>(i);
  return std::nullopt;
}

int64_t storage_bytes(DType dtype, int64_t n_elements) {
  const DTypeInfo& info = dtype_info(dtype);
  FLASHLM_CHECK(n_elements >= 0, "element count must be >= 0, got ", n_elements);
  FLASHLM_CHECK(n_elements % info.block_size == 0, info.name, " holds elements in blocks of ", info.block_size,
                "; ", n_elements, " elements is not a whole number of blocks");
  int64_t blocks = n_elements / info.block_size;
  int64_t bytes = 0;
  FLASHLM_CHECK(!__builtin_mul_overflow(blocks, info.block_bytes, &bytes), "size of ", n_elements, " ",
                info.name, " elements overflows int64");
  return bytes;
}

}  // namespace flashlm
