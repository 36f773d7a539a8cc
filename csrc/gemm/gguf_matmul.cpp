// GGUF matmul dispatcher: checks every argument, then routes on device and, on the CPU, on the run-time
// ISA. CPU: quantize the activation rows (gguf_matmul_kernels.h), split the weight rows over the thread
// pool, and add the bias / convert to the output dtype on each thread's own range of columns.
#include "flashlm/gemm/gguf_matmul.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "../core/half.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "gguf_matmul_kernels.h"

namespace flashlm {

namespace {

// A range of weight rows handed to one thread holds about this many multiply-adds (~3 us of the AVX2
// kernels): handing a range to a polling worker costs well under a microsecond.
constexpr int64_t kGrainMacs = 1 << 16;
// From this many rows of x on, weights in the plain layout go through the x4 VNNI kernels, regrouped a panel at
// a time (x4_rows_regrouped); below it the plain kernels run. Per CPU-second of one thread (Q4_0, Q8_0, Q4_K,
// Q6_K at 1024x1024 and 2752x1024, bench/results/gguf_matmul.md): regrouped 1.08-1.67x the plain AVX2 kernels at
// M = 8, 1.4-1.75x at 16, but 0.6-1.3x at 4 (Q8_0, whose regrouping moves the most pieces, loses there).
constexpr int64_t kRegroupMinRows = 8;

void check_vector(const TensorView& t, const char* name, int ndim, Device device) {
  FLASHLM_CHECK(t.ndim == ndim, "gguf_matmul: ", name, " must have ", ndim, " dimensions, got ", t.shape_string());
  FLASHLM_CHECK(t.is_contiguous(), "gguf_matmul: ", name, " must be contiguous");
  FLASHLM_CHECK(t.device == device, "gguf_matmul: ", name, " must be on x's device");
}

void gguf_matmul_cpu(const TensorView& x, const uint8_t* w, DType type, int64_t n, const TensorView* bias,
                     const TensorView& y) {
  using namespace gemm::detail;
  const int64_t m = x.shape[0], k = x.shape[1];
  if (x.dtype == DType::F32) {
    const MatmulPart part{type, w, n, bias ? static_cast<const float*>(bias->data) : nullptr,
                          static_cast<float*>(y.data)};
    gguf_matmul_parts_f32(static_cast<const float*>(x.data), m, k, &part, 1);
    return;
  }
  // bf16: the products go through a float buffer, converted (with the bias) on each thread's columns.
  const int64_t act_bytes = act_row_bytes(type, k);
  std::vector<uint8_t> acts(static_cast<size_t>(m * act_bytes));
  parallel_for(m, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
    quantize_activations(type, x.data, x.dtype, k, m0, m1, acts.data());
  });
  std::vector<float> yf(static_cast<size_t>(m * n));
  const RowsArgs args{type, w, storage_bytes(type, k), acts.data(), act_bytes, m, k, yf.data(), n};
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, m * k));
  parallel_for(n, grain, [&](int64_t n0, int64_t n1) {
    gemm::detail::gguf_matmul_rows(args, n0, n1);
    for (int64_t i = 0; i < m; ++i) {
      const float* row = yf.data() + i * n;
      auto* out = static_cast<uint16_t*>(y.data) + i * n;
      const auto* b = bias ? static_cast<const uint16_t*>(bias->data) : nullptr;
      for (int64_t j = n0; j < n1; ++j) {
        const float bj = b ? core::bf16_to_f32(b[j]) : 0.f;
        out[j] = core::f32_to_bf16(row[j] + bj);
      }
    }
  });
}

}  // namespace

namespace gemm::detail {

void gguf_matmul_rows(const RowsArgs& a, int64_t n0, int64_t n1) {
  if (cpu_isa() == CpuIsa::AVX2) {
#ifdef FLASHLM_HAVE_AVXVNNI_KERNELS
    if (cpu_features().avx_vnni && vnni_allowed() && gguf_matmul_rows_vnni(a, n0, n1)) return;
#endif
    if (gguf_matmul_rows_avx2(a, n0, n1)) return;
  }
  gguf_matmul_rows_scalar(a, n0, n1);
}

void gguf_matmul_parts_f32(const float* x, int64_t m, int64_t k, const MatmulPart* parts, int count) {
  // The two activation formats: ActQ8x2 rows for the 32-element types, Q8_K rows for the K-quants.
  int64_t act_bytes[2] = {act_row_bytes(DType::Q8_0, k), 0};
  bool wanted[2] = {false, false};
  for (int i = 0; i < count; ++i) wanted[uses_q8_k(parts[i].type)] = true;
  if (wanted[1]) act_bytes[1] = act_row_bytes(DType::Q4_K, k);
  std::vector<uint8_t> acts[2];
  for (int f = 0; f < 2; ++f) {
    if (!wanted[f]) continue;
    acts[f].resize(static_cast<size_t>(m * act_bytes[f]));
    const DType as = f ? DType::Q4_K : DType::Q8_0;
    parallel_for(m, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
      quantize_activations(as, x, DType::F32, k, m0, m1, acts[f].data());
    });
  }
  const bool avx2 = cpu_isa() == CpuIsa::AVX2;
  const bool vnni = avx2 && x4_vnni_available();
  // Which plain parts are regrouped on the fly: a batch of rows large enough to pay for the regrouping.
  std::vector<char> regroup(static_cast<size_t>(count), 0);
  for (int i = 0; i < count; ++i)
    regroup[i] = vnni && m >= kRegroupMinRows && !parts[i].packed && repack_x4_supported(parts[i].type, parts[i].n, k);
  std::vector<uint8_t> extras;  // the regrouped kernel's activation terms, once for all threads
  bool packed = false;  // the K-quants' kernels read their activation blocks only
  for (int i = 0; i < count; ++i) packed |= avx2 && (parts[i].packed || regroup[i]) && !uses_q8_k(parts[i].type);
  if (packed) {
    extras.resize(static_cast<size_t>(m * (k / 64) * kX4ExtraBytes));
    if (vnni) x4_pair_extras_vnni(acts[0].data(), act_bytes[0], m, k, extras.data());
    else x4_pair_extras_avx2(acts[0].data(), act_bytes[0], m, k, extras.data());
  }
  // The rows of all parts are handed out in units of 4 (a regrouped weight's row group), each part's last
  // unit holding its n % 4 rows; units[i] is where part i's first unit is.
  std::vector<int64_t> units(static_cast<size_t>(count) + 1, 0);
  for (int i = 0; i < count; ++i) units[i + 1] = units[i] + (parts[i].n + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, 4 * m * k));
  parallel_for(units[count], grain, [&](int64_t u0, int64_t u1) {
    for (int i = 0; i < count; ++i) {
      const MatmulPart& p = parts[i];
      const int64_t n0 = std::min(std::max<int64_t>(u0 - units[i], 0) * 4, p.n);
      const int64_t n1 = std::min(std::max<int64_t>(u1 - units[i], 0) * 4, p.n);
      if (n0 >= n1) continue;
      const int f = uses_q8_k(p.type);
      if (p.packed) {
        x4_rows(p, k, acts[f].data(), act_bytes[f], extras.data(), m, avx2, vnni, n0, n1);
      } else if (regroup[i]) {
        x4_rows_regrouped(p, k, acts[f].data(), act_bytes[f], extras.data(), m, n0, n1);
      } else {
        gguf_matmul_rows({p.type, p.w, storage_bytes(p.type, k), acts[f].data(), act_bytes[f], m, k, p.y, p.n}, n0, n1);
      }
      if (p.bias)
        for (int64_t i2 = 0; i2 < m; ++i2)
          for (int64_t j = n0; j < n1; ++j) p.y[i2 * p.n + j] += p.bias[j];
    }
  });
}

}  // namespace gemm::detail

void gemm::detail::check_weight_bytes(const char* fn, const TensorView& w, const char* name, DType type, int64_t n,
                                      int64_t k, Device device) {
  FLASHLM_CHECK(w.dtype == DType::U8, fn, ": ", name, " must be uint8 (the blocks' bytes), got ", dtype_name(w.dtype));
  FLASHLM_CHECK(w.is_contiguous(), fn, ": ", name, " must be contiguous");
  FLASHLM_CHECK(w.device == device, fn, ": ", name, " must be on x's device");
  FLASHLM_CHECK(n >= 0 && k >= 0, fn, ": n and k must be >= 0, got ", n, " and ", k);
  FLASHLM_CHECK(k == 0 || n <= std::numeric_limits<int64_t>::max() / k, fn, ": N * K overflows");
  const int64_t expected = storage_bytes(type, n * k);
  FLASHLM_CHECK(w.numel() == expected, fn, ": ", name, " has ", w.numel(), " bytes, but ", n, " x ", k, " of ",
                dtype_name(type), " takes ", expected);
}

bool gguf_matmul_supported(DType t) {
  switch (t) {
    case DType::Q4_0: case DType::Q4_1: case DType::Q5_0: case DType::Q5_1: case DType::Q8_0:
    case DType::Q4_K: case DType::Q5_K: case DType::Q6_K:
      return true;
    default:
      return false;
  }
}

void gguf_matmul(const TensorView& x, const TensorView& weight, DType type, int64_t n, const TensorView* bias,
                 const TensorView& y, void* stream) {
  FLASHLM_CHECK(gguf_matmul_supported(type), "gguf_matmul: weight_type ", dtype_name(type),
                " is not supported (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K are)");
  const Device device = x.device;
  check_vector(x, "x", 2, device);
  const int64_t m = x.shape[0], k = x.shape[1];
  const DTypeInfo& info = dtype_info(type);
  FLASHLM_CHECK(n >= 0, "gguf_matmul: n must be >= 0, got ", n);
  FLASHLM_CHECK(k % info.block_size == 0, "gguf_matmul: K (x's last dimension, ", k, ") must be a multiple of ",
                info.name, "'s block size ", info.block_size);
  if (device.is_cpu()) {
    FLASHLM_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16, "gguf_matmul: x must be float32 or bfloat16 on the CPU, got ",
                  dtype_name(x.dtype));
  } else {
    FLASHLM_CHECK(x.dtype == DType::F32 || x.dtype == DType::F16 || x.dtype == DType::BF16,
                  "gguf_matmul: x must be float32, float16 or bfloat16, got ", dtype_name(x.dtype));
  }
  gemm::detail::check_weight_bytes("gguf_matmul", weight, "weight", type, n, k, device);
  check_vector(y, "y", 2, device);
  FLASHLM_CHECK(y.shape[0] == m && y.shape[1] == n, "gguf_matmul: y must be [", m, ", ", n, "], got ", y.shape_string());
  FLASHLM_CHECK(y.dtype == x.dtype, "gguf_matmul: y must have x's dtype");
  if (bias) {
    check_vector(*bias, "bias", 1, device);
    FLASHLM_CHECK(bias->shape[0] == n, "gguf_matmul: bias must be [", n, "], got ", bias->shape_string());
    FLASHLM_CHECK(bias->dtype == x.dtype, "gguf_matmul: bias must have x's dtype");
  }
  if (m == 0 || n == 0) return;
  FLASHLM_CHECK((k == 0 || (x.data && weight.data)) && y.data && (!bias || bias->data), "gguf_matmul: null data pointer");
  const auto* w = static_cast<const uint8_t*>(weight.data);

  if (device.is_cuda()) {
    if (!cuda_compiled()) throw NotImplementedError("gguf_matmul: flashlm was built without CUDA");
    FLASHLM_CHECK(device.index >= 0 && device.index < cuda_device_count(), "gguf_matmul: no CUDA device ", device.index,
                  " (", cuda_status(), ")");
    gemm::detail::gguf_matmul_cuda({type, w, x.data, bias ? bias->data : nullptr, y.data, x.dtype, m, n, k,
                                    device.index, stream});
    return;
  }
  gguf_matmul_cpu(x, w, type, n, bias, y);
}

}  // namespace flashlm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::gemm::detail {
void gguf_matmul_cuda(const CudaArgs&) { throw NotImplementedError("gguf_matmul: flashlm was built without CUDA"); }
}  // namespace flashlm::gemm::detail
#endif
#ifndef FLASHLM_HAVE_AVX2_KERNELS
namespace flashlm::gemm::detail {
bool gguf_matmul_rows_avx2(const RowsArgs&, int64_t, int64_t) { return false; }
bool quantize_block_q8_k_avx2(const float*, uint8_t*) { return false; }
bool quantize_block_q8_avx2(const float*, uint8_t*, int) { return false; }
void x4_pair_extras_avx2(const uint8_t*, int64_t, int64_t, int64_t, uint8_t*) {}
void matmul_x4_avx2(DType, const uint8_t*, int64_t, const uint8_t*, int64_t, const uint8_t*, int64_t, float*, int64_t,
                    int64_t, int64_t) {}
}  // namespace flashlm::gemm::detail
#endif
