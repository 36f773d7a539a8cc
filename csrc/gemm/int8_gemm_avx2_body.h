// The W8A8 AVX2 kernel body, shared by int8_gemm_avx2.cpp (maddubs + madd) and int8_gemm_vnni.cpp
// (AVX-VNNI vpdpbusd), which differ only in the dot product `Dot`. Include only from files compiled with
// AVX2 flags; everything here has internal linkage (see core/avx2.h for why).
//
// Work: a panel of 16 output columns at a time. The panel's W rows are packed k-quad-major: for each
// k-quad q (k = 4q .. 4q + 3), 128 bytes: w[col 0..7][4], w[col 8..15][4], then |w| in the same order.
// One 32-bit broadcast of x[m, 4q .. 4q + 3] against those gives 8 columns' partial sums per instruction
// with no horizontal reduction. The micro-tile is 4 rows x 16 columns: 8 int32 accumulators.
//
// Sign trick: the dot products take an unsigned and a signed operand, so they get |w| and x * sign(w)
// (vpsignb). Each maddubs pair sums to at most 2 * 128 * 127 = 32512 and cannot saturate, provided that
// x is never -128 (vpsignb cannot negate it): the quantizer writes [-127, 127], the dispatcher checks.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../core/avx2.h"
#include "../core/half.h"
#include "int_gemm_kernels.h"
#include "transpose_avx2.h"

namespace flashlm::gemm {
namespace {

constexpr int64_t kCols = 16, kRows = 4, kQuadBytes = 128, kChunkQuads = 256;

FLASHLM_AVX2_INLINE int64_t quads(int64_t K) { return (K + 3) / 4; }

// Packs columns [n0, n0 + 16) (zeros past N, and past K up to the whole quad) into `panel`, with |w| of
// each quad beside it. Eight columns x eight quads at a time go through an 8 x 8 transpose of 32-bit quads
// (a tenth of this kernel's time had gone to copying quads one by one); a panel's last columns and quads
// are copied one quad at a time.
FLASHLM_AVX2_INLINE void pack_panel(const Int8Args& a, int64_t n0, int8_t* panel) {
  const int64_t nq = quads(a.K), full = a.K / 4, full8 = a.K / 32 * 8;
  for (int64_t cb = 0; cb < kCols; cb += 8) {
    int8_t* dst = panel + (cb / 8) * 32;
    if (n0 + cb + 8 <= a.N) {
      const int8_t* w = a.w + (n0 + cb) * a.K;
      for (int64_t q = 0; q < full8; q += 8) {
        __m256 v[8];  // quads as floats, for the transpose's shuffles
        for (int c = 0; c < 8; ++c) v[c] = _mm256_loadu_ps(reinterpret_cast<const float*>(w + c * a.K + 4 * q));
        transpose8(v);
        for (int j = 0; j < 8; ++j) {
          const __m256i quads_j = _mm256_castps_si256(v[j]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (q + j) * kQuadBytes), quads_j);
          // |-128| = 128 reads back right as the unsigned operand.
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (q + j) * kQuadBytes + 64), _mm256_abs_epi8(quads_j));
        }
      }
    }
    const int64_t q_begin = n0 + cb + 8 <= a.N ? full8 : 0;  // where the transposed copy stopped
    for (int64_t c = 0; c < 8; ++c) {
      int8_t* d = dst + c * 4;
      if (n0 + cb + c >= a.N) {
        for (int64_t q = q_begin; q < nq; ++q) std::memset(d + q * kQuadBytes, 0, 4);
        continue;
      }
      const int8_t* w = a.w + (n0 + cb + c) * a.K;
      for (int64_t q = q_begin; q < full; ++q) std::memcpy(d + q * kQuadBytes, w + 4 * q, 4);
      if (full < nq) {
        int8_t tail[4] = {0, 0, 0, 0};
        std::memcpy(tail, w + 4 * full, size_t(a.K - 4 * full));
        std::memcpy(d + full * kQuadBytes, tail, 4);
      }
    }
    for (int64_t q = q_begin; q < nq; ++q) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + q * kQuadBytes));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + q * kQuadBytes + 64), _mm256_abs_epi8(w));
    }
  }
}

// sums[r][16] (the columns of rows m + r) += sum over quads [q0, q1) of the panel of x[m + r, k] * w[col, k],
// for R <= 4 rows; the partial sums stay in registers through the chunk.
template <int R, class Dot>
FLASHLM_AVX2_INLINE void micro_tile(const int8_t* x, int64_t x_stride, const int8_t* panel, int64_t q0, int64_t q1,
                                    int32_t* sums) {
  __m256i acc[kRows][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + r * kCols));
    acc[r][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + r * kCols + 8));
  }
  for (int64_t q = q0; q < q1; ++q) {
    const int8_t* p = panel + q * kQuadBytes;
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 96));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * x_stride + q * 4, 4);
      const __m256i xb = _mm256_set1_epi32(four);
      acc[r][0] = Dot::dot(acc[r][0], a0, _mm256_sign_epi8(xb, w0));
      acc[r][1] = Dot::dot(acc[r][1], a1, _mm256_sign_epi8(xb, w1));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + r * kCols), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + r * kCols + 8), acc[r][1]);
  }
}

// y = acc * x_scale * w_scale (+ bias), in the scalar kernel's order of operations, for the columns that
// exist.
FLASHLM_AVX2_INLINE void store_row(const Int8Args& a, int64_t m, int64_t n0, const int32_t* sums,
                                   const float* w_scales, const float* bias) {
  alignas(32) float y[kCols];
  const __m256 sx = _mm256_set1_ps(a.x_scales[m]);
  for (int j = 0; j < 2; ++j) {
    const __m256 acc = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + 8 * j)));
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(acc, sx), _mm256_loadu_ps(w_scales + 8 * j));
    if (a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * j));
    _mm256_store_ps(y + 8 * j, v);
  }
  const int64_t cols = a.N - n0 < kCols ? a.N - n0 : kCols;
  if (a.out_dtype == DType::F32) {
    std::memcpy(static_cast<float*>(a.out) + m * a.N + n0, y, size_t(cols) * 4);
  } else {
    uint16_t* out = static_cast<uint16_t*>(a.out) + m * a.N + n0;
    for (int64_t c = 0; c < cols; ++c) out[c] = core::f32_to_bf16(y[c]);
  }
}

template <int R, class Dot>
FLASHLM_AVX2_INLINE void tile(const Int8Args& a, int64_t m, const int8_t* panel, int64_t q0, int64_t q1,
                              int32_t* sums) {
  micro_tile<R, Dot>(a.x + m * a.x_stride, a.x_stride, panel, q0, q1, sums + m * kCols);
}

// M < 4 (decode): no packing, which would cost as much as the product; each weight row is read once, 32
// bytes at a time, against every row of x, and reduced horizontally at the end.
template <int R, class Dot>
void int8_gemv(const Int8Args& a, int64_t n_begin, int64_t n_end) {
  const int64_t k32 = a.K / 32 * 32;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* w = a.w + n * a.K;
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < k32; k += 32) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i av = _mm256_abs_epi8(wv);
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.x + r * a.x_stride + k));
        acc[r] = Dot::dot(acc[r], av, _mm256_sign_epi8(xv, wv));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
      const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
      int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1))));
      for (int64_t k = k32; k < a.K; ++k) sum += int32_t(a.x[r * a.x_stride + k]) * int32_t(w[k]);
      float y = float(sum) * a.x_scales[r] * a.w_scales[n];
      if (a.bias) y = y + a.bias[n];
      if (a.out_dtype == DType::F32) {
        static_cast<float*>(a.out)[r * a.N + n] = y;
      } else {
        static_cast<uint16_t*>(a.out)[r * a.N + n] = core::f32_to_bf16(y);
      }
    }
  }
}

template <class Dot>
void int8_gemm_panels(const Int8Args& a, int64_t n_begin, int64_t n_end, int8_t* panel) {
  switch (a.M) {
    case 1: return int8_gemv<1, Dot>(a, n_begin, n_end);
    case 2: return int8_gemv<2, Dot>(a, n_begin, n_end);
    case 3: return int8_gemv<3, Dot>(a, n_begin, n_end);
    default: break;
  }
  // The panel's K is taken in chunks of kChunkQuads: the chunk (32 KiB) stays in L1 while every row of x
  // runs over it, the rows' partial sums waiting in `sums` between chunks (measured: 3-5% faster at
  // M = 128, K = 4096 than streaming the whole 128 KiB panel from L2 for each 4 rows).
  const int64_t nq = quads(a.K);
  int32_t* sums = reinterpret_cast<int32_t*>(panel + nq * kQuadBytes);  // [M][16] after the panel
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kCols) {
    pack_panel(a, n0, panel);
    float w_scales[kCols] = {}, bias[kCols] = {};
    for (int64_t c = 0; c < kCols && n0 + c < a.N; ++c) {
      w_scales[c] = a.w_scales[n0 + c];
      if (a.bias) bias[c] = a.bias[n0 + c];
    }
    std::memset(sums, 0, size_t(a.M * kCols) * sizeof(int32_t));
    for (int64_t q0 = 0; q0 < nq; q0 += kChunkQuads) {
      const int64_t q1 = nq - q0 < kChunkQuads ? nq : q0 + kChunkQuads;
      int64_t m = 0;
      for (; m + kRows <= a.M; m += kRows) tile<kRows, Dot>(a, m, panel, q0, q1, sums);
      switch (a.M - m) {
        case 3: tile<3, Dot>(a, m, panel, q0, q1, sums); break;
        case 2: tile<2, Dot>(a, m, panel, q0, q1, sums); break;
        case 1: tile<1, Dot>(a, m, panel, q0, q1, sums); break;
        default: break;
      }
    }
    for (int64_t m = 0; m < a.M; ++m) store_row(a, m, n0, sums + m * kCols, w_scales, bias);
  }
}

}  // namespace
}  // namespace flashlm::gemm
