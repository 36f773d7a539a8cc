// CUDA attention backward (not written yet).
#include "attention_kernels.h"
#include "flashlm/core/error.h"

namespace flashlm::attention {
void backward_cuda(const Params&, int, void*) { throw NotImplementedError("attention: no CUDA backward kernel yet"); }
}  // namespace flashlm::attention
