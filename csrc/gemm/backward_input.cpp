// The quantized linear layers' input gradient, dx = dy @ W: argument checks, then on the CPU a split of W's
// block columns over the thread pool. A thread owns whole columns of dx, so no two threads write the same
// element and nothing is reduced afterwards. It walks its columns in tiles that keep the tile of dx (M rows)
// in the L2 cache, and within a tile every weight row, kRowGroup rows at a time: decode their blocks of the
// tile into a float buffer, then add dy[m, r] times them into the tile. Each weight byte is read once. For a few
// rows of dy (M <= kFusedRows) and the common types, AVX2 multiplies straight from the quants instead
// (backward_input_fused_avx2.cpp): the decode buffer's store and reload cost more than the multiply-adds.
// Where the CPU has AVX-512F and BW the same kernels run 16 columns a vector, 4 weight rows at a time into dx held in
// registers (backward_input_fused_avx512.cpp), giving the same bits. For many rows of dy (M >= kGemmRows) AVX2
// and AVX-512 run a GEMM instead (columns_gemm): W decoded once a panel at a time, multiplied into all M rows by a
// register-blocked kernel. Every path adds each element's N products in weight-row order with fused
// multiply-adds, so the AVX2 and AVX-512 paths give the same bits for any M.
#include "flashlm/gemm/backward_input.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "../core/half.h"
#include "../gguf/shared_dequantize.h"
#include "backward_input_kernels.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "flashlm/gguf/dequantize.h"

namespace flashlm {

namespace {

using gemm::detail::BackwardWeight;
using gemm::detail::kRowGroup;
using gemm::detail::WeightKind;

// Floats of one tile: its columns of dx (all M rows) and of the kRowGroup decoded weight rows. 24 KiB stays in
// the L1 cache (one block's columns at least: a larger M spills to the L2).
constexpr int64_t kTileFloats = 16 << 10;
// The fused path's tile: its columns of dx (M <= kFusedRows rows), 16 KiB, half an L1 cache, the other half
// for the weight bytes streaming through.
constexpr int64_t kFusedTileFloats = 4 << 10;
// The GEMM path (M >= kGemmRows, AVX2): tiles of kGemmCols columns of dx (or one block, if larger), panels of
// kGemmDepth weight rows: 128 x 256 floats, 128 KiB, in the L2 cache, a kernel tile's 64 columns of it (32 KiB) in
// the L1. Measured (one thread, CPU time, Q4_K and Q4_0 at 2816 x 1024 and 1024 x 2816): at M = 128 these sizes
// took 3-15% less time than 256 x 64, 256 x 256, 512 x 64, 512 x 128 and 1024 x 32 (columns x rows). Below
// M = kGemmRows the panel's round trip through the L2 cache costs more than the row path's reloads of dx: at
// M = 4 the GEMM took 25-35% longer, at M = 6-8 the two were within the load's noise, at M = 12 the GEMM was
// 10-50% faster.
constexpr int64_t kGemmRows = 8;
constexpr int64_t kGemmCols = 256;
constexpr int64_t kGemmDepth = 128;
std::atomic<bool> gemm_switch{true};  // set_backward_input_gemm
// The least work (multiply-adds) handed to one thread: waking a worker costs ~5-10 us.
constexpr int64_t kGrainMacs = 1 << 18;
// int8 rows are cut into blocks of this many columns, or of the largest power of two that divides K.
constexpr int64_t kInt8Block = 64;

std::atomic<bool> avx512_switch{true};  // set_backward_input_avx512

void check_matrix(const TensorView& t, const char* op, const char* name, Device device) {
  FLASHLM_CHECK(t.ndim == 2, op, ": ", name, " must have 2 dimensions, got ", t.shape_string());
  FLASHLM_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  FLASHLM_CHECK(t.device == device, op, ": ", name, " must be on dy's device");
}

// dy [M, N] and dx [M, K]: shapes, dtypes and devices. Returns M.
int64_t check_grads(const TensorView& dy, const TensorView& dx, const char* op) {
  const Device device = dy.device;
  check_matrix(dy, op, "dy", device);
  check_matrix(dx, op, "dx", device);
  const DType d = dy.dtype;
  if (device.is_cpu()) {
    FLASHLM_CHECK(d == DType::F32 || d == DType::BF16, op, ": dy must be float32 or bfloat16 on the CPU, got ",
                  dtype_name(d));
  } else {
    FLASHLM_CHECK(d == DType::F32 || d == DType::F16 || d == DType::BF16, op,
                  ": dy must be float32, float16 or bfloat16, got ", dtype_name(d));
  }
  FLASHLM_CHECK(dx.dtype == d, op, ": dx must have dy's dtype ", dtype_name(d), ", got ", dtype_name(dx.dtype));
  FLASHLM_CHECK(dx.shape[0] == dy.shape[0], op, ": dx must have dy's ", dy.shape[0], " rows, got ", dx.shape_string());
  FLASHLM_CHECK(dy.shape[0] == 0 || dy.shape[1] == 0 || dy.data, op, ": dy has no data");
  FLASHLM_CHECK(dx.numel() == 0 || dx.data, op, ": dx has no data");
  return dy.shape[0];
}

void check_f32(const TensorView& t, const char* op, const char* name, int64_t rows, int64_t cols, int ndim,
               Device device) {
  FLASHLM_CHECK(t.dtype == DType::F32, op, ": ", name, " must be float32, got ", dtype_name(t.dtype));
  FLASHLM_CHECK(t.ndim == ndim && t.shape[0] == rows && (ndim == 1 || t.shape[1] == cols), op, ": ", name,
                " must be [", rows, ndim == 2 ? ", " : "", ndim == 2 ? std::to_string(cols) : "", "], got ",
                t.shape_string());
  FLASHLM_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  FLASHLM_CHECK(t.device == device, op, ": ", name, " must be on dy's device");
  FLASHLM_CHECK(t.numel() == 0 || t.data, op, ": ", name, " has no data");
}

void decode(const BackwardWeight& w, int64_t r0, int rows, int64_t b0, int64_t b1, float* out, bool avx2) {
  if (w.kind == WeightKind::Gguf) {
    const int64_t width = (b1 - b0) * w.block;
    for (int r = 0; r < rows; ++r)
      gguf::detail::dequantize_blocks_f32(w.type, w.w + (r0 + r) * w.row_bytes + b0 * w.block_bytes, b1 - b0,
                                          out + r * width, avx2);
    return;
  }
  if (!(avx2 && gemm::detail::decode_rows_avx2(w, r0, rows, b0, b1, out)))
    gemm::detail::decode_rows_scalar(w, r0, rows, b0, b1, out);
}

// Block columns [b0, b1) of dx (f32, [m, k]) from dy (packed in strips, GemmPanel) for M >= kGemmRows: a tile of
// about kGemmCols columns at a time, and within it kGemmDepth weight rows at a time decoded once into floats (the
// panel, in the L2 cache) and multiplied into all M rows of the tile by the register-blocked kernel. Decoding
// costs O(N K) whatever M, so it is amortised over the M rows; the row path reloads dx for every 4 weight rows.
void columns_gemm(const BackwardWeight& w, const float* strips, int64_t m, float* dx, int64_t b0, int64_t b1,
                  bool avx512) {
  const int64_t tile = std::max<int64_t>(1, kGemmCols / w.block);
  const int64_t ldb = std::min(tile, b1 - b0) * w.block + gemm::detail::kGemmPad;
  std::vector<float> panel(static_cast<size_t>(std::min(kGemmDepth, w.n) * ldb));
  for (int64_t t0 = b0; t0 < b1; t0 += tile) {
    const int64_t t1 = std::min(b1, t0 + tile), width = (t1 - t0) * w.block;
    float* out = dx + t0 * w.block;
    for (int64_t i = 0; i < m; ++i) std::fill(out + i * w.k, out + i * w.k + width, 0.f);
    for (int64_t n0 = 0; n0 < w.n; n0 += kGemmDepth) {
      const int64_t kc = std::min(kGemmDepth, w.n - n0);
      for (int64_t r = 0; r < kc; ++r) decode(w, n0 + r, 1, t0, t1, panel.data() + r * ldb, true);
      const gemm::detail::GemmPanel p{strips, w.n, n0, panel.data(), ldb, kc, m, width, out, w.k};
      if (!(avx512 && gemm::detail::gemm_panel_avx512(p))) gemm::detail::gemm_panel_avx2(p);
    }
  }
}

// Block columns [b0, b1) of dx (f32, [m, k]) from dyt (dy transposed, f32 [n, m]).
void columns_cpu(const BackwardWeight& w, const float* dyt, int64_t m, float* dx, int64_t b0, int64_t b1,
                 bool avx2) {
  if (avx2 && gemm::detail::fused_supported_avx2(w, m)) {
    const bool avx512 = gemm::detail::avx512_allowed();
    const int64_t tile = std::max<int64_t>(1, kFusedTileFloats / (w.block * m));
    for (int64_t t0 = b0; t0 < b1; t0 += tile) {
      const int64_t t1 = std::min(b1, t0 + tile), width = (t1 - t0) * w.block;
      for (int64_t i = 0; i < m; ++i) std::fill(dx + i * w.k + t0 * w.block, dx + i * w.k + t0 * w.block + width, 0.f);
      if (!(avx512 && gemm::detail::accumulate_fused_avx512(w, dyt, m, dx, t0, t1)))
        gemm::detail::accumulate_fused_avx2(w, dyt, m, dx, t0, t1);
    }
    return;
  }
  const int64_t tile = std::max<int64_t>(1, kTileFloats / (w.block * (m + kRowGroup)));
  std::vector<float> buf(static_cast<size_t>(kRowGroup * std::min(tile, b1 - b0) * w.block));
  for (int64_t t0 = b0; t0 < b1; t0 += tile) {
    const int64_t t1 = std::min(b1, t0 + tile), width = (t1 - t0) * w.block;
    float* out = dx + t0 * w.block;
    for (int64_t i = 0; i < m; ++i) std::fill(out + i * w.k, out + i * w.k + width, 0.f);
    for (int64_t r = 0; r < w.n; r += kRowGroup) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, w.n - r));
      decode(w, r, rows, t0, t1, buf.data(), avx2);
      if (avx2) {
        gemm::detail::accumulate_avx2(buf.data(), rows, width, dyt + r * m, m, out, w.k);
      } else {
        gemm::detail::accumulate_scalar(buf.data(), rows, width, dyt + r * m, m, out, w.k);
      }
    }
  }
}

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return core::bf16_to_f32(x); }

// Strips [s0, s1) of dy [m, n] (f32 or bf16) as f32 in GemmPanel's layout: strip s holds rows [s * strip,
// s * strip + r), r = min(strip, m - s * strip), column j's r values together.
template <class T>
void pack_strips(const T* dy, int64_t m, int64_t n, int64_t strip, int64_t s0, int64_t s1, float* out) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t i0 = s * strip, rows = std::min(strip, m - i0);
    const T* src = dy + i0 * n;
    float* dst = out + i0 * n;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < rows; ++i) dst[j * rows + i] = to_f32(src[i * n + j]);
  }
}

void backward_input_cpu(const BackwardWeight& w, const TensorView& dy, const TensorView& dx) {
  const int64_t m = dy.shape[0], n = w.n, k = w.k;
  const bool avx2 = cpu_isa() == CpuIsa::AVX2;
  const bool gemm = avx2 && m >= kGemmRows && gemm_switch.load(std::memory_order_relaxed);
  // The GEMM takes dy in strips of its kernels' rows (GemmPanel); the row path takes it as one strip of all m rows,
  // dy transposed to f32 [n, m] (the m values of one weight row together).
  const bool avx512 = gemm && gemm::detail::avx512_allowed();
  const int64_t strip = gemm ? gemm::detail::kGemmStrip : m, strips = (m + strip - 1) / strip;
  std::vector<float> a(static_cast<size_t>(n * m));
  const int64_t strip_grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, strip * n));
  parallel_for(strips, strip_grain, [&](int64_t s0, int64_t s1) {
    if (dy.dtype == DType::F32) {
      pack_strips(static_cast<const float*>(dy.data), m, n, strip, s0, s1, a.data());
    } else {
      pack_strips(static_cast<const uint16_t*>(dy.data), m, n, strip, s0, s1, a.data());
    }
  });
  std::vector<float> scratch;  // bf16 dx: float32 sums, rounded per thread's columns at the end
  float* out = static_cast<float*>(dx.data);
  if (dx.dtype != DType::F32) {
    scratch.resize(static_cast<size_t>(m * k));
    out = scratch.data();
  }
  const int64_t blocks = k / w.block;
  int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, n * w.block * m));
  // A GEMM share of at least half a tile: with 64 columns a share (Q4_0 and Q8_0 at K = 1024, 16 shares) the
  // calls took 5-10% more CPU time than with 128 or 256 (M = 128, N = 2816, 2 threads); other shapes the same.
  if (gemm) grain = std::max(grain, kGemmCols / 2 / w.block);
  parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    if (gemm) {
      columns_gemm(w, a.data(), m, out, b0, b1, avx512);
    } else {
      columns_cpu(w, a.data(), m, out, b0, b1, avx2);
    }
    if (dx.dtype == DType::F32) return;
    auto* y = static_cast<uint16_t*>(dx.data);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = b0 * w.block; j < b1 * w.block; ++j) y[i * k + j] = core::f32_to_bf16(out[i * k + j]);
  });
}

void run(const BackwardWeight& w, const TensorView& dy, const TensorView& dx, void* stream, const char* op) {
  const int64_t m = dy.shape[0];
  if (m == 0 || w.k == 0) return;
  if (dy.device.is_cuda()) {
    if (!cuda_compiled()) throw NotImplementedError(std::string(op) + ": flashlm was built without CUDA");
    FLASHLM_CHECK(dy.device.index >= 0 && dy.device.index < cuda_device_count(), op, ": no CUDA device ",
                  dy.device.index, " (", cuda_status(), ")");
    gemm::detail::backward_input_cuda(w, dy.data, dx.data, dy.dtype, m, dy.device.index, stream);
    return;
  }
  backward_input_cpu(w, dy, dx);
}

}  // namespace

bool set_backward_input_avx512(bool allowed) { return avx512_switch.exchange(allowed); }

bool set_backward_input_gemm(bool allowed) { return gemm_switch.exchange(allowed); }

bool gguf_backward_input_supported(DType t) {
  return t != DType::F32 && t != DType::F16 && t != DType::BF16 && dequantize_supported(t);
}

void gguf_linear_backward_input(const TensorView& dy, const TensorView& weight, DType type, const TensorView& dx,
                                void* stream) {
  constexpr const char* op = "gguf_linear_backward_input";
  FLASHLM_CHECK(gguf_backward_input_supported(type), op, ": weight_type ", dtype_name(type),
                " is not a GGML block type it reads");
  check_grads(dy, dx, op);
  const int64_t n = dy.shape[1], k = dx.shape[1];
  const DTypeInfo& info = dtype_info(type);
  FLASHLM_CHECK(k % info.block_size == 0, op, ": K (dx's last dimension, ", k, ") must be a multiple of ", info.name,
                "'s block size ", info.block_size);
  FLASHLM_CHECK(weight.dtype == DType::U8, op, ": weight must be uint8 (the blocks' bytes), got ", dtype_name(weight.dtype));
  FLASHLM_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  FLASHLM_CHECK(weight.device == dy.device, op, ": weight must be on dy's device");
  FLASHLM_CHECK(k == 0 || n <= std::numeric_limits<int64_t>::max() / k, op, ": N * K overflows");
  const int64_t expected = storage_bytes(type, n * k);
  FLASHLM_CHECK(weight.numel() == expected, op, ": weight has ", weight.numel(), " bytes, but ", n, " x ", k, " of ",
                info.name, " takes ", expected);
  FLASHLM_CHECK(expected == 0 || weight.data, op, ": weight has no data");
  const BackwardWeight w{WeightKind::Gguf, type, static_cast<const uint8_t*>(weight.data), storage_bytes(type, k),
                         info.block_size, info.block_bytes, nullptr, nullptr, n, k};
  run(w, dy, dx, stream, op);
}

void int8_linear_backward_input(const TensorView& dy, const TensorView& w8, const TensorView& w_scales,
                                const TensorView& dx, void* stream) {
  constexpr const char* op = "int8_linear_backward_input";
  check_grads(dy, dx, op);
  const int64_t n = dy.shape[1], k = dx.shape[1];
  check_matrix(w8, op, "w", dy.device);
  FLASHLM_CHECK(w8.dtype == DType::I8, op, ": w must be int8, got ", dtype_name(w8.dtype));
  FLASHLM_CHECK(w8.shape[0] == n && w8.shape[1] == k, op, ": w must be [", n, ", ", k, "] (dy's N, dx's K), got ",
                w8.shape_string());
  FLASHLM_CHECK(w8.numel() == 0 || w8.data, op, ": w has no data");
  check_f32(w_scales, op, "w_scales", n, 0, 1, dy.device);
  int64_t block = kInt8Block;
  while (k % block) block /= 2;
  const BackwardWeight w{WeightKind::Int8, DType::I8, static_cast<const uint8_t*>(w8.data), k, block, block,
                         static_cast<const float*>(w_scales.data), nullptr, n, k};
  run(w, dy, dx, stream, op);
}

void int4_linear_backward_input(const TensorView& dy, const TensorView& w4, const TensorView& scales,
                                const TensorView& zeros, int64_t group, const TensorView& dx, void* stream) {
  constexpr const char* op = "int4_linear_backward_input";
  check_grads(dy, dx, op);
  const int64_t n = dy.shape[1], k = dx.shape[1];
  FLASHLM_CHECK(group == 32 || group == 64 || group == 128, op, ": group_size must be 32, 64 or 128, got ", group);
  FLASHLM_CHECK(k % group == 0, op, ": group_size ", group, " does not divide K = ", k);
  check_matrix(w4, op, "w", dy.device);
  FLASHLM_CHECK(w4.dtype == DType::U8, op, ": w must be uint8 (packed nibbles), got ", dtype_name(w4.dtype));
  FLASHLM_CHECK(w4.shape[0] == n && w4.shape[1] == k / 2, op, ": w must be [", n, ", ", k / 2,
                "] (dy's N, half of dx's K), got ", w4.shape_string());
  FLASHLM_CHECK(w4.numel() == 0 || w4.data, op, ": w has no data");
  check_f32(scales, op, "scales", n, k / group, 2, dy.device);
  const bool asym = zeros.data != nullptr || zeros.ndim > 0;
  if (asym) check_f32(zeros, op, "zeros", n, k / group, 2, dy.device);
  const BackwardWeight w{WeightKind::Int4, DType::U8, static_cast<const uint8_t*>(w4.data), k / 2, group, group / 2,
                         static_cast<const float*>(scales.data), asym ? static_cast<const float*>(zeros.data) : nullptr,
                         n, k};
  run(w, dy, dx, stream, op);
}

}  // namespace flashlm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::gemm::detail {
void backward_input_cuda(const BackwardWeight&, const void*, void*, DType, int64_t, int, void*) {
  throw NotImplementedError("backward_input: flashlm was built without CUDA");
}
}  // namespace flashlm::gemm::detail
#endif
namespace flashlm::gemm::detail {
bool avx512_allowed() {
#ifdef FLASHLM_HAVE_AVX512_BACKWARD_INPUT
  return cpu_features().avx512f && cpu_features().avx512bw && avx512_switch.load(std::memory_order_relaxed);
#else
  return false;
#endif
}
}  // namespace flashlm::gemm::detail
#ifndef FLASHLM_HAVE_AVX512_BACKWARD_INPUT
namespace flashlm::gemm::detail {
bool accumulate_fused_avx512(const BackwardWeight&, const float*, int64_t, float*, int64_t, int64_t) { return false; }
bool gemm_panel_avx512(const GemmPanel&) { return false; }
}  // namespace flashlm::gemm::detail
#endif
#ifndef FLASHLM_HAVE_AVX2_KERNELS
namespace flashlm::gemm::detail {
bool decode_rows_avx2(const BackwardWeight&, int64_t, int, int64_t, int64_t, float*) { return false; }
bool fused_supported_avx2(const BackwardWeight&, int64_t) { return false; }
void accumulate_fused_avx2(const BackwardWeight&, const float*, int64_t, float*, int64_t, int64_t) {}
void accumulate_avx2(const float* wt, int rows, int64_t width, const float* dyt, int64_t m, float* dx, int64_t ldx) {
  accumulate_scalar(wt, rows, width, dyt, m, dx, ldx);
}
void gemm_panel_avx2(const GemmPanel&) {}
}  // namespace flashlm::gemm::detail
#endif
