// Internal pieces of the quantized linear layers' input gradient (backward_input.cpp routes between them):
// a weight described once for every storage form, the per-ISA decoders of a few rows' blocks, and the
// multiply-add of the decoded rows into dx.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::gemm::detail {

enum class WeightKind { Gguf, Int8, Int4 };

// W [n, k] as the backward kernels read it: `block` consecutive columns of one row are decoded together.
struct BackwardWeight {
  WeightKind kind;
  DType type;             // Gguf: the block type
  const uint8_t* w;       // row r starts at w + r * row_bytes (Int8: int8 values; Int4: packed nibbles)
  int64_t row_bytes;
  int64_t block;          // columns per block: the GGUF block size, the int4 group, 64 for int8
  int64_t block_bytes;    // bytes of one block within a row
  const float* scales;    // Int8: [n]; Int4: [n, k / block]
  const float* zeros;     // Int4: [n, k / block], or null for z = 8
  int64_t n, k;
};

// Rows [r0, r0 + rows) of W, block columns [b0, b1), as float32 into out (rows x (b1 - b0) * block,
// row-major). The AVX2 decoder returns false for a kind it lacks (the caller decodes with the scalar one).
void decode_rows_scalar(const BackwardWeight& w, int64_t r0, int rows, int64_t b0, int64_t b1, float* out);
bool decode_rows_avx2(const BackwardWeight& w, int64_t r0, int rows, int64_t b0, int64_t b1, float* out);

// dx[i, 0 .. width) += sum_{r < rows} dyt[r * m + i] * wt[r * width + j] for every i < m, dx rows ldx apart
// (dyt: dy transposed, [rows, m]). rows <= kRowGroup.
constexpr int kRowGroup = 4;
void accumulate_scalar(const float* wt, int rows, int64_t width, const float* dyt, int64_t m, float* dx, int64_t ldx);
void accumulate_avx2(const float* wt, int rows, int64_t width, const float* dyt, int64_t m, float* dx, int64_t ldx);

// The fused AVX2 path for a few rows of dy (backward_input_fused_avx2.cpp): dx[i, t0 * block .. t1 * block) +=
// dy[i, :] @ W[:, those columns] for i < m, multiplied straight from the quants (dyt: dy transposed, [n, m]).
// fused_supported_avx2 says whether it reads this weight at this m (Q4_0, Q8_0, Q4_K, Q6_K, int8, int4).
// M = 4 fused took 10-30% more CPU time than decoding and adding (bench/results/backward_input.md); M = 2 less.
constexpr int kFusedRows = 2;
static_assert(kFusedRows == 2, "accumulate_fused_avx2 instantiates M = 1 and 2");
bool fused_supported_avx2(const BackwardWeight& w, int64_t m);
void accumulate_fused_avx2(const BackwardWeight& w, const float* dyt, int64_t m, float* dx, int64_t t0, int64_t t1);
// The same kernels with AVX-512F and BW (backward_input_fused_avx512.cpp), giving the same bits; only where
// avx512_allowed() says so, and for what fused_supported_avx2 accepts. Returns false for a weight it does not
// read (int8 with K not a multiple of 64, int4 with another group), which the AVX2 kernel then takes.
bool avx512_allowed();
bool accumulate_fused_avx512(const BackwardWeight& w, const float* dyt, int64_t m, float* dx, int64_t t0, int64_t t1);

// Many rows of dy (M >= kGemmRows, backward_input.cpp): a panel of W decoded once into floats and multiplied as a
// GEMM, C[m, width] += A[m, kc] @ B[kc, width]. A is dy packed in strips of the kernels' kGemmStrip rows: the
// strip of rows [i0, i0 + r), r = min(kGemmStrip, m - i0), starts at a + i0 * n and holds column j's r values at
// j * r, so a register tile's broadcasts read one contiguous run rather than r rows N floats apart. B and C are
// row-major; B's rows hold at least kGemmPad floats past width (the kernels read whole vectors and mask what they
// store).
constexpr int kGemmStrip = 6;
constexpr int64_t kGemmPad = 16;
struct GemmPanel {
  const float* a;  // dy in strips, [m, n]
  int64_t n, n0;   // dy's columns; the panel's first
  const float* b;  // the decoded weight rows n0 .. n0 + kc, a tile's columns
  int64_t ldb;
  int64_t kc, m, width;
  float* c;        // dx's rows, the tile's columns
  int64_t ldc;
};
void gemm_panel_avx2(const GemmPanel& p);
// Returns false where it was not built (no AVX-512 compiler flag).
bool gemm_panel_avx512(const GemmPanel& p);

// CUDA: dx [m, k] = dy [m, n] @ W, dy and dx of `dtype` (F32, F16 or BF16), queued on `stream`.
void backward_input_cuda(const BackwardWeight& w, const void* dy, void* dx, DType dtype, int64_t m, int device,
                         void* stream);

}  // namespace flashlm::gemm::detail
