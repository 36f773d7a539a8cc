// Internal entry points of the GGUF matmul kernels (gguf_matmul.cpp routes between them) and the 8-bit
// activation blocks the CPU kernels multiply the weight blocks with. The part other folders may call is
// shared_gguf_matmul.h.
//
// Activations: the 32-element weight types (Q4_0 .. Q8_0) take one ActQ8x2 per 64 values of x (two blocks);
// the K-quants take one block_q8_K per 256 values. Both hold round(x / d) in [-128, 127] with a float scale
// d per block, so a weight block's contribution is (integer dot product) * d_w * d_x, plus, for types with
// an offset, the offset times the activation block's sum (s = d * sum(qs), or Q8_K's group sums bsums).
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"
#include "flashlm/core/tensor.h"
#include "flashlm/gguf/blocks.h"
#include "shared_gguf_matmul.h"

namespace flashlm::gemm::detail {

// Two consecutive 32-value blocks of x (ggml's Q8_1 with float scale and sum), block 0 and block 1 of the
// pair, their quants interleaved by halves: qs = q0[0..16) q1[0..16) q0[16..32) q1[16..32). One 256-bit
// load then holds the first (or last) 16 values of both blocks, matching one load of two weight blocks'
// packed nibbles (low nibbles = first 16 values); the AVX2 kernels multiply two weight blocks at once.
// A row with an odd number of blocks ends with a pair whose block 1 is zero (d = s = 0).
struct ActQ8x2 {
  float d[2];  // scales: x ~ d * q
  float s[2];  // d * sum(q) per block
  int8_t qs[64];
};
static_assert(sizeof(ActQ8x2) == 80, "ActQ8x2 size");

// Where value j (< 32) of block `half` (0 or 1) of a pair sits in ActQ8x2::qs. (static: the AVX2 file
// includes this header and must not provide the one copy of an inline function.)
static inline int act_pair_index(int half, int j) { return (j / 16) * 32 + half * 16 + j % 16; }

// Checks that w (argument `name` of function `fn`) holds the n x k weight of `type` as contiguous uint8 on
// `device`.
void check_weight_bytes(const char* fn, const TensorView& w, const char* name, DType type, int64_t n, int64_t k,
                        Device device);

// True for Q4_K, Q5_K, Q6_K (activations as block_q8_K), false for the 32-element types (ActQ8x2).
bool uses_q8_k(DType weight_type);
// Bytes of activation blocks per row of K values.
int64_t act_row_bytes(DType weight_type, int64_t k);

// Quantizes rows [m0, m1) of x [M, K] (f32 or bf16, contiguous) into `acts` (act_row_bytes per row), with the
// AVX2 code below where the run-time ISA is AVX2 (the same bits).
void quantize_activations(DType weight_type, const void* x, DType x_dtype, int64_t k, int64_t m0, int64_t m1,
                          uint8_t* acts);
// One Q8_K block (256 floats at x) as the scalar quantizer makes it, bit for bit; false (out untouched) for a
// block it leaves to the scalar code: all zeros or not all finite.
bool quantize_block_q8_k_avx2(const float* x, uint8_t* out);
// Block `half` (0 or 1) of the ActQ8x2 pair at out from 32 floats at x, likewise; false for a block that is not
// all finite.
bool quantize_block_q8_avx2(const float* x, uint8_t* out, int half);

// Computes y[m, n] = sum_k x[m, k] * W[n, k] for all m < M and n in [n0, n1), without bias, from the
// weight blocks (row_bytes bytes per row of W) and the quantized activations. y is float [M, ldy].
struct RowsArgs {
  DType type;
  const uint8_t* w;
  int64_t row_bytes;
  const uint8_t* acts;
  int64_t act_bytes;  // per row of x
  int64_t m, k;
  float* y;
  int64_t ldy;
};
void gguf_matmul_rows_scalar(const RowsArgs& a, int64_t n0, int64_t n1);
// Returns false where there is no AVX2 kernel for the type (the caller falls back to scalar).
bool gguf_matmul_rows_avx2(const RowsArgs& a, int64_t n0, int64_t n1);
// The same kernels with AVX-VNNI (the same results); call only where cpu_features().avx_vnni.
bool gguf_matmul_rows_vnni(const RowsArgs& a, int64_t n0, int64_t n1);
// The rows through the AVX2 or AVX-VNNI kernels where the run-time ISA is AVX2 (VNNI where the CPU has it and
// set_gguf_matmul_vnni allows), else scalar.
void gguf_matmul_rows(const RowsArgs& a, int64_t n0, int64_t n1);

// The per-pair terms the x4 kernels take from the activations (ActQ8x2 rows, act_bytes apart), once per call:
// kX4ExtraBytes for each of the m rows' k / 64 pairs, in the format of the kernel family that reads them.
constexpr int64_t kX4ExtraBytes = 64;
void x4_pair_extras_avx2(const uint8_t* acts, int64_t act_bytes, int64_t m, int64_t k, uint8_t* extras);
void x4_pair_extras_vnni(const uint8_t* acts, int64_t act_bytes, int64_t m, int64_t k, uint8_t* extras);
// y[r, n] for all m activation rows and rows n in [n0, n1) (multiples of 4) from the packed weights; y is
// [m, ldy]. One activation row is the GEMV. The K-quants (Q4_K, Q6_K) take block_q8_K rows and no extras.
void matmul_x4_avx2(DType type, const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes,
                    const uint8_t* extras, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1);
void matmul_x4_vnni(DType type, const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes,
                    const uint8_t* extras, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1);
// Whether `type` has an x4 layout (Q4_0, Q8_0, Q4_K, Q6_K), and what K must be a multiple of for it (64, 256).
bool repack_x4_type(DType type);
int64_t repack_x4_k_multiple(DType type);
// The K-quants' part of matmul_x4_vnni (repack_x4k_vnni.cpp).
void matmul_x4k_vnni(DType type, const uint8_t* packed, int64_t k, const uint8_t* acts, int64_t act_bytes, int64_t m,
                     float* y, int64_t ldy, int64_t n0, int64_t n1);
// True where the x4 VNNI kernels are compiled in, the CPU has AVX-512 F/BW/VNNI and set_gguf_matmul_vnni
// allows them.
bool x4_vnni_available();
// Whether set_gguf_matmul_vnni allows VNNI kernels.
bool vnni_allowed();
// Rows [n0, n1) (n0 a multiple of 4) of a part read from its x4 copy only, without bias: whole groups through
// matmul_x4_* (vnni / avx2) or, on the scalar path, unpacked group by group; the last n % 4 rows as plain rows.
void x4_rows(const MatmulPart& p, int64_t k, const uint8_t* acts, int64_t act_bytes, const uint8_t* extras,
             int64_t m, bool avx2, bool vnni, int64_t n0, int64_t n1);

// Rows [n0, n1) (n0 a multiple of 4) of a part in the plain layout through the x4 VNNI kernels: each panel of
// 16 rows regrouped into a per-thread buffer, then multiplied with all m activation rows; the last n % 4 rows
// as plain rows. Bit-equal to gguf_matmul_rows. Call only where x4_vnni_available() and
// repack_x4_supported(p.type, p.n, k); extras as for x4_rows.
void x4_rows_regrouped(const MatmulPart& p, int64_t k, const uint8_t* acts, int64_t act_bytes, const uint8_t* extras,
                       int64_t m, int64_t n0, int64_t n1);

// CUDA: y = x @ W.T (+ bias) on device `device`, queued on `stream`. x, bias, y have dtype `dtype`
// (F16, BF16 or F32); bias may be null.
struct CudaArgs {
  DType type;
  const uint8_t* w;
  const void* x;
  const void* bias;
  void* y;
  DType dtype;
  int64_t m, n, k;
  int device;
  void* stream;
};
void gguf_matmul_cuda(const CudaArgs& a);

}  // namespace flashlm::gemm::detail

namespace flashlm::gemm::detail {

// CUDA tensor-core GEMM (gguf_matmul_mma_cuda.cu): c[m, n] = a[m, k] @ b[n, k].T (+ bias[n]), all of
// `dtype` (F16 or BF16) with float32 accumulation; k a multiple of 32, a and b 16-byte aligned. Queued on
// `stream` on the current device.
void gemm_nt_mma_cuda(const void* a, const void* b, const void* bias, void* c, DType dtype, int64_t m, int64_t n,
                      int64_t k, void* stream);

}  // namespace flashlm::gemm::detail
