// AVX-512 micro-kernel of the quantized linear layers' input gradient for many rows of dy (M >= kGemmRows): one
// decoded panel of W, C[m, width] += A[m, kc] @ B[kc, width] (backward_input_kernels.h, GemmPanel). A tile of
// kMr rows x 16 kV columns of C stays in zmm registers for the whole panel (kMr * kV accumulators), and each step
// of the shared dimension is kV loads of B and kMr broadcasts of A for kMr * kV multiply-adds. Columns go
// outermost, so the B columns of one tile (kc x 16 kV floats) stay in the L1 cache while every row of C passes.
// Called only where the CPU has AVX-512F and set_backward_input_avx512 allows it (backward_input.cpp).
#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"
#include "backward_input_kernels.h"

namespace flashlm::gemm::detail {
namespace {

// 8 x 32 and 6 x 64 were measured at M = 128 (bench/results/backward_input.md); 8 x 32 divides M = 128 and its
// 16 accumulators cover the multiply-add's latency on two ports.
constexpr int kMr = 8, kV = 2;

// Rows [0, MR) x vectors [0, V) of C; `last` masks the final vector's columns (the panel's edge), B's rows are
// padded so reading past it stays inside the buffer.
template <int MR, int V>
FLASHLM_AVX2_INLINE void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc, float* c,
                              int64_t ldc, __mmask16 last) {
  __m512 acc[MR][V];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_maskz_loadu_ps(v == V - 1 ? last : 0xFFFF, c + i * ldc + 16 * v);
  for (int64_t n = 0; n < kc; ++n, b += ldb) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + n]);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(c + i * ldc + 16 * v, v == V - 1 ? last : 0xFFFF, acc[i][v]);
}

// Rows [i0, i0 + MR) of C, columns [j0, j0 + 16 v), v <= kV.
template <int MR>
FLASHLM_AVX2_INLINE void rows(const GemmPanel& p, int64_t i0, int v, int64_t j0, __mmask16 last) {
  const float* a = p.a + i0 * p.lda;
  const float* b = p.b + j0;
  float* c = p.c + i0 * p.ldc + j0;
  switch (v) {
    case 4: if constexpr (kV >= 4) tile<MR, 4>(a, p.lda, b, p.ldb, p.kc, c, p.ldc, last); break;
    case 3: if constexpr (kV >= 3) tile<MR, 3>(a, p.lda, b, p.ldb, p.kc, c, p.ldc, last); break;
    case 2: if constexpr (kV >= 2) tile<MR, 2>(a, p.lda, b, p.ldb, p.kc, c, p.ldc, last); break;
    default: tile<MR, 1>(a, p.lda, b, p.ldb, p.kc, c, p.ldc, last); break;
  }
}

}  // namespace

bool gemm_panel_avx512(const GemmPanel& p) {
  static_assert(kV >= 1 && kV <= 4 && kMr >= 1 && kMr <= 8, "rows() dispatches V <= 4, remainders of M < 8");
  for (int64_t j0 = 0; j0 < p.width; j0 += 16 * kV) {
    const int64_t left = p.width - j0;
    const int v = left >= 16 * kV ? kV : static_cast<int>((left + 15) / 16);
    const int64_t tail = left - 16 * (v - 1);
    const __mmask16 last = tail >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << tail) - 1);
    int64_t i0 = 0;
    for (; i0 + kMr <= p.m; i0 += kMr) rows<kMr>(p, i0, v, j0, last);
    switch (p.m - i0) {
      case 7: rows<7>(p, i0, v, j0, last); break;
      case 6: rows<6>(p, i0, v, j0, last); break;
      case 5: rows<5>(p, i0, v, j0, last); break;
      case 4: rows<4>(p, i0, v, j0, last); break;
      case 3: rows<3>(p, i0, v, j0, last); break;
      case 2: rows<2>(p, i0, v, j0, last); break;
      case 1: rows<1>(p, i0, v, j0, last); break;
      default: break;
    }
  }
  return true;
}

}  // namespace flashlm::gemm::detail
