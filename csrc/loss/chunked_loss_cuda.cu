// CUDA chunked loss kernels: one block of kThreads per row. A row's maximum and sums are block reductions (a
// warp shuffle tree, then the warps' results in shared memory), in another order than the CPU's, so they
// agree with the CPU kernels to f32 rounding; exp is expf. The indexed entries of a row (targets, top-k) are
// gathered or scattered by the row's first thread after the dense part, in index order, as on the CPU.
#include <cuda_runtime.h>
#include <math.h>

#include <cstdint>
#include <string>

#include "../core/cuda_guard.h"
#include "chunked_loss_kernels.h"

namespace flashlm::loss::detail {
namespace {

constexpr int kThreads = 256;

// Reduces v over the block (sum or max); every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kThreads / 32; ++w) v = kMax ? fmaxf(v, shared[w]) : v + shared[w];
  return v;
}

__device__ float row_max(const float* x, int64_t n, float scale, float* shared) {
  float m = -INFINITY;
  bool nan = false;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    m = fmaxf(m, scale * x[j]);
    nan = nan || isnan(x[j]);
  }
  m = block_reduce<true>(m, shared);
  return __syncthreads_or(nan) ? NAN : m;
}

__global__ void logsumexp_kernel(ChunkArgs a) {
  __shared__ float shared[kThreads / 32];
  const int64_t r = blockIdx.x;
  const float* x = a.logits + r * a.logits_stride;
  const float m = row_max(x, a.cols, a.scale, shared);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < a.cols; j += kThreads) s += exp_from(a.scale * x[j], m);
  s = block_reduce<false>(s, shared);
  if (threadIdx.x != 0) return;
  fold_lse(a.state + r * kLseState, m, s);
  for (int64_t i = r * a.k; i < (r + 1) * a.k; ++i) {
    const int64_t v = a.index[i];
    if (v >= a.start && v - a.start < a.cols) a.gathered[i] = x[v - a.start];
  }
}

__device__ void put(float* g, int64_t j, float v, bool accumulate) { g[j] = accumulate ? g[j] + v : v; }

__global__ void softmax_grad_kernel(ChunkArgs a) {
  const int64_t r = blockIdx.x;
  const float* x = a.logits + r * a.logits_stride;
  float* g = a.dlogits + r * a.dlogits_stride;
  const float lse = a.stats[r], c = a.coef[r];
  for (int64_t j = threadIdx.x; j < a.cols; j += kThreads)
    put(g, j, softmax_grad_element(x[j], a.scale, lse, c), a.accumulate);
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int64_t i = r * a.k; i < (r + 1) * a.k; ++i) {
    const int64_t v = a.index[i];
    if (v >= a.start && v - a.start < a.cols) g[v - a.start] -= a.weight[i];
  }
}

__global__ void kl_kernel(ChunkArgs a) {
  __shared__ float shared[kThreads / 32];
  const int64_t r = blockIdx.x;
  const float* x = a.logits + r * a.logits_stride;
  const float* t = a.teacher + r * a.teacher_stride;
  float chunk[kKLState];
  chunk[0] = row_max(x, a.cols, a.scale, shared);
  chunk[2] = row_max(t, a.cols, a.scale, shared);
  float ss = 0.0f, st = 0.0f, acc = 0.0f;
  for (int64_t j = threadIdx.x; j < a.cols; j += kThreads)
    kl_add(a.scale * x[j], a.scale * t[j], chunk, a.reverse, ss, st, acc);
  chunk[1] = block_reduce<false>(ss, shared);
  chunk[3] = block_reduce<false>(st, shared);
  chunk[4] = block_reduce<false>(acc, shared);
  if (threadIdx.x == 0) fold_kl(a.state + r * kKLState, chunk, a.reverse);
}

__global__ void kl_grad_kernel(ChunkArgs a) {
  const int64_t r = blockIdx.x;
  const float* x = a.logits + r * a.logits_stride;
  const float* t = a.teacher + r * a.teacher_stride;
  float* g = a.dlogits + r * a.dlogits_stride;
  const float* st = a.stats + r * kKLStats;
  const float c = a.coef[r];
  for (int64_t j = threadIdx.x; j < a.cols; j += kThreads)
    put(g, j, distill_grad_element(x[j], a.scale, t[j], st, c, a.reverse, a.hard_lse, a.hard_coef, r),
        a.accumulate);
  if (a.k == 0) return;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int64_t i = r * a.k; i < (r + 1) * a.k; ++i) {
    const int64_t v = a.index[i];
    if (v >= a.start && v - a.start < a.cols) g[v - a.start] -= a.weight[i];
  }
}

template <class Kernel>
void launch(Kernel kernel, const ChunkArgs& a, int device, void* stream, const char* what) {
  CudaDeviceGuard guard(device);
  FLASHLM_CHECK(a.rows <= 0x7fffffff, what, ": at most 2^31 - 1 rows on CUDA, got ", a.rows);
  kernel<<<unsigned(a.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  throw_on_cuda_error(cudaGetLastError(), std::string(what) + ": kernel launch");
}

}  // namespace

void logsumexp_cuda(const ChunkArgs& a, int device, void* stream) {
  launch(logsumexp_kernel, a, device, stream, "logsumexp_chunk");
}
void softmax_grad_cuda(const ChunkArgs& a, int device, void* stream) {
  launch(softmax_grad_kernel, a, device, stream, "softmax_chunk_grad");
}
void kl_cuda(const ChunkArgs& a, int device, void* stream) { launch(kl_kernel, a, device, stream, "kl_chunk"); }
void kl_grad_cuda(const ChunkArgs& a, int device, void* stream) {
  launch(kl_grad_kernel, a, device, stream, a.hard_coef == nullptr ? "kl_chunk_grad" : "distill_chunk_grad");
}

}  // namespace flashlm::loss::detail
