// AVX-VNNI W8A8 GEMM: the AVX2 kernel (int8_gemm_avx2_body.h) with vpdpbusd, which multiplies u8 x s8
// and adds groups of four straight into int32 (no int16 intermediate, one instruction instead of three).
// Compiled with -mavx2 -mfma -mf16c -mavxvnni and called only where cpu_features().avx_vnni.
#include "int8_gemm_avx2_body.h"

namespace flashlm::gemm {
namespace {

struct DotVnni {
  FLASHLM_AVX2_INLINE static __m256i dot(__m256i acc, __m256i u8, __m256i s8) {
    return _mm256_dpbusd_avx_epi32(acc, u8, s8);
  }
};

}  // namespace

void int8_gemm_vnni(const Int8Args& a, int64_t n_begin, int64_t n_end, int8_t* panel) {
  int8_gemm_panels<DotVnni>(a, n_begin, n_end, panel);
}

}  // namespace flashlm::gemm
