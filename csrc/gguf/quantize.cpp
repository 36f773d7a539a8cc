// Quantization dispatcher: checks the views, then quantizes whole rows on the library's thread pool.
// F16/BF16 rows are widened to f32 first (exactly), so every input type goes through the same
// quantizer; F32/F16/BF16 outputs are plain conversions, rounding to nearest even.
#include "flashlm/gguf/quantize.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "shared_decoders.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "quantize_rows.h"

namespace flashlm {
namespace {

// Rows handed to one thread cover at least this many elements: at 10-70 M elements/s per thread (K-quants
// to legacy types, bench/compare_quantize.py) a task takes 0.5-3 ms, far above the ~10 us a wake-up
// costs, and a 4096-wide matrix still splits into tasks of 8 rows.
constexpr int64_t kGrainElements = 1 << 15;

bool is_float_type(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// One row of `n` elements as f32: a view of src when it already is f32, else widened into `buf`.
const float* row_as_f32(const uint8_t* src, DType type, int64_t n, std::vector<float>& buf) {
  if (type == DType::F32) return reinterpret_cast<const float*>(src);
  buf.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = core::ld_u16(src + 2 * i);
    buf[i] = type == DType::F16 ? core::f16_to_f32(bits) : core::bf16_to_f32(bits);
  }
  return buf.data();
}

void convert_row(const float* x, int64_t n, DType out_type, uint8_t* out) {
  if (out_type == DType::F32) {
    std::memcpy(out, x, static_cast<size_t>(n) * 4);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = out_type == DType::F16 ? core::f32_to_f16(x[i]) : core::f32_to_bf16(x[i]);
    out[2 * i] = static_cast<uint8_t>(h);
    out[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
}

std::string supported_names() {
  std::string names;
  for (int i = 0; i < kNumDTypes; ++i)
    if (quantize_supported(static_cast<DType>(i))) names += std::string(names.empty() ? "" : ", ") + dtype_name(static_cast<DType>(i));
  return names;
}

}  // namespace

bool quantize_supported(DType type) { return is_float_type(type) || gguf::detail::quantize_row_fn(type) != nullptr; }

namespace {

// The messages name the arguments as the header (and the Python function) do: data, out, importance.
void quantize_rows(const TensorView& data, DType type, const TensorView& out, const TensorView* importance) {
  FLASHLM_CHECK(quantize_supported(type), "gguf_quantize: type ", dtype_name(type), " is not supported (",
                supported_names(), " are)");
  FLASHLM_CHECK(is_float_type(data.dtype), "gguf_quantize: data must be F32, F16 or BF16, got ",
                dtype_name(data.dtype));
  FLASHLM_CHECK(out.dtype == DType::U8, "gguf_quantize: out must be U8, got ", dtype_name(out.dtype));
  FLASHLM_CHECK(data.device.is_cpu() && out.device.is_cpu(), "gguf_quantize: data and out must be CPU tensors");
  FLASHLM_CHECK(data.is_contiguous(), "gguf_quantize: data must be contiguous");
  FLASHLM_CHECK(out.is_contiguous(), "gguf_quantize: out must be contiguous");
  FLASHLM_CHECK(data.ndim >= 1, "gguf_quantize: data must have at least one dimension");
  const DTypeInfo& info = dtype_info(type);
  const int64_t row = data.shape[data.ndim - 1];
  FLASHLM_CHECK(row % info.block_size == 0, "gguf_quantize: data's row length (", row, ") must be a multiple of ",
                info.name, "'s block size ", info.block_size);
  const int64_t n = data.numel();
  const int64_t out_bytes = storage_bytes(type, n);
  FLASHLM_CHECK(out.numel() == out_bytes, "gguf_quantize: out has ", out.numel(), " bytes, ", info.name, " needs ",
                out_bytes, " for ", n, " elements");
  const float* qw = nullptr;
  if (importance) {
    FLASHLM_CHECK(importance->dtype == DType::F32, "gguf_quantize: importance must be F32, got ",
                  dtype_name(importance->dtype));
    FLASHLM_CHECK(importance->device.is_cpu(), "gguf_quantize: importance must be a CPU tensor");
    FLASHLM_CHECK(importance->is_contiguous(), "gguf_quantize: importance must be contiguous");
    FLASHLM_CHECK(importance->numel() == row, "gguf_quantize: importance has ", importance->numel(),
                  " values, data's rows have ", row);
    FLASHLM_CHECK(row == 0 || importance->data, "gguf_quantize: null importance pointer");
    qw = static_cast<const float*>(importance->data);
  }
  if (n == 0) return;
  FLASHLM_CHECK(data.data && out.data, "gguf_quantize: null data pointer");

  const int64_t rows = n / row;
  const int64_t in_row_bytes = row * (data.dtype == DType::F32 ? 4 : 2);
  const int64_t out_row_bytes = out_bytes / rows;
  const auto* in = static_cast<const uint8_t*>(data.data);
  auto* blocks = static_cast<uint8_t*>(out.data);
  const gguf::detail::QuantizeRowFn quantize_row = gguf::detail::quantize_row_fn(type);
  parallel_for(rows, std::max<int64_t>(1, kGrainElements / row), [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = row_as_f32(in + r * in_row_bytes, data.dtype, row, buf);
      if (quantize_row) {
        quantize_row(x, blocks + r * out_row_bytes, row, qw);
      } else {
        convert_row(x, row, type, blocks + r * out_row_bytes);
      }
    }
  });
}

}  // namespace

void gguf_quantize(const TensorView& data, DType type, const TensorView& out) { quantize_rows(data, type, out, nullptr); }

void gguf_quantize(const TensorView& data, DType type, const TensorView& out, const TensorView& importance) {
  quantize_rows(data, type, out, &importance);
}

}  // namespace flashlm
