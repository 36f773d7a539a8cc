// AVX2 micro-kernel of the quantized linear layers' input gradient for many rows of dy (M >= kGemmRows): one
// decoded panel of W, C[m, width] += A[m, kc] @ B[kc, width] (backward_input_kernels.h, GemmPanel). A tile of
// 6 rows x 16 columns of C stays in 12 ymm accumulators for the whole panel; each step of the shared dimension
// is 2 loads of B and 6 broadcasts of A for 12 multiply-adds (15 of the 16 registers). Columns go outermost, so
// the B columns of one tile stay in the L1 cache while every row of C passes. The AVX-512 build
// (backward_input_gemm_avx512.cpp) is the same loop 16 columns a vector.
#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"
#include "backward_input_kernels.h"

namespace flashlm::gemm::detail {
namespace {

constexpr int kMr = kGemmStrip, kV = 2;

// Lanes [0, count) of a vector: maskload/maskstore's mask.
FLASHLM_AVX2_INLINE __m256i lanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Rows [0, MR) x vectors [0, V) of C; `last` masks the final vector's columns (the panel's edge), B's rows are
// padded so reading past it stays inside the buffer.
template <int MR, int V>
FLASHLM_AVX2_INLINE void tile(const float* a, const float* b, int64_t ldb, int64_t kc, float* c,
                              int64_t ldc, __m256i last) {
  const __m256i all = _mm256_set1_epi32(-1);
  __m256 acc[MR][V];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_maskload_ps(c + i * ldc + 8 * v, v == V - 1 ? last : all);
  for (int64_t n = 0; n < kc; ++n, a += MR, b += ldb) {
    __m256 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) _mm256_maskstore_ps(c + i * ldc + 8 * v, v == V - 1 ? last : all, acc[i][v]);
}

// Rows [i0, i0 + MR) of C, columns [j0, j0 + 8 v), v <= kV.
template <int MR>
FLASHLM_AVX2_INLINE void rows(const GemmPanel& p, int64_t i0, int v, int64_t j0, __m256i last) {
  const float* a = p.a + i0 * p.n + p.n0 * MR;  // the strip of rows i0 .. i0 + MR
  float* c = p.c + i0 * p.ldc + j0;
  if (v == 2) {
    tile<MR, 2>(a, p.b + j0, p.ldb, p.kc, c, p.ldc, last);
  } else {
    tile<MR, 1>(a, p.b + j0, p.ldb, p.kc, c, p.ldc, last);
  }
}

}  // namespace

void gemm_panel_avx2(const GemmPanel& p) {
  static_assert(kV == 2 && kMr == 6, "rows() dispatches V = 1 and 2, remainders of M < 6");
  for (int64_t j0 = 0; j0 < p.width; j0 += 8 * kV) {
    const int64_t left = p.width - j0;
    const int v = left >= 8 * kV ? kV : static_cast<int>((left + 7) / 8);
    const __m256i last = lanes(left - 8 * (v - 1));
    int64_t i0 = 0;
    for (; i0 + kMr <= p.m; i0 += kMr) rows<kMr>(p, i0, v, j0, last);
    switch (p.m - i0) {
      case 5: rows<5>(p, i0, v, j0, last); break;
      case 4: rows<4>(p, i0, v, j0, last); break;
      case 3: rows<3>(p, i0, v, j0, last); break;
      case 2: rows<2>(p, i0, v, j0, last); break;
      case 1: rows<1>(p, i0, v, j0, last); break;
      default: break;
    }
  }
}

}  // namespace flashlm::gemm::detail
