// The x4 layout of Q4_0 / Q8_0 / Q4_K / Q6_K weights (shared_gguf_matmul.h): regrouping and unpacking, the rows
// of a regrouped weight routed to its kernels, plain rows regrouped panel by panel for a batched product, and
// the checked public entry points (flashlm/gemm/gguf_matmul.h).
#include <atomic>
#include <cstring>
#include <vector>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/error.h"
#include "flashlm/gemm/gguf_matmul.h"
#include "gguf_matmul_kernels.h"

namespace flashlm {

namespace gemm::detail {

static std::atomic<bool> vnni_switch{true};  // set_gguf_matmul_vnni

namespace {

// Group g of 4 plain rows (row_bytes apart) <-> its x4 bytes. Each layout is a list of pieces: `bytes` bytes
// at offset `from` of row r's block, placed at offset `to` of the group's run of blocks (block_bytes * 4 long).
template <bool kToX4>
void convert_group(DType type, const uint8_t* src, int64_t k, uint8_t* dst) {
  const DTypeInfo& info = dtype_info(type);
  const int64_t block = info.block_bytes, row_bytes = k / info.block_size * block;
  uint8_t* plain = kToX4 ? const_cast<uint8_t*>(src) : dst;
  uint8_t* x4 = kToX4 ? dst : const_cast<uint8_t*>(src);
  // Q4_0 and Q8_0 regroup pairs of blocks (the activation pair), the K-quants single super-blocks.
  const int64_t per = type == DType::Q4_0 || type == DType::Q8_0 ? 2 : 1, run = per * block;
  for (int64_t p = 0; p < k / info.block_size / per; ++p, x4 += 4 * run) {
    uint8_t* base = plain + p * run;
    auto move = [&](int r, int64_t from, int64_t to, int64_t bytes) {
      uint8_t* at = base + r * row_bytes + from;
      if (kToX4) std::memcpy(x4 + to, at, static_cast<size_t>(bytes));
      else std::memcpy(at, x4 + to, static_cast<size_t>(bytes));
    };
    for (int r = 0; r < 4; ++r) {
      switch (type) {
        case DType::Q4_0:  // scales [r0 b0, r0 b1, r1 b0, ...], then per row the 16 bytes of b0 and of b1
          for (int b = 0; b < 2; ++b) {
            move(r, b * block, 2 * (2 * r + b), 2);
            move(r, b * block + 2, 16 + 32 * r + 16 * b, 16);
          }
          break;
        case DType::Q8_0:  // scales as Q4_0, then per row [b0 0..16 | b1 0..16 | b0 16..32 | b1 16..32]
          for (int b = 0; b < 2; ++b) {
            move(r, b * block, 2 * (2 * r + b), 2);
            for (int half = 0; half < 2; ++half) move(r, b * block + 2 + 16 * half, 16 + 64 * r + 32 * half + 16 * b, 16);
          }
          break;
        case DType::Q4_K:  // d[4], dmin[4], scales[4][12], then per 32 bytes i of qs the 4 rows' 32 bytes
          move(r, 0, 2 * r, 2);
          move(r, 2, 8 + 2 * r, 2);
          move(r, 4, 16 + 12 * r, 12);
          for (int i = 0; i < 4; ++i) move(r, 16 + 32 * i, 64 + 128 * i + 32 * r, 32);
          break;
        default:  // Q6_K: d[4], scales[4][16], then per half h the 4 rows' ql[64h..+32], ql[64h+32..+32], qh[32h..+32]
          move(r, 208, 2 * r, 2);
          move(r, 192, 8 + 16 * r, 16);
          for (int h = 0; h < 2; ++h)
            for (int c = 0; c < 3; ++c) move(r, c < 2 ? 64 * h + 32 * c : 128 + 32 * h, 72 + 384 * h + 128 * c + 32 * r, 32);
          break;
      }
    }
  }
}

template <bool kToX4>
void convert(DType type, const uint8_t* src, int64_t n, int64_t k, uint8_t* dst) {
  const int64_t group = 4 * storage_bytes(type, k), full = n / 4;
  for (int64_t g = 0; g < full; ++g) convert_group<kToX4>(type, src + g * group, k, dst + g * group);
  const int64_t done = full * group;  // the last n % 4 rows are the same in both layouts
  std::memcpy(dst + done, src + done, static_cast<size_t>(storage_bytes(type, n * k) - done));
}

}  // namespace

bool repack_x4_type(DType type) {
  return type == DType::Q4_0 || type == DType::Q8_0 || type == DType::Q4_K || type == DType::Q6_K;
}

int64_t repack_x4_k_multiple(DType type) { return type == DType::Q4_0 || type == DType::Q8_0 ? 64 : 256; }

bool repack_x4_supported(DType type, int64_t n, int64_t k) {
  return repack_x4_type(type) && n > 0 && k > 0 && k % repack_x4_k_multiple(type) == 0;
}

void repack_x4(DType type, const uint8_t* w, int64_t n, int64_t k, uint8_t* packed) {
  convert<true>(type, w, n, k, packed);
}

void unpack_x4(DType type, const uint8_t* packed, int64_t n, int64_t k, uint8_t* w) {
  convert<false>(type, packed, n, k, w);
}

bool vnni_allowed() { return vnni_switch.load(std::memory_order_relaxed); }

bool x4_vnni_available() {
#ifdef FLASHLM_HAVE_AVX512VNNI_KERNELS
  const CpuFeatures& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512_vnni && vnni_allowed();
#else
  return false;
#endif
}

void x4_rows(const MatmulPart& p, int64_t k, const uint8_t* acts, int64_t act_bytes, const uint8_t* extras,
             int64_t m, bool avx2, bool vnni, int64_t n0, int64_t n1) {
  const int64_t row_bytes = storage_bytes(p.type, k), full = p.n / 4 * 4, g1 = n1 < full ? n1 : full;
  if (n0 < g1) {
    if (vnni) {
      matmul_x4_vnni(p.type, p.packed, k, acts, act_bytes, extras, m, p.y, p.n, n0, g1);
    } else if (avx2) {
      matmul_x4_avx2(p.type, p.packed, k, acts, act_bytes, extras, m, p.y, p.n, n0, g1);
    } else {  // the scalar reference reads plain rows: each group unpacked into 4 of them
      std::vector<uint8_t> plain(static_cast<size_t>(4 * row_bytes));
      for (int64_t g = n0; g < g1; g += 4) {
        convert_group<false>(p.type, p.packed + g * row_bytes, k, plain.data());
        gguf_matmul_rows_scalar({p.type, plain.data(), row_bytes, acts, act_bytes, m, k, p.y + g, p.n}, 0, 4);
      }
    }
  }
  const int64_t t0 = n0 > full ? n0 : full;
  if (t0 < n1) {  // the rows after the last whole group, in the plain layout at their usual place
    gguf_matmul_rows({p.type, p.packed, row_bytes, acts, act_bytes, m, k, p.y, p.n}, t0, n1);
  }
}

void x4_rows_regrouped(const MatmulPart& p, int64_t k, const uint8_t* acts, int64_t act_bytes, const uint8_t* extras,
                       int64_t m, int64_t n0, int64_t n1) {
  // 16 rows: the tile the x4 VNNI kernels keep in L1/L2 while every activation row passes over it. Regrouping
  // it copies 16 rows' bytes once for 16 * m * k multiply-adds, so the weight is read from its own (mapped)
  // blocks at the regrouped kernels' speed and no regrouped copy outlives the call.
  constexpr int64_t kPanelRows = 16;
  const int64_t row_bytes = storage_bytes(p.type, k), full = p.n / 4 * 4, g1 = n1 < full ? n1 : full;
  thread_local std::vector<uint8_t> panel;  // per pool thread, kept for the next call (16 rows' bytes)
  if (panel.size() < static_cast<size_t>(kPanelRows * row_bytes)) panel.resize(static_cast<size_t>(kPanelRows * row_bytes));
  for (int64_t g = n0; g < g1; g += kPanelRows) {
    const int64_t rows = g1 - g < kPanelRows ? g1 - g : kPanelRows;
    for (int64_t r = 0; r < rows; r += 4)
      convert_group<true>(p.type, p.w + (g + r) * row_bytes, k, panel.data() + r * row_bytes);
    matmul_x4_vnni(p.type, panel.data(), k, acts, act_bytes, extras, m, p.y + g, p.n, 0, rows);
  }
  const int64_t t0 = n0 > full ? n0 : full;
  if (t0 < n1) gguf_matmul_rows({p.type, p.w, row_bytes, acts, act_bytes, m, k, p.y, p.n}, t0, n1);
}

}  // namespace gemm::detail

bool set_gguf_matmul_vnni(bool allowed) { return gemm::detail::vnni_switch.exchange(allowed); }

bool gguf_repack_supported(DType weight_type, int64_t n, int64_t k) {
  return gemm::detail::repack_x4_supported(weight_type, n, k);
}

namespace {

void check_repack(const char* fn, DType type, int64_t n, int64_t k) {
  using gemm::detail::repack_x4_k_multiple;
  FLASHLM_CHECK(gemm::detail::repack_x4_type(type), fn, ": weight_type ", dtype_name(type),
                " has no regrouped layout (Q4_0, Q8_0, Q4_K and Q6_K do)");
  FLASHLM_CHECK(n > 0 && k > 0 && k % repack_x4_k_multiple(type) == 0, fn, ": the regrouped layout of ", dtype_name(type),
                " needs N > 0 and K a positive multiple of ", repack_x4_k_multiple(type), ", got ", n, " x ", k);
}

}  // namespace

void gguf_repack(const TensorView& src, const TensorView& dst, DType weight_type, int64_t n, int64_t k, bool to_x4) {
  check_repack("gguf_repack", weight_type, n, k);
  gemm::detail::check_weight_bytes("gguf_repack", src, "src", weight_type, n, k, Device{});
  gemm::detail::check_weight_bytes("gguf_repack", dst, "dst", weight_type, n, k, Device{});
  FLASHLM_CHECK(src.data && dst.data, "gguf_repack: null data pointer");
  const auto* s = static_cast<const uint8_t*>(src.data);
  auto* d = static_cast<uint8_t*>(dst.data);
  const int64_t bytes = src.numel();
  FLASHLM_CHECK(d + bytes <= s || s + bytes <= d, "gguf_repack: src and dst must not overlap");
  if (to_x4) gemm::detail::repack_x4(weight_type, s, n, k, d);
  else gemm::detail::unpack_x4(weight_type, s, n, k, d);
}

void gguf_matmul_repacked(const TensorView& x, const TensorView& packed, DType weight_type, int64_t n,
                          const TensorView* bias, const TensorView& y) {
  const char* fn = "gguf_matmul_repacked";
  auto check_f32 = [&](const TensorView& t, const char* name, int ndim) {
    FLASHLM_CHECK(t.device.is_cpu() && t.dtype == DType::F32 && t.ndim == ndim && t.is_contiguous(), fn, ": ", name,
                  " must be a contiguous float32 CPU tensor of ", ndim, " dimensions, got ", dtype_name(t.dtype), " ",
                  t.shape_string());
  };
  check_f32(x, "x", 2);
  const int64_t m = x.shape[0], k = x.shape[1];
  check_repack(fn, weight_type, n, k);
  gemm::detail::check_weight_bytes(fn, packed, "packed", weight_type, n, k, Device{});
  check_f32(y, "y", 2);
  FLASHLM_CHECK(y.shape[0] == m && y.shape[1] == n, fn, ": y must be [", m, ", ", n, "], got ", y.shape_string());
  if (bias) {
    check_f32(*bias, "bias", 1);
    FLASHLM_CHECK(bias->shape[0] == n, fn, ": bias must be [", n, "], got ", bias->shape_string());
  }
  if (m == 0) return;
  FLASHLM_CHECK(x.data && packed.data && y.data && (!bias || bias->data), fn, ": null data pointer");
  gemm::detail::MatmulPart part{weight_type, nullptr, n, bias ? static_cast<const float*>(bias->data) : nullptr,
                                static_cast<float*>(y.data), static_cast<const uint8_t*>(packed.data)};
  gemm::detail::gguf_matmul_parts_f32(static_cast<const float*>(x.data), m, k, &part, 1);
}

}  // namespace flashlm

#ifndef FLASHLM_HAVE_AVX512VNNI_KERNELS
namespace flashlm::gemm::detail {
void x4_pair_extras_vnni(const uint8_t*, int64_t, int64_t, int64_t, uint8_t*) {}
void matmul_x4_vnni(DType, const uint8_t*, int64_t, const uint8_t*, int64_t, const uint8_t*, int64_t, float*, int64_t,
                    int64_t, int64_t) {}
}  // namespace flashlm::gemm::detail
#endif
