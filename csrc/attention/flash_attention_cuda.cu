// CUDA attention kernels (placeholder until written).
#include "attention_kernels.h"
#include "flashlm/core/error.h"

namespace flashlm::attention {
void forward_cuda(const Params&, int, void*) { throw NotImplementedError("attention: no CUDA kernel yet"); }
void backward_cuda(const Params&, int, void*) { throw NotImplementedError("attention: no CUDA kernel yet"); }
}  // namespace flashlm::attention
