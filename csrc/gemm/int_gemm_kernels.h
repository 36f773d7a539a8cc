// Internal entry points of the integer GEMM kernels, one per implementation; int_gemm.cpp checks the
// arguments, fills these structs (plain pointers, contiguous rows) and routes on device and ISA. CPU kernels
// work on a range of rows (quantization) or output columns (GEMMs) so the dispatcher can split the work
// over the thread pool; scratch memory is allocated by the dispatcher, never in the AVX2 files.
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"

namespace flashlm::gemm {

struct QuantizeArgs {
  const void* x;   // [M, K], F32 or BF16 (CUDA: also F16)
  DType x_dtype;
  int8_t* q;       // [M, K]
  float* scales;   // [M]
  int64_t M, K;
  const float* static_scale;  // null: per token (absmax / 127); else one scale for every row (quantize_static)
};

struct Int8Args {
  const int8_t* x;        // [M, x_stride]; the AVX2 kernel needs x_stride % 4 == 0 and zero padding
  int64_t x_stride;
  const float* x_scales;  // [M]
  const int8_t* w;        // [N, K]
  const float* w_scales;  // [N]
  const float* bias;      // [N] or null
  void* out;              // [M, N]
  DType out_dtype;
  int64_t M, N, K;
};

struct Int4Args {
  const void* x;        // [M, K]; the CPU kernels take F32 only (the dispatcher converts BF16)
  DType x_dtype;
  const uint8_t* w;     // [N, K / 2]
  const float* scales;  // [N, K / group]
  const float* zeros;   // [N, K / group] or null (symmetric: z = 8)
  const float* bias;    // [N] or null
  void* out;            // [M, N]
  DType out_dtype;
  int64_t M, N, K, group;
};

// Scalar references. The quantizers take a.static_scale into account (per token where it is null).
void quantize_per_token_scalar(const QuantizeArgs& a, int64_t m_begin, int64_t m_end);
void int8_gemm_scalar(const Int8Args& a, int64_t n_begin, int64_t n_end);
void int4_gemm_scalar(const Int4Args& a, int64_t n_begin, int64_t n_end);

// AVX2 (+FMA). int8: `panel` is scratch of int8_scratch_bytes(M, K) bytes (a packed weight panel and the
// rows' partial sums); the vnni kernel uses the AVX-VNNI dot product (only where cpu_features().avx_vnni).
// int4: `x_group_sums` is [M, K / group] (sums of x over each group). `xp` holds int4_gemv_x_floats(M, K)
// floats (the GEMV's reordered x; none for the GEMM path), filled once per call by int4_prepare_x_avx2 and
// read by every range; it returns whether it chose the GEMV's subnormal variant, which it may only where
// `subnormal_ok` (cpu_features().amd). `scratch`, int4_scratch_floats(M, K) floats, is each range's own.
void quantize_per_token_avx2(const QuantizeArgs& a, int64_t m_begin, int64_t m_end);
int64_t int8_scratch_bytes(int64_t M, int64_t K);
void int8_gemm_avx2(const Int8Args& a, int64_t n_begin, int64_t n_end, int8_t* panel);
void int8_gemm_vnni(const Int8Args& a, int64_t n_begin, int64_t n_end, int8_t* panel);
int64_t int4_gemv_x_floats(int64_t M, int64_t K);
bool int4_prepare_x_avx2(const Int4Args& a, bool subnormal_ok, float* xp);
int64_t int4_scratch_floats(int64_t M, int64_t K);
void int4_gemm_avx2(const Int4Args& a, const float* x_group_sums, const float* xp, bool xp_subnormal,
                    int64_t n_begin, int64_t n_end, float* scratch);

// CUDA on device `device`, queued on `stream`.
void quantize_per_token_cuda(const QuantizeArgs& a, int device, void* stream);
void int8_gemm_cuda(const Int8Args& a, int device, void* stream);
void int4_gemm_cuda(const Int4Args& a, int device, void* stream);

}  // namespace flashlm::gemm
