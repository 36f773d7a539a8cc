// Integer GEMM dispatcher: checks every view against the contract in int_gemm.h, fills the kernels' plain
// argument structs and routes on device (CPU / CUDA) and, on the CPU, on the run-time ISA (AVX2, with the
// AVX-VNNI dot product where the CPU has it / scalar), splitting the work over the library's thread pool.
#include "flashlm/gemm/int_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../core/half.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "int_gemm_kernels.h"

namespace flashlm {
namespace {

using gemm::Int4Args;
using gemm::Int8Args;
using gemm::QuantizeArgs;

// The output columns one CPU task covers: the AVX2 kernels' panel width.
constexpr int64_t kPanel = 16;
// The least work (multiply-adds) handed to one thread: waking a worker costs ~5-10 us.
constexpr int64_t kGrainMacs = 1 << 20;

bool present(const TensorView& t) { return t.data != nullptr || t.ndim > 0; }

void check_tensor(const TensorView& t, const char* name, std::initializer_list<int64_t> shape, const Device& device) {
  FLASHLM_CHECK(t.ndim == int(shape.size()), name, ": expected ", shape.size(), " dimensions ",
                TensorView::contiguous(nullptr, t.dtype, shape).shape_string(), ", got ", t.shape_string());
  int d = 0;
  for (int64_t s : shape) {
    FLASHLM_CHECK(t.shape[d] == s, name, ": expected shape ", TensorView::contiguous(nullptr, t.dtype, shape).shape_string(),
                  ", got ", t.shape_string());
    ++d;
  }
  FLASHLM_CHECK(t.device == device, name, ": on a different device than x");
  FLASHLM_CHECK(t.is_contiguous(), name, ": must be contiguous");
  FLASHLM_CHECK(t.data != nullptr || t.numel() == 0, name, ": missing tensor");
}

void check_dtype(const TensorView& t, const char* name, DType want) {
  FLASHLM_CHECK(t.dtype == want, name, ": must be ", dtype_name(want), ", got ", dtype_name(t.dtype));
}

// Activations and outputs: F32/BF16 on the CPU; on CUDA F16/BF16 and, where `cuda_f32`, F32.
void check_float(const TensorView& t, const char* name, bool cuda_f32) {
  const DType d = t.dtype;
  if (t.device.is_cpu()) {
    FLASHLM_CHECK(d == DType::F32 || d == DType::BF16, name, ": the CPU kernels take float32 or bfloat16, got ",
                  dtype_name(d));
  } else {
    FLASHLM_CHECK(d == DType::F16 || d == DType::BF16 || (cuda_f32 && d == DType::F32), name,
                  ": the CUDA kernels take float16 or bfloat16", cuda_f32 ? " or float32" : "", ", got ", dtype_name(d));
  }
}

// Throws unless `device` is a CUDA device this process can use.
void check_cuda(const Device& device, const char* op) {
  if (!cuda_compiled()) throw NotImplementedError(std::string(op) + ": flashlm was built without CUDA");
  FLASHLM_CHECK(device.index >= 0 && device.index < cuda_device_count(), op, ": no CUDA device ", device.index, " (",
                cuda_status(), ")");
}

const float* optional_bias(const TensorView& bias, int64_t N, const Device& device) {
  if (!present(bias)) return nullptr;
  check_tensor(bias, "bias", {N}, device);
  check_dtype(bias, "bias", DType::F32);
  return static_cast<const float*>(bias.data);
}

bool use_avx2() { return cpu_isa() == CpuIsa::AVX2; }

}  // namespace

namespace {

// Both quantizers: per token, or with static_scale (quantize_static's checked scale) for every row.
void quantize_rows(const QuantizePerTokenParams& p, const float* static_scale, const char* op, void* stream) {
  FLASHLM_CHECK(p.x.ndim == 2, "x: expected 2 dimensions [M, K], got ", p.x.shape_string());
  const int64_t M = p.x.shape[0], K = p.x.shape[1];
  const Device dev = p.x.device;
  check_tensor(p.x, "x", {M, K}, dev);
  check_float(p.x, "x", true);
  check_tensor(p.q, "q", {M, K}, dev);
  check_dtype(p.q, "q", DType::I8);
  check_tensor(p.scales, "scales", {M}, dev);
  check_dtype(p.scales, "scales", DType::F32);
  if (M == 0) return;
  QuantizeArgs a{p.x.data, p.x.dtype, static_cast<int8_t*>(p.q.data), static_cast<float*>(p.scales.data), M, K,
                 static_scale};
  if (dev.is_cuda()) {
    check_cuda(dev, op);
    gemm::quantize_per_token_cuda(a, dev.index, stream);
    return;
  }
  const bool avx2 = use_avx2();
  parallel_for(M, std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    if (avx2) {
      gemm::quantize_per_token_avx2(a, begin, end);
    } else {
      gemm::quantize_per_token_scalar(a, begin, end);
    }
  });
}

}  // namespace

void quantize_per_token(const QuantizePerTokenParams& p, void* stream) {
  quantize_rows(p, nullptr, "quantize_per_token", stream);
}

void quantize_static(const QuantizePerTokenParams& p, void* stream) {
  check_tensor(p.scale, "scale", {1}, p.x.device);
  FLASHLM_CHECK(p.scale.data != nullptr, "scale: missing tensor");
  check_dtype(p.scale, "scale", DType::F32);
  const float* scale = static_cast<const float*>(p.scale.data);
  // On the CPU reading it is free; a CUDA scale is the caller's to check (reading it would wait for the device).
  FLASHLM_CHECK(p.x.device.is_cuda() || (std::isfinite(*scale) && *scale > 0.f),
                "scale: must be finite and positive, got ", p.x.device.is_cuda() ? 0.f : *scale);
  quantize_rows(p, scale, "quantize_static", stream);
}

void int8_gemm(const Int8GemmParams& p, void* stream) {
  FLASHLM_CHECK(p.x.ndim == 2, "x: expected 2 dimensions [M, K], got ", p.x.shape_string());
  FLASHLM_CHECK(p.w.ndim == 2, "w: expected 2 dimensions [N, K], got ", p.w.shape_string());
  const int64_t M = p.x.shape[0], K = p.x.shape[1], N = p.w.shape[0];
  const Device dev = p.x.device;
  check_tensor(p.x, "x", {M, K}, dev);
  check_dtype(p.x, "x", DType::I8);
  check_tensor(p.w, "w", {N, K}, dev);
  check_dtype(p.w, "w", DType::I8);
  check_tensor(p.x_scales, "x_scales", {M}, dev);
  check_dtype(p.x_scales, "x_scales", DType::F32);
  check_tensor(p.w_scales, "w_scales", {N}, dev);
  check_dtype(p.w_scales, "w_scales", DType::F32);
  check_tensor(p.out, "out", {M, N}, dev);
  check_float(p.out, "out", true);
  FLASHLM_CHECK(K <= kInt8GemmMaxK, "x: K = ", K, " is above ", kInt8GemmMaxK, " (the int32 sums could overflow)");
  Int8Args a{static_cast<const int8_t*>(p.x.data), K, static_cast<const float*>(p.x_scales.data),
             static_cast<const int8_t*>(p.w.data), static_cast<const float*>(p.w_scales.data),
             optional_bias(p.bias, N, dev), p.out.data, p.out.dtype, M, N, K};
  if (M == 0 || N == 0) return;
  if (dev.is_cuda()) {
    check_cuda(dev, "int8_gemm");
    gemm::int8_gemm_cuda(a, dev.index, stream);
    return;
  }
  // The AVX2 kernel's sign trick negates x, and -(-128) does not fit an int8.
  FLASHLM_CHECK(std::find(a.x, a.x + M * K, int8_t(-128)) == a.x + M * K, "x: values must lie in [-127, 127] (found -128)");
  const int64_t grain_cols = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, M * K));
  if (!use_avx2()) {
    parallel_for(N, grain_cols, [&](int64_t begin, int64_t end) { gemm::int8_gemm_scalar(a, begin, end); });
    return;
  }
  // The AVX2 kernel reads x four bytes at a time: rows padded with zeros to a multiple of 4.
  std::vector<int8_t> padded;
  if (K % 4 != 0) {
    const int64_t stride = (K + 3) / 4 * 4;
    padded.assign(size_t(M * stride), 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(padded.data() + m * stride, a.x + m * K, size_t(K));
    a.x = padded.data();
    a.x_stride = stride;
  }
#ifdef FLASHLM_HAVE_AVXVNNI_KERNELS
  const bool vnni = cpu_features().avx_vnni;
#else
  const bool vnni = false;
#endif
  const int64_t panels = (N + kPanel - 1) / kPanel;
  parallel_for(panels, (grain_cols + kPanel - 1) / kPanel, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> panel(size_t(gemm::int8_scratch_bytes(M, K)));
    const int64_t n0 = begin * kPanel, n1 = std::min(N, end * kPanel);
    if (vnni) {
      gemm::int8_gemm_vnni(a, n0, n1, panel.data());
    } else {
      gemm::int8_gemm_avx2(a, n0, n1, panel.data());
    }
  });
}

void int4_gemm(const Int4GemmParams& p, void* stream) {
  FLASHLM_CHECK(p.x.ndim == 2, "x: expected 2 dimensions [M, K], got ", p.x.shape_string());
  FLASHLM_CHECK(p.w.ndim == 2, "w: expected 2 dimensions [N, K / 2], got ", p.w.shape_string());
  const int64_t M = p.x.shape[0], K = p.x.shape[1], N = p.w.shape[0], G = p.group_size;
  const Device dev = p.x.device;
  FLASHLM_CHECK(G == 32 || G == 64 || G == 128, "group_size: must be 32, 64 or 128, got ", G);
  FLASHLM_CHECK(K % G == 0, "x: K = ", K, " must be a multiple of group_size = ", G);
  check_tensor(p.x, "x", {M, K}, dev);
  check_float(p.x, "x", false);
  check_tensor(p.w, "w", {N, K / 2}, dev);
  check_dtype(p.w, "w", DType::U8);
  check_tensor(p.scales, "scales", {N, K / G}, dev);
  check_dtype(p.scales, "scales", DType::F32);
  const bool asym = present(p.zeros);
  if (asym) {
    check_tensor(p.zeros, "zeros", {N, K / G}, dev);
    check_dtype(p.zeros, "zeros", DType::F32);
  }
  check_tensor(p.out, "out", {M, N}, dev);
  check_dtype(p.out, "out", p.x.dtype);
  Int4Args a{p.x.data, p.x.dtype, static_cast<const uint8_t*>(p.w.data), static_cast<const float*>(p.scales.data),
             asym ? static_cast<const float*>(p.zeros.data) : nullptr, optional_bias(p.bias, N, dev), p.out.data,
             p.out.dtype, M, N, K, G};
  if (M == 0 || N == 0) return;
  if (dev.is_cuda()) {
    check_cuda(dev, "int4_gemm");
    gemm::int4_gemm_cuda(a, dev.index, stream);
    return;
  }
  const int64_t grain_cols = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, M * K));
  if (!use_avx2()) {
    parallel_for(N, grain_cols, [&](int64_t begin, int64_t end) { gemm::int4_gemm_scalar(a, begin, end); });
    return;
  }
  // The AVX2 kernel reads f32 activations and each group's sum of x (the zero point's share of the dot product).
  std::vector<float> x32;
  if (a.x_dtype == DType::BF16) {
    x32.resize(size_t(M * K));
    const auto* src = static_cast<const uint16_t*>(a.x);
    for (int64_t i = 0; i < M * K; ++i) x32[i] = core::bf16_to_f32(src[i]);
    a.x = x32.data();
    a.x_dtype = DType::F32;
  }
  const int64_t groups = K / G;
  std::vector<float> group_sums(size_t(M * groups));
  const auto* x = static_cast<const float*>(a.x);
  for (int64_t i = 0; i < M * groups; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < G; ++k) s += x[i * G + k];
    group_sums[i] = s;
  }
  std::vector<float> xp(size_t(gemm::int4_gemv_x_floats(M, K)));
  const bool subnormal = gemm::int4_prepare_x_avx2(a, cpu_features().amd, xp.data());
  const int64_t panels = (N + kPanel - 1) / kPanel;
  parallel_for(panels, (grain_cols + kPanel - 1) / kPanel, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(size_t(gemm::int4_scratch_floats(M, K)));
    gemm::int4_gemm_avx2(a, group_sums.data(), xp.data(), subnormal, begin * kPanel, std::min(N, end * kPanel),
                         scratch.data());
  });
}

}  // namespace flashlm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::gemm {
void quantize_per_token_cuda(const QuantizeArgs&, int, void*) {
  throw NotImplementedError("quantize_per_token: flashlm was built without CUDA");
}
void int8_gemm_cuda(const Int8Args&, int, void*) { throw NotImplementedError("int8_gemm: flashlm was built without CUDA"); }
void int4_gemm_cuda(const Int4Args&, int, void*) { throw NotImplementedError("int4_gemm: flashlm was built without CUDA"); }
}  // namespace flashlm::gemm
#endif
#ifndef FLASHLM_HAVE_AVXVNNI_KERNELS
namespace flashlm::gemm {
void int8_gemm_vnni(const Int8Args& a, int64_t n_begin, int64_t n_end, int8_t* panel) {
  int8_gemm_avx2(a, n_begin, n_end, panel);
}
}  // namespace flashlm::gemm
#endif
#ifndef FLASHLM_HAVE_AVX2_KERNELS
// Builds for other CPUs link these; cpu_isa() never picks AVX2 there, so they are never called.
namespace flashlm::gemm {
void quantize_per_token_avx2(const QuantizeArgs& a, int64_t m_begin, int64_t m_end) {
  quantize_per_token_scalar(a, m_begin, m_end);
}
int64_t int8_scratch_bytes(int64_t, int64_t) { return 0; }
void int8_gemm_avx2(const Int8Args& a, int64_t n_begin, int64_t n_end, int8_t*) { int8_gemm_scalar(a, n_begin, n_end); }
int64_t int4_gemv_x_floats(int64_t, int64_t) { return 0; }
bool int4_prepare_x_avx2(const Int4Args&, bool, float*) { return false; }
int64_t int4_scratch_floats(int64_t, int64_t) { return 0; }
void int4_gemm_avx2(const Int4Args& a, const float*, const float*, bool, int64_t n_begin, int64_t n_end, float*) {
  int4_gemm_scalar(a, n_begin, n_end);
}
}  // namespace flashlm::gemm
#endif
