// GGUF matmul, scalar CPU kernels: the activation quantizer (shared by the scalar and AVX2 paths) and the
// reference block dot products, the oracle of gguf_matmul_avx2.cpp. Each weight block is unpacked into
// integer quants q and, per group of 16 or 32 elements, a scale a and offset b with value = a * q + b, so
// one loop serves every type:
//   sum over the block of value * x  ~=  sum over groups  a * d_x * sum(q * qx)  +  b * d_x * sum(qx).
// Bit layouts: csrc/gguf/shared_decoders.h; ggml's generic ggml_vec_dot_*_q8_* compute the same sums.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../gguf/shared_decoders.h"
#include "flashlm/core/cpu_features.h"
#include "gguf_matmul_kernels.h"

namespace flashlm::gemm::detail {

using gguf::block_q8_K;
using gguf::QK_K;
using namespace gguf;  // block structs
using core::f16_to_f32;
using core::ld_u16;
using core::ld_u32;

bool uses_q8_k(DType t) { return t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K; }

int64_t act_row_bytes(DType t, int64_t k) {
  return uses_q8_k(t) ? k / QK_K * int64_t(sizeof(block_q8_K)) : (k / 32 + 1) / 2 * int64_t(sizeof(ActQ8x2));
}

namespace {

float load_x(const void* x, DType dtype, int64_t i) {
  if (dtype == DType::BF16) return core::bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  return static_cast<const float*>(x)[i];
}

// round(v) (half to even) clamped to [lo, hi]; NaN becomes lo (never an undefined float -> int conversion).
// Adding and subtracting 1.5 * 2^23 rounds any |v| < 2^22 to an integer in the current (nearest-even) mode,
// as nearbyint does, without its library call on x86-64 builds that lack SSE4.1's roundss; callers pass
// |v| <= 128 (or NaN).
int8_t round_clamp(float v, float lo, float hi) {
  float r = (v + 12582912.0f) - 12582912.0f;
  r = std::max(lo, r);
  r = std::min(hi, r);
  return static_cast<int8_t>(r);
}

// NaN if any of x[0..n) is infinite or NaN, else 0: added to a block's scale so that such an input makes
// every output it touches NaN instead of a finite wrong value.
float poison(const float* x, int n) {
  float p = 0.0f;
  for (int j = 0; j < n; ++j) p += x[j] * 0.0f;
  return p;
}

// ggml's quantize_row_q8_1, with float d and s: d = max|x| / 127, qs = round(x / d); into block `half` of
// a pair.
void quantize_act_q8(const float* x, ActQ8x2* out, int half) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f + poison(x, 32), id = d != 0.0f ? 1.0f / d : 0.0f;
  int sum = 0;
  for (int j = 0; j < 32; ++j) {
    const int8_t q = round_clamp(x[j] * id, -127.0f, 127.0f);
    out->qs[act_pair_index(half, j)] = q;
    sum += q;
  }
  out->d[half] = d;
  out->s[half] = d * static_cast<float>(sum);
}

// ggml's quantize_row_q8_K: the element of largest magnitude maps to -128, the rest round into [-128, 127].
void quantize_act_q8_k(const float* x, block_q8_K* out) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < QK_K; ++j) {
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float bad = poison(x, QK_K);
  if (amax == 0.0f || bad != 0.0f) {  // all zeros, or a non-finite value: a zero block with scale 0 or NaN
    std::memset(out, 0, sizeof(*out));
    out->d = bad;
    return;
  }
  const float iscale = -128.0f / max;
  for (int j = 0; j < QK_K; ++j) out->qs[j] = round_clamp(iscale * x[j], -128.0f, 127.0f);
  for (int g = 0; g < QK_K / 16; ++g) {
    int sum = 0;
    for (int j = 0; j < 16; ++j) sum += out->qs[16 * g + j];
    out->bsums[g] = static_cast<int16_t>(sum);
  }
  out->d = 1.0f / iscale;
}

}  // namespace

void quantize_activations(DType t, const void* x, DType x_dtype, int64_t k, int64_t m0, int64_t m1, uint8_t* acts) {
  const int64_t block = uses_q8_k(t) ? QK_K : 32, row_bytes = act_row_bytes(t, k);
  const bool avx2 = x_dtype == DType::F32 && cpu_isa() == CpuIsa::AVX2;
  float buf[QK_K];
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* dst = acts + m * row_bytes;
    if (!uses_q8_k(t)) std::memset(dst, 0, static_cast<size_t>(row_bytes));  // a lone last block's empty partner
    if (avx2) {  // the same blocks, vectorized; the scalar code keeps the blocks the AVX2 code leaves to it
      for (int64_t b = 0; b < k / block; ++b) {
        const float* xb = static_cast<const float*>(x) + m * k + b * block;
        if (uses_q8_k(t)) {
          auto* out = reinterpret_cast<block_q8_K*>(dst) + b;
          if (!quantize_block_q8_k_avx2(xb, reinterpret_cast<uint8_t*>(out))) quantize_act_q8_k(xb, out);
        } else {
          auto* out = reinterpret_cast<ActQ8x2*>(dst) + b / 2;
          const int half = static_cast<int>(b % 2);
          if (!quantize_block_q8_avx2(xb, reinterpret_cast<uint8_t*>(out), half)) quantize_act_q8(xb, out, half);
        }
      }
      continue;
    }
    for (int64_t b = 0; b < k / block; ++b) {
      for (int64_t j = 0; j < block; ++j) buf[j] = load_x(x, x_dtype, m * k + b * block + j);
      if (uses_q8_k(t)) {
        quantize_act_q8_k(buf, reinterpret_cast<block_q8_K*>(dst) + b);
      } else {
        quantize_act_q8(buf, reinterpret_cast<ActQ8x2*>(dst) + b / 2, static_cast<int>(b % 2));
      }
    }
  }
}

namespace {

// One weight block as integer quants and per-group (scale, offset): value[e] = a[e / group] * q[e] + b[...].
struct Unpacked {
  int q[QK_K];
  float a[16], b[16];
  int block, group;
};

// The low nibbles of qs[0..15] are elements 0..15, the high nibbles 16..31 (Q4_x, Q5_x).
void nibbles32(const uint8_t* qs, int* q) {
  for (int j = 0; j < 16; ++j) {
    q[j] = qs[j] & 0xF;
    q[j + 16] = qs[j] >> 4;
  }
}

void high_bits32(uint32_t qh, int* q) {
  for (int j = 0; j < 32; ++j) q[j] |= ((qh >> j) & 1) << 4;
}

void unpack(DType t, const uint8_t* p, Unpacked& u) {
  switch (t) {
    case DType::Q4_0: case DType::Q5_0: {
      u.block = u.group = 32;
      const bool q5 = t == DType::Q5_0;
      const float d = f16_to_f32(ld_u16(p));
      nibbles32(p + (q5 ? offsetof(block_q5_0, qs) : offsetof(block_q4_0, qs)), u.q);
      if (q5) high_bits32(ld_u32(p + offsetof(block_q5_0, qh)), u.q);
      u.a[0] = d;
      u.b[0] = -(q5 ? 16.0f : 8.0f) * d;
      return;
    }
    case DType::Q4_1: case DType::Q5_1: {
      u.block = u.group = 32;
      const bool q5 = t == DType::Q5_1;
      nibbles32(p + (q5 ? offsetof(block_q5_1, qs) : offsetof(block_q4_1, qs)), u.q);
      if (q5) high_bits32(ld_u32(p + offsetof(block_q5_1, qh)), u.q);
      u.a[0] = f16_to_f32(ld_u16(p));
      u.b[0] = f16_to_f32(ld_u16(p + 2));
      return;
    }
    case DType::Q8_0: {
      u.block = u.group = 32;
      for (int j = 0; j < 32; ++j) u.q[j] = static_cast<int8_t>(p[offsetof(block_q8_0, qs) + j]);
      u.a[0] = f16_to_f32(ld_u16(p));
      u.b[0] = 0.0f;
      return;
    }
    case DType::Q4_K: case DType::Q5_K: {
      u.block = QK_K;
      u.group = 32;
      const bool q5 = t == DType::Q5_K;
      const float d = f16_to_f32(ld_u16(p)), dmin = f16_to_f32(ld_u16(p + 2));
      const uint8_t* scales = p + offsetof(block_q4_K, scales);
      const uint8_t* qs = p + (q5 ? offsetof(block_q5_K, qs) : offsetof(block_q4_K, qs));
      const uint8_t* qh = p + offsetof(block_q5_K, qh);
      for (int j = 0; j < 8; ++j) {  // sub-block j: nibble j % 2 of qs[32 (j / 2) + l], bit j of qh[l]
        uint32_t sc, m;
        gguf::detail::scale_min_k4(j, scales, &sc, &m);
        u.a[j] = d * static_cast<float>(sc);
        u.b[j] = -dmin * static_cast<float>(m);
        for (int l = 0; l < 32; ++l) {
          int v = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
          if (q5) v |= ((qh[l] >> j) & 1) << 4;
          u.q[32 * j + l] = v;
        }
      }
      return;
    }
    case DType::Q6_K: {
      u.block = QK_K;
      u.group = 16;
      const float d = f16_to_f32(ld_u16(p + offsetof(block_q6_K, d)));
      const uint8_t* ql = p + offsetof(block_q6_K, ql);
      const uint8_t* qh = p + offsetof(block_q6_K, qh);
      const auto* scales = reinterpret_cast<const int8_t*>(p + offsetof(block_q6_K, scales));
      for (int g = 0; g < 16; ++g) {
        u.a[g] = d * static_cast<float>(scales[g]);
        u.b[g] = -32.0f * u.a[g];
      }
      for (int e = 0; e < QK_K; ++e) {  // half h, quarter t, lane l (see Decoder<Q6_K>)
        int h = e / 128, t4 = (e % 128) / 32, l = e % 32;
        int lo = (ql[64 * h + 32 * (t4 % 2) + l] >> (4 * (t4 / 2))) & 0xF;
        int hi = (qh[32 * h + l] >> (2 * t4)) & 3;
        u.q[e] = lo | (hi << 4);
      }
      return;
    }
    default:
      return;
  }
}

// Sum over weight block b of a row of value * x, x's row given by its activation blocks.
float dot_block(const Unpacked& u, const uint8_t* act_row, int64_t b, bool q8_k) {
  float sum = 0.0f;
  const int groups = u.block / u.group;
  for (int g = 0; g < groups; ++g) {
    float dy, ysum;  // the activation scale and d_x * sum(qx) over the group
    int isum = 0;
    if (q8_k) {
      const auto* a = reinterpret_cast<const block_q8_K*>(act_row) + b;
      dy = a->d;
      int s = 0;
      for (int i = g * u.group / 16; i < (g + 1) * u.group / 16; ++i) s += a->bsums[i];
      ysum = dy * static_cast<float>(s);
      for (int j = 0; j < u.group; ++j) isum += u.q[g * u.group + j] * a->qs[g * u.group + j];
    } else {  // one group of 32: block b is half b % 2 of pair b / 2
      const auto* a = reinterpret_cast<const ActQ8x2*>(act_row) + b / 2;
      const int half = static_cast<int>(b % 2);
      dy = a->d[half];
      ysum = a->s[half];
      for (int j = 0; j < 32; ++j) isum += u.q[j] * a->qs[act_pair_index(half, j)];
    }
    sum += u.a[g] * dy * static_cast<float>(isum) + u.b[g] * ysum;
  }
  return sum;
}

}  // namespace

void gguf_matmul_rows_scalar(const RowsArgs& a, int64_t n0, int64_t n1) {
  const DTypeInfo& info = dtype_info(a.type);
  const int64_t nb = a.k / info.block_size;
  const bool q8_k = uses_q8_k(a.type);
  Unpacked u;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.m; ++m) a.y[m * a.ldy + n] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      unpack(a.type, a.w + n * a.row_bytes + b * info.block_bytes, u);
      for (int64_t m = 0; m < a.m; ++m) a.y[m * a.ldy + n] += dot_block(u, a.acts + m * a.act_bytes, b, q8_k);
    }
  }
}

}  // namespace flashlm::gemm::detail
