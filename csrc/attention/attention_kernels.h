// Internal entry points of the attention kernels, one per implementation; flash_attention.cpp checks the
// arguments, fills Params and routes on device and ISA. CPU kernels split their work over the library's
// thread pool themselves.
#pragma once

#include "attention_params.h"

namespace flashlm::attention {

// The reference: any head dimension, F32 or BF16.
void forward_scalar(const Params& p);   // p.version 1 or 2
void backward_scalar(const Params& p);  // also writes p.delta

// AVX2/FMA. Return false where they have no kernel for the arguments (the caller falls back to scalar).
bool forward_avx2(const Params& p);
bool backward_avx2(const Params& p);

// CUDA (F16 or BF16) on device `device`, queued on `stream`. p.total_q/total_k bound the packed rows.
void forward_cuda(const Params& p, int device, void* stream);
void backward_cuda(const Params& p, int device, void* stream);

}  // namespace flashlm::attention
