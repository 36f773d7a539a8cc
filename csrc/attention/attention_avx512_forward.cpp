// The AVX2 forward kernel compiled a second time with AVX-512F flags: its GEMM microkernel then takes 16
// columns per register (gemm_tile with Zmm, attention_avx2.h) and gets 32 vector registers. Everything else is
// the AVX2 source, so both give the same bits. Called only where cpu_features().avx512f says the CPU and
// OS have AVX-512 (flash_attention.cpp).
#define FLASHLM_ATTENTION_AVX512 1
#include "attention_avx2_forward.cpp"
