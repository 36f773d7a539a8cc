// The AVX2 backward kernel compiled a second time with AVX-512F flags, as attention_avx512_forward.cpp; here
// the loop that turns scores into P and dS also takes 16 columns a step (probabilities_and_score_grads), with
// the same operations per lane, so both builds still give the same bits.
#define FLASHLM_ATTENTION_AVX512 1
#include "attention_avx2_backward.cpp"
