// The GGUF matmul's plain-layout kernels (gguf_matmul_avx2_body.h) with AVX-VNNI: the K-quants' int16
// products times their sub-block scales go into the int32 sums with one vpdpwssd instead of a madd and an
// add. The same integers, so the same results as gguf_matmul_avx2.cpp.
// Compiled with -mavx2 -mfma -mf16c -mavxvnni and called only where cpu_features().avx_vnni.
#include <immintrin.h>

#include <cstdint>

#include "../core/avx2.h"

namespace flashlm::gemm::detail {
namespace {
FLASHLM_AVX2_INLINE __m256i madd_add(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
}  // namespace
}  // namespace flashlm::gemm::detail

#include "gguf_matmul_avx2_body.h"

namespace flashlm::gemm::detail {

bool gguf_matmul_rows_vnni(const RowsArgs& a, int64_t n0, int64_t n1) { return rows_all_types(a, n0, n1); }

}  // namespace flashlm::gemm::detail
