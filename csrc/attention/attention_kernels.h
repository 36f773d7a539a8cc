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

// The AVX2 kernels built with AVX-512F flags (wider GEMM tiles, the same results); only where
// avx512_allowed().
bool forward_avx512(const Params& p);
bool backward_avx512(const Params& p);
bool avx512_allowed();  // the CPU has AVX-512F, the build has the kernels, and set_attention_avx512 allows them

// CUDA (F16 or BF16) on device `device`, queued on `stream`. p.total_q/total_k bound the packed rows.
void forward_cuda(const Params& p, int device, void* stream);
void backward_cuda(const Params& p, int device, void* stream);

}  // namespace flashlm::attention
