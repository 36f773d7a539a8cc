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

// 6 rows x 64 columns: 24 accumulators, 4 loads of B and 6 broadcasts for 24 multiply-adds. Measured at M = 128
// and 512 (Q4_K and Q4_0, 2816 x 1024 and 1024 x 2816, one thread, CPU time): 6 x 64 and 4 x 96 took 10-15% less
// time than 8 x 32 (16 accumulators) and 5-10% less than 12 x 32 and 8 x 48; 6 x 64 divides a tile of 256
// columns and shares the AVX2 kernel's strips.
constexpr int kMr = kGemmStrip, kV = 4;

// Rows [0, MR) x vectors [0, V) of C; `last` masks the final vector's columns (the panel's edge), B's rows are
// padded so reading past it stays inside the buffer.
template <int MR, int V>
FLASHLM_AVX2_INLINE void tile(const float* a, const float* b, int64_t ldb, int64_t kc, float* c,
                              int64_t ldc, __mmask16 last) {
  __m512 acc[MR][V];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_maskz_loadu_ps(v == V - 1 ? last : 0xFFFF, c + i * ldc + 16 * v);
  for (int64_t n = 0; n < kc; ++n, a += MR, b += ldb) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i]);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(c + i * ldc + 16 * v, v == V - 1 ? last : 0xFFFF, acc[i][v]);
}

// Rows [i0, i0 + MR) of C, columns [j0, j0 + 16 v), v <= VMAX.
template <int MR, int VMAX>
FLASHLM_AVX2_INLINE void rows(const GemmPanel& p, int64_t i0, int v, int64_t j0, __mmask16 last) {
  const float* a = p.a + i0 * p.n + p.n0 * MR;  // the strip of rows i0 .. i0 + MR
  const float* b = p.b + j0;
  float* c = p.c + i0 * p.ldc + j0;
  if constexpr (VMAX > 1) {
    if (v == VMAX) return tile<MR, VMAX>(a, b, p.ldb, p.kc, c, p.ldc, last);
    return rows<MR, VMAX - 1>(p, i0, v, j0, last);
  } else {
    tile<MR, 1>(a, b, p.ldb, p.kc, c, p.ldc, last);
  }
}

// The last strip, of fewer than a full strip's rows.
template <int MR, int VMAX>
FLASHLM_AVX2_INLINE void rest(const GemmPanel& p, int64_t i0, int64_t count, int v, int64_t j0, __mmask16 last) {
  if (count == MR) return rows<MR, VMAX>(p, i0, v, j0, last);
  if constexpr (MR > 1) rest<MR - 1, VMAX>(p, i0, count, v, j0, last);
}

template <int MR, int V>
void panel(const GemmPanel& p) {
  for (int64_t j0 = 0; j0 < p.width; j0 += 16 * V) {
    const int64_t left = p.width - j0;
    const int v = left >= 16 * V ? V : static_cast<int>((left + 15) / 16);
    const int64_t tail = left - 16 * (v - 1);
    const __mmask16 last = tail >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << tail) - 1);
    int64_t i0 = 0;
    for (; i0 + MR <= p.m; i0 += MR) rows<MR, V>(p, i0, v, j0, last);
    if (i0 < p.m) rest<MR - 1, V>(p, i0, p.m - i0, v, j0, last);
  }
}

}  // namespace

bool gemm_panel_avx512(const GemmPanel& p) {
  panel<kMr, kV>(p);
  return true;
}

}  // namespace flashlm::gemm::detail
