// Fused AVX2 kernels of the quantized linear layers' input gradient for a few rows of dy (M <= kFusedRows):
// dx[i, cols of a block] += dy[i, n] * W[n, cols] read straight from the block's quants, with no float buffer
// between decoding and the multiply-add. The caller owns a tile of dx's columns (kept in the L1 cache) and
// these kernels walk every weight row's blocks of that tile, so the weight bytes stream once, in row order.
//
// Where a weight is a scale times an integer (Q4_0, Q8_0, Q6_K, int8, symmetric int4), dy[i, n] is folded into
// the scale: one scalar product per sub-block, then a fused multiply-add per element, (dy * s) * q. The integer
// offsets (q - 8, q - 32) are applied to the bytes, so q is exact, and each term carries at most the roundings
// of the decoded weight times dy: the scalar kernel's error bound holds. Where a weight subtracts a minimum
// (Q4_K: d1 * q - m1; asymmetric int4: (u - z) * s) the product with dy of the two parts would cancel, so the
// weight is decoded exactly as the scalar decoder does (the same multiply and subtract), then fused into dx.
#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"
#include "../gguf/shared_decoders.h"
#include "../gguf/shared_unpack_avx2.h"
#include "backward_input_kernels.h"
#include "flashlm/gguf/blocks.h"

namespace flashlm::gemm::detail {
namespace {

using gguf::detail::crumbs;
using gguf::detail::load16B;
using gguf::detail::load32B;
using gguf::detail::load_f16;
using gguf::detail::nibbles;
using gguf::detail::nibbles_lo_hi;

// M rows of dx (ldx apart) and the weight row's M values of dy.
template <int M>
struct DxRows {
  float* dx;
  int64_t ldx;
  float a[M];

  // dx[i, col .. col + 8V) += (a[i] * s) * v: s a scale shared by the V vectors (1 for decoded weights).
  template <int V>
  FLASHLM_AVX2_INLINE void add(int64_t col, const __m256* v, float s) {
    for (int i = 0; i < M; ++i) {
      const __m256 f = _mm256_set1_ps(a[i] * s);
      float* o = dx + i * ldx + col;
      for (int j = 0; j < V; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(f, v[j], _mm256_loadu_ps(o + 8 * j)));
    }
  }
};

// 16 signed bytes as two vectors of 8 floats (the low 8 bytes first).
FLASHLM_AVX2_INLINE void floats16(__m128i x, __m256* v) {
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(x, x)));
}
FLASHLM_AVX2_INLINE void floats32(__m256i x, __m256* v) {
  floats16(_mm256_castsi256_si128(x), v);
  floats16(_mm256_extracti128_si256(x, 1), v + 2);
}

// Q4_0: 32 elements d * (q - 8).
template <int M>
FLASHLM_AVX2_INLINE void block_q4_0(const uint8_t* b, int64_t col, DxRows<M>& dx) {
  __m256 v[4];
  floats32(_mm256_sub_epi8(nibbles_lo_hi(b + offsetof(gguf::block_q4_0, qs)), _mm256_set1_epi8(8)), v);
  dx.template add<4>(col, v, load_f16(b + offsetof(gguf::block_q4_0, d)));
}

// Q8_0: 32 elements d * q.
template <int M>
FLASHLM_AVX2_INLINE void block_q8_0(const uint8_t* b, int64_t col, DxRows<M>& dx) {
  __m256 v[4];
  const uint8_t* q = b + offsetof(gguf::block_q8_0, qs);
  for (int j = 0; j < 4; ++j)
    v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j))));
  dx.template add<4>(col, v, load_f16(b + offsetof(gguf::block_q8_0, d)));
}

// Q4_K: 8 sub-blocks of 32, d1 * q - m1 (d1 = d * scale, m1 = dmin * min); sub-blocks 2p and 2p + 1 are the
// low and high nibbles of qs[32p .. 32p + 32).
template <int M>
FLASHLM_AVX2_INLINE void block_q4_k(const uint8_t* b, int64_t col, DxRows<M>& dx) {
  const float d = load_f16(b + offsetof(gguf::block_q4_K, d)), dmin = load_f16(b + offsetof(gguf::block_q4_K, dmin));
  const uint8_t* scales = b + offsetof(gguf::block_q4_K, scales);
  for (int p = 0; p < 4; ++p) {
    const __m256i x = load32B(b + offsetof(gguf::block_q4_K, qs) + 32 * p);
    for (int s = 0; s < 2; ++s) {
      const int j = 2 * p + s;
      uint32_t sc, mn;
      gguf::detail::scale_min_k4(j, scales, &sc, &mn);
      const __m256 d1 = _mm256_set1_ps(d * float(sc)), m1 = _mm256_set1_ps(dmin * float(mn));
      __m256 v[4];
      floats32(nibbles(x, s), v);
      for (int c = 0; c < 4; ++c) v[c] = _mm256_sub_ps(_mm256_mul_ps(d1, v[c]), m1);
      dx.template add<4>(col + 32 * j, v, 1.f);
    }
  }
}

// Q6_K: 16 sub-blocks of 16, d * scale * (q - 32); the element layout is shared_decoders.h's Decoder<Q6_K>.
template <int M>
FLASHLM_AVX2_INLINE void block_q6_k(const uint8_t* b, int64_t col, DxRows<M>& dx) {
  const float d = load_f16(b + offsetof(gguf::block_q6_K, d));
  const auto* scales = reinterpret_cast<const int8_t*>(b + offsetof(gguf::block_q6_K, scales));
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b + offsetof(gguf::block_q6_K, ql) + 64 * h;
    const __m256i lo[2] = {load32B(ql), load32B(ql + 32)};
    const __m256i hi = load32B(b + offsetof(gguf::block_q6_K, qh) + 32 * h);
    for (int t = 0; t < 4; ++t) {
      const __m256i q = _mm256_or_si256(nibbles(lo[t % 2], t / 2), _mm256_slli_epi16(crumbs(hi, t), 4));
      __m256 v[4];
      floats32(_mm256_sub_epi8(q, _mm256_set1_epi8(32)), v);
      const int e = 128 * h + 32 * t;
      dx.template add<2>(col + e, v, d * float(scales[e / 16]));
      dx.template add<2>(col + e + 16, v + 2, d * float(scales[e / 16 + 1]));
    }
  }
}

// int8: columns [c0, c1) of one row, s * q.
template <int M>
FLASHLM_AVX2_INLINE void row_int8(const int8_t* q, float s, int64_t c0, int64_t c1, DxRows<M>& dx) {
  int64_t j = c0;
  for (; j + 8 <= c1; j += 8) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j))));
    dx.template add<1>(j, &v, s);
  }
  for (; j < c1; ++j)
    for (int i = 0; i < M; ++i) dx.dx[i * dx.ldx + j] = __builtin_fmaf(dx.a[i] * s, float(q[j]), dx.dx[i * dx.ldx + j]);
}

// int4: one group of `group` elements, byte j holding element j (low nibble) and j + group / 2 (high);
// (u - z) * s, or s * (u - 8) where zeros are absent (z == nullptr).
template <int M>
FLASHLM_AVX2_INLINE void group_int4(const uint8_t* q, int64_t group, float s, const float* z, int64_t col,
                                    DxRows<M>& dx) {
  const int64_t half = group / 2;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t j = 0; j < half; j += 16) {
    const __m128i x = load16B(q + j);
    __m128i u[2] = {_mm_and_si128(x, mask), _mm_and_si128(_mm_srli_epi16(x, 4), mask)};
    for (int p = 0; p < 2; ++p) {
      __m256 v[2];
      if (!z) {
        floats16(_mm_sub_epi8(u[p], _mm_set1_epi8(8)), v);
        dx.template add<2>(col + j + p * half, v, s);
        continue;
      }
      floats16(u[p], v);
      const __m256 vz = _mm256_set1_ps(*z), vs = _mm256_set1_ps(s);
      for (int c = 0; c < 2; ++c) v[c] = _mm256_mul_ps(_mm256_sub_ps(v[c], vz), vs);
      dx.template add<2>(col + j + p * half, v, 1.f);
    }
  }
}

// Every weight row's blocks [t0, t1) into M rows of dx.
template <int M>
void walk_rows(const BackwardWeight& w, const float* dyt, float* dx, int64_t t0, int64_t t1) {
  DxRows<M> rows{dx, w.k, {}};
  const int64_t groups = w.k / w.block;
  for (int64_t r = 0; r < w.n; ++r) {
    for (int i = 0; i < M; ++i) rows.a[i] = dyt[r * M + i];
    const uint8_t* src = w.w + r * w.row_bytes;
    if (w.kind == WeightKind::Int8) {
      row_int8(reinterpret_cast<const int8_t*>(src), w.scales[r], t0 * w.block, t1 * w.block, rows);
      continue;
    }
    for (int64_t b = t0; b < t1; ++b) {
      const uint8_t* blk = src + b * w.block_bytes;
      const int64_t col = b * w.block;
      if (w.kind == WeightKind::Int4) {
        group_int4(blk, w.block, w.scales[r * groups + b], w.zeros ? w.zeros + r * groups + b : nullptr, col, rows);
      } else if (w.type == DType::Q4_0) {
        block_q4_0(blk, col, rows);
      } else if (w.type == DType::Q8_0) {
        block_q8_0(blk, col, rows);
      } else if (w.type == DType::Q4_K) {
        block_q4_k(blk, col, rows);
      } else {
        block_q6_k(blk, col, rows);
      }
    }
  }
}

}  // namespace

bool fused_supported_avx2(const BackwardWeight& w, int64_t m) {
  if (m < 1 || m > kFusedRows) return false;
  if (w.kind == WeightKind::Int4) return w.block % 32 == 0;
  if (w.kind == WeightKind::Int8) return true;
  return w.type == DType::Q4_0 || w.type == DType::Q8_0 || w.type == DType::Q4_K || w.type == DType::Q6_K;
}

void accumulate_fused_avx2(const BackwardWeight& w, const float* dyt, int64_t m, float* dx, int64_t t0, int64_t t1) {
  switch (m) {
    case 1: walk_rows<1>(w, dyt, dx, t0, t1); break;
    default: walk_rows<2>(w, dyt, dx, t0, t1); break;
  }
}

}  // namespace flashlm::gemm::detail
