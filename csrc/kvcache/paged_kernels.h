// Internal entry points of the paged KV-cache kernels, one per implementation; paged_attention.cpp checks
// the arguments, fills the params and routes on device and ISA. CPU kernels split their work over the
// library's thread pool themselves.
#pragma once

#include "paged_params.h"

namespace flashlm::kvcache {

// The references: any head dimension and block size, F32 or BF16.
void write_kv_cache_cpu(const WriteParams& p);
void paged_attention_scalar(const PagedParams& p);

// AVX2/FMA. Returns false where it has no kernel for the arguments (the caller falls back to scalar).
bool paged_attention_avx2(const PagedParams& p);

// CUDA (F16 or BF16) on device `device`, queued on `stream`. Decode with p.num_splits > 1 allocates its
// partial results with cudaMallocAsync on the stream.
void write_kv_cache_cuda(const WriteParams& p, int device, void* stream);
void paged_attention_cuda(const PagedParams& p, int device, void* stream);

}  // namespace flashlm::kvcache
