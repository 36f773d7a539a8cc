// The AVX2 backward kernel compiled a second time with AVX-512F flags, as attention_avx512_forward.cpp.
#define FLASHLM_ATTENTION_AVX512 1
#include "attention_avx2_backward.cpp"
