#include "attention_avx2.h"
#include "attention_kernels.h"
namespace flashlm::attention {
bool backward_avx2(const Params&) { return false; }
}
