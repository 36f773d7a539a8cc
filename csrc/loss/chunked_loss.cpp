// Chunked loss dispatcher: checks every argument (naming it), then runs the CUDA kernels or the CPU kernels
// (AVX2 where cpu_isa() allows, else scalar) with rows shared out over the thread pool, and on the CPU the
// gather/scatter of indexed entries. Reference: torch's log_softmax, cross_entropy and kl_div
// (tests/test_loss.py).
#include "flashlm/loss/chunked_loss.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "chunked_loss_kernels.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"

namespace flashlm::loss {
namespace {

using detail::ChunkArgs;

// Elements per pool range: a chunk row is typically thousands of columns, so a few rows per range.
constexpr int64_t kGrainElements = 16384;

bool has(const TensorView& t) { return t.ndim != 0 || t.data != nullptr; }

// A [rows, cols] view of `dtype` on `like`'s device, the last dimension contiguous, rows at a stride >= cols
// (or any stride for one row); `like` is the logits.
void check_rows(const TensorView& t, const char* name, int64_t rows, int64_t cols, DType dtype,
                const TensorView& like) {
  FLASHLM_CHECK(t.ndim == 2, name, ": expected 2 dimensions [rows, cols], got shape ", t.shape_string());
  FLASHLM_CHECK(t.shape[0] == rows && t.shape[1] == cols, name, ": expected shape [", rows, ", ", cols, "], got ",
                t.shape_string());
  FLASHLM_CHECK(t.dtype == dtype, name, ": dtype must be ", dtype_name(dtype), ", got ", dtype_name(t.dtype));
  FLASHLM_CHECK(t.device == like.device, name, ": must be on the logits' device");
  FLASHLM_CHECK(cols <= 1 || t.strides[1] == 1, name, ": the last dimension must be contiguous, got stride ",
                t.strides[1]);
  FLASHLM_CHECK(rows <= 1 || t.strides[0] >= cols, name, ": row stride ", t.strides[0], " < cols = ", cols);
  FLASHLM_CHECK(t.numel() == 0 || t.data != nullptr, name, ": null data");
}

// A contiguous [rows] or [rows, width] f32 view (width 0: one dimension).
void check_per_row(const TensorView& t, const char* name, int64_t rows, int64_t width, const TensorView& like) {
  if (width == 0) {
    FLASHLM_CHECK(t.ndim == 1 && t.shape[0] == rows, name, ": expected shape [", rows, "], got ", t.shape_string());
    FLASHLM_CHECK(rows <= 1 || t.strides[0] == 1, name, ": must be contiguous");
    FLASHLM_CHECK(t.dtype == DType::F32, name, ": dtype must be F32, got ", dtype_name(t.dtype));
    FLASHLM_CHECK(t.device == like.device, name, ": must be on the logits' device");
    FLASHLM_CHECK(t.numel() == 0 || t.data != nullptr, name, ": null data");
    return;
  }
  check_rows(t, name, rows, width, DType::F32, like);
  FLASHLM_CHECK(rows <= 1 || t.strides[0] == width, name, ": must be contiguous");
}

// The common part of every step: the logits, the chunk's start and scale, the device.
ChunkArgs logits_args(const TensorView& logits, int64_t start, double scale) {
  FLASHLM_CHECK(logits.ndim == 2, "logits: expected 2 dimensions [rows, cols], got shape ", logits.shape_string());
  check_rows(logits, "logits", logits.shape[0], logits.shape[1], DType::F32, logits);
  FLASHLM_CHECK(start >= 0 && start <= INT64_MAX - logits.shape[1], "start: must be >= 0 (and start + cols fit "
                "int64), got ", start);
  FLASHLM_CHECK(std::isfinite(scale) && scale > 0, "scale: must be finite and > 0, got ", scale);
  if (logits.device.is_cuda()) {
    FLASHLM_CHECK(cuda_compiled(), "logits: a CUDA tensor, but flashlm was built without CUDA");
    FLASHLM_CHECK(logits.device.index >= 0 && logits.device.index < cuda_device_count(), "logits: no CUDA device ",
                  logits.device.index, " (", cuda_status(), ")");
  }
  ChunkArgs a;
  a.logits = static_cast<const float*>(logits.data);
  a.logits_stride = logits.strides[0];
  a.rows = logits.shape[0];
  a.cols = logits.shape[1];
  a.start = start;
  a.scale = float(scale);
  return a;
}

// index [rows, k] (I64) and its companion [rows, k] (F32), both optional together.
void set_index(ChunkArgs& a, const TensorView& logits, const TensorView& index, const TensorView& other,
               const char* other_name) {
  FLASHLM_CHECK(has(index) == has(other), "index: given without ", other_name, " or the reverse");
  if (!has(index)) return;
  FLASHLM_CHECK(index.ndim == 2, "index: expected 2 dimensions [rows, k], got shape ", index.shape_string());
  const int64_t k = index.shape[1];
  check_rows(index, "index", a.rows, k, DType::I64, logits);
  FLASHLM_CHECK(a.rows <= 1 || index.strides[0] == k, "index: must be contiguous");
  check_per_row(other, other_name, a.rows, k, logits);
  a.index = static_cast<const int64_t*>(index.data);
  a.k = k;
}

void set_dlogits(ChunkArgs& a, const TensorView& logits, const TensorView& dlogits, bool accumulate) {
  check_rows(dlogits, "dlogits", a.rows, a.cols, DType::F32, logits);
  a.dlogits = static_cast<float*>(dlogits.data);
  a.dlogits_stride = dlogits.strides[0];
  a.accumulate = accumulate;
}

using Kernel = void (*)(const ChunkArgs&, int64_t, int64_t);

void run_rows(const ChunkArgs& a, Kernel scalar, Kernel vector) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, a.cols));
  const bool use_avx2 = cpu_isa() == CpuIsa::AVX2;
  parallel_for(a.rows, grain, [&](int64_t begin, int64_t end) {
    if (use_avx2) vector(a, begin, end);
    else scalar(a, begin, end);
  });
}

// The column of vocabulary entry `v` in this chunk, or -1.
int64_t column(const ChunkArgs& a, int64_t v) { return v >= a.start && v - a.start < a.cols ? v - a.start : -1; }

// dlogits -= weight at each indexed column inside the chunk (the gradient's sparse part, on the CPU).
void subtract_at_index(const ChunkArgs& a) {
  for (int64_t i = 0; i < a.rows * a.k; ++i) {
    const int64_t c = column(a, a.index[i]);
    if (c >= 0) a.dlogits[(i / a.k) * a.dlogits_stride + c] -= a.weight[i];
  }
}

}  // namespace

void logsumexp_chunk(const TensorView& logits, int64_t start, double scale, const TensorView& state,
                     const TensorView& index, const TensorView& gathered, void* stream) {
  ChunkArgs a = logits_args(logits, start, scale);
  check_per_row(state, "state", a.rows, detail::kLseState, logits);
  a.state = static_cast<float*>(state.data);
  set_index(a, logits, index, gathered, "gathered");
  a.gathered = static_cast<float*>(gathered.data);
  if (a.rows == 0) return;
  if (logits.device.is_cuda()) return detail::logsumexp_cuda(a, logits.device.index, stream);
  run_rows(a, detail::logsumexp_scalar, detail::logsumexp_avx2);
  for (int64_t i = 0; i < a.rows * a.k; ++i) {
    const int64_t c = column(a, a.index[i]);
    if (c >= 0) a.gathered[i] = a.logits[(i / a.k) * a.logits_stride + c];
  }
}

void softmax_chunk_grad(const TensorView& logits, int64_t start, double scale, const TensorView& lse,
                        const TensorView& coef, const TensorView& index, const TensorView& weight,
                        const TensorView& dlogits, bool accumulate, void* stream) {
  ChunkArgs a = logits_args(logits, start, scale);
  check_per_row(lse, "lse", a.rows, 0, logits);
  check_per_row(coef, "coef", a.rows, 0, logits);
  a.stats = static_cast<const float*>(lse.data);
  a.coef = static_cast<const float*>(coef.data);
  set_index(a, logits, index, weight, "weight");
  a.weight = static_cast<const float*>(weight.data);
  set_dlogits(a, logits, dlogits, accumulate);
  if (a.rows == 0 || a.cols == 0) return;
  if (logits.device.is_cuda()) return detail::softmax_grad_cuda(a, logits.device.index, stream);
  run_rows(a, detail::softmax_grad_scalar, detail::softmax_grad_avx2);
  subtract_at_index(a);
}

void kl_chunk(const TensorView& logits, const TensorView& teacher, double scale, bool reverse,
              const TensorView& state, void* stream) {
  ChunkArgs a = logits_args(logits, 0, scale);
  check_rows(teacher, "teacher", a.rows, a.cols, DType::F32, logits);
  check_per_row(state, "state", a.rows, detail::kKLState, logits);
  a.teacher = static_cast<const float*>(teacher.data);
  a.teacher_stride = teacher.strides[0];
  a.state = static_cast<float*>(state.data);
  a.reverse = reverse;
  if (a.rows == 0) return;
  if (logits.device.is_cuda()) return detail::kl_cuda(a, logits.device.index, stream);
  run_rows(a, detail::kl_scalar, detail::kl_avx2);
}

void kl_chunk_grad(const TensorView& logits, const TensorView& teacher, double scale, bool reverse,
                   const TensorView& stats, const TensorView& coef, const TensorView& dlogits, bool accumulate,
                   void* stream) {
  ChunkArgs a = logits_args(logits, 0, scale);
  check_rows(teacher, "teacher", a.rows, a.cols, DType::F32, logits);
  check_per_row(stats, "stats", a.rows, detail::kKLStats, logits);
  check_per_row(coef, "coef", a.rows, 0, logits);
  a.teacher = static_cast<const float*>(teacher.data);
  a.teacher_stride = teacher.strides[0];
  a.stats = static_cast<const float*>(stats.data);
  a.coef = static_cast<const float*>(coef.data);
  a.reverse = reverse;
  set_dlogits(a, logits, dlogits, accumulate);
  if (a.rows == 0 || a.cols == 0) return;
  if (logits.device.is_cuda()) return detail::kl_grad_cuda(a, logits.device.index, stream);
  run_rows(a, detail::kl_grad_scalar, detail::kl_grad_avx2);
}

void distill_chunk_grad(const TensorView& logits, const TensorView& teacher, int64_t start, double scale,
                        bool reverse, const TensorView& stats, const TensorView& coef, const TensorView& lse,
                        const TensorView& hard_coef, const TensorView& index, const TensorView& weight,
                        const TensorView& dlogits, void* stream) {
  ChunkArgs a = logits_args(logits, start, scale);
  check_rows(teacher, "teacher", a.rows, a.cols, DType::F32, logits);
  check_per_row(stats, "stats", a.rows, detail::kKLStats, logits);
  check_per_row(coef, "coef", a.rows, 0, logits);
  check_per_row(lse, "lse", a.rows, 0, logits);
  check_per_row(hard_coef, "hard_coef", a.rows, 0, logits);
  a.teacher = static_cast<const float*>(teacher.data);
  a.teacher_stride = teacher.strides[0];
  a.stats = static_cast<const float*>(stats.data);
  a.coef = static_cast<const float*>(coef.data);
  a.hard_lse = static_cast<const float*>(lse.data);
  a.hard_coef = static_cast<const float*>(hard_coef.data);
  a.reverse = reverse;
  set_index(a, logits, index, weight, "weight");
  a.weight = static_cast<const float*>(weight.data);
  set_dlogits(a, logits, dlogits, false);
  if (a.rows == 0 || a.cols == 0) return;
  if (logits.device.is_cuda()) return detail::kl_grad_cuda(a, logits.device.index, stream);
  run_rows(a, detail::kl_grad_scalar, detail::kl_grad_avx2);
  subtract_at_index(a);
}

}  // namespace flashlm::loss

#ifndef FLASHLM_HAVE_AVX2_KERNELS
namespace flashlm::loss::detail {  // never called: cpu_isa() is never AVX2 in such a build
void logsumexp_avx2(const ChunkArgs& a, int64_t b, int64_t e) { logsumexp_scalar(a, b, e); }
void softmax_grad_avx2(const ChunkArgs& a, int64_t b, int64_t e) { softmax_grad_scalar(a, b, e); }
void kl_avx2(const ChunkArgs& a, int64_t b, int64_t e) { kl_scalar(a, b, e); }
void kl_grad_avx2(const ChunkArgs& a, int64_t b, int64_t e) { kl_grad_scalar(a, b, e); }
}  // namespace flashlm::loss::detail
#endif

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::loss::detail {
void logsumexp_cuda(const ChunkArgs&, int, void*) { throw NotImplementedError("logsumexp_chunk: built without CUDA"); }
void softmax_grad_cuda(const ChunkArgs&, int, void*) {
  throw NotImplementedError("softmax_chunk_grad: built without CUDA");
}
void kl_cuda(const ChunkArgs&, int, void*) { throw NotImplementedError("kl_chunk: built without CUDA"); }
void kl_grad_cuda(const ChunkArgs&, int, void*) { throw NotImplementedError("kl_chunk_grad: built without CUDA"); }
}  // namespace flashlm::loss::detail
#endif
