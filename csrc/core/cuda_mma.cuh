// The tensor-core instruction shared by the f16/bf16 CUDA kernels (attention, paged prefill, the int4 and
// GGUF GEMMs): mma.sync m16n8k16, A row-major and B column-major fragments of f16 or bf16, f32 accumulators.
// Fragment layout (PTX ISA, "mma.m16n8k16"): lane (g = lane / 4, t = lane % 4) holds A rows g and g + 8 at
// columns 2t, 2t + 1, 2t + 8, 2t + 9 (a0..a3), B column g at rows 2t, 2t + 1, 2t + 8, 2t + 9 (b0, b1), and
// C rows g and g + 8 at columns 2t, 2t + 1 (c0..c3). sm_80 and later.
#pragma once

#include <cstdint>

namespace flashlm::cuda_mma {

// c += a * b. Not volatile: the compiler may schedule it like any arithmetic.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace flashlm::cuda_mma
