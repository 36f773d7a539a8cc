// Dequantization dispatcher: checks the views, then routes on device (CPU / CUDA) and, on the CPU, on the
// run-time ISA (AVX2 / scalar), splitting the blocks over the library's thread pool.
#include "flashlm/gguf/dequantize.h"

#include <algorithm>
#include <string>

#include "shared_decoders.h"
#include "shared_dequantize.h"
#include "dequantize_kernels.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"

namespace flashlm {
namespace {

// Outputs at least this large are written with streaming stores (AVX2 kernels): they skip reading the
// destination into the cache, a third of the traffic of a large f32 output, but leave none of it cached
// for whoever reads it next. Measured on a 2-core EPYC with a 32 MiB L3 (Q4_0/Q4_K/Q6_K to f32):
// rewriting one buffer, plain stores are 1.25-1.8x faster from 1 to 32 MiB (it stays in the L3) and
// streaming stores 1.2-1.3x faster at 48-64 MiB, 2x at 128 MiB; into a cold destination streaming
// stores are 1.2-1.5x faster at every size from 1 to 32 MiB.
constexpr int64_t kNontemporalBytes = 32 << 20;

// The shortest range of output handed to a thread: waking a worker costs ~5-10 us, and the AVX2
// kernels write 256 KiB into the cache in about that time; the scalar kernels are ~4x slower.
constexpr int64_t kGrainBytesAvx2 = 256 << 10, kGrainBytesScalar = 64 << 10;

}  // namespace

bool dequantize_supported(DType type) {
  if (type == DType::F32 || type == DType::F16 || type == DType::BF16) return true;
  return gguf::detail::dispatch_block_type(type, [](auto) {});
}

namespace {
// "F32, F16, ...": the supported types, for error messages, derived so it cannot drift from the kernels.
std::string supported_names() {
  std::string names;
  for (int i = 0; i < kNumDTypes; ++i)
    if (dequantize_supported(static_cast<DType>(i))) names += std::string(names.empty() ? "" : ", ") + dtype_name(static_cast<DType>(i));
  return names;
}
}  // namespace

void dequantize(const TensorView& src, const TensorView& dst, void* stream) {
  FLASHLM_CHECK(dequantize_supported(src.dtype), "dequantize: source type ", dtype_name(src.dtype),
                " is not supported (", supported_names(), " are)");
  FLASHLM_CHECK(dst.dtype == DType::F32 || dst.dtype == DType::F16 || dst.dtype == DType::BF16,
                "dequantize: output dtype must be F32, F16 or BF16, got ", dtype_name(dst.dtype));
  FLASHLM_CHECK(src.device == dst.device, "dequantize: source and output must be on the same device");
  FLASHLM_CHECK(src.is_contiguous(), "dequantize: source must be contiguous");
  FLASHLM_CHECK(dst.is_contiguous(), "dequantize: output must be contiguous");
  const int64_t n = dst.numel();
  FLASHLM_CHECK(src.numel() == n, "dequantize: source has ", src.numel(), " elements, output ", n);
  const DTypeInfo& info = dtype_info(src.dtype);
  const int64_t inner = dst.ndim ? dst.shape[dst.ndim - 1] : 1;
  FLASHLM_CHECK(inner % info.block_size == 0, "dequantize: the innermost dimension (", inner, ") of a ", info.name,
                " tensor must be a multiple of its block size ", info.block_size);
  const int64_t n_blocks = n / info.block_size;
  if (n_blocks == 0) return;
  FLASHLM_CHECK(src.data && dst.data, "dequantize: null data pointer");
  const auto* in = static_cast<const uint8_t*>(src.data);

  if (dst.device.is_cuda()) {
    if (!cuda_compiled()) throw NotImplementedError("dequantize: flashlm was built without CUDA");
    FLASHLM_CHECK(dst.device.index >= 0 && dst.device.index < cuda_device_count(), "dequantize: no CUDA device ",
                  dst.device.index, " (", cuda_status(), ")");
    gguf::detail::dequantize_cuda(src.dtype, in, n_blocks, dst.data, dst.dtype, dst.device.index, stream);
    return;
  }
  const int64_t out_bytes_per_block = info.block_size * (dst.dtype == DType::F32 ? 4 : 2);
  const bool avx2 = cpu_isa() == CpuIsa::AVX2;
  const int64_t grain = std::max<int64_t>(1, (avx2 ? kGrainBytesAvx2 : kGrainBytesScalar) / out_bytes_per_block);
  const bool nontemporal = n_blocks * out_bytes_per_block >= kNontemporalBytes;
  parallel_for(n_blocks, grain, [&](int64_t begin, int64_t end) {
    if (avx2 && gguf::detail::dequantize_avx2(src.dtype, in, begin, end, dst.data, dst.dtype, nontemporal)) return;
    gguf::detail::dequantize_scalar(src.dtype, in, begin, end, dst.data, dst.dtype);
  });
}

namespace gguf::detail {

void dequantize_blocks_f32(DType type, const uint8_t* src, int64_t count, float* dst, bool avx2) {
  if (avx2 && dequantize_avx2(type, src, 0, count, dst, DType::F32, false)) return;
  dequantize_scalar(type, src, 0, count, dst, DType::F32);
}

}  // namespace gguf::detail

}  // namespace flashlm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::gguf::detail {
void dequantize_cuda(DType, const uint8_t*, int64_t, void*, DType, int, void*) {
  throw NotImplementedError("dequantize: flashlm was built without CUDA");
}
}  // namespace flashlm::gguf::detail
#endif
