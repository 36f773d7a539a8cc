// AVX2/FMA CPU attention kernels (placeholder until written: the scalar path serves).
#include "attention_kernels.h"

namespace flashlm::attention {
bool forward_avx2(const Params&) { return false; }
bool backward_avx2(const Params&) { return false; }
}  // namespace flashlm::attention
