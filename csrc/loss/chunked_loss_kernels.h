// The chunked loss kernels' shared internals: one struct of pointers and row strides (checked by
// chunked_loss.cpp) and the kernel entry points. The CPU kernels handle the dense part of each step (the
// online logsumexp, the softmax); the gather and scatter of indexed entries (targets, top-k) run in the
// dispatcher, once for both ISAs.
#pragma once

#include <math.h>

#include <cstdint>

// The folds run in host code and in CUDA kernels.
#ifdef __CUDACC__
#define FLASHLM_LOSS_HD __host__ __device__
#else
#define FLASHLM_LOSS_HD
#endif

namespace flashlm::loss::detail {

constexpr int kLseState = 2;  // max, sum
constexpr int kKLState = 5;   // student max, student sum, teacher max, teacher sum, acc
constexpr int kKLStats = 3;   // student logsumexp, teacher logsumexp, mean

struct ChunkArgs {
  const float* logits = nullptr;  // [rows, cols], student
  const float* teacher = nullptr;  // [rows, cols], KL steps only
  float* dlogits = nullptr;        // [rows, cols], gradient steps only
  int64_t logits_stride = 0, teacher_stride = 0, dlogits_stride = 0;  // row strides, in elements
  float* state = nullptr;          // [rows, kLseState or kKLState], forward steps
  const float* stats = nullptr;    // [rows] lse or [rows, kKLStats], gradient steps
  const float* coef = nullptr;     // [rows], gradient steps
  const int64_t* index = nullptr;  // [rows, k], optional
  float* gathered = nullptr;       // [rows, k], logsumexp_chunk with index
  const float* weight = nullptr;   // [rows, k], softmax_chunk_grad with index
  // distill_chunk_grad: the hard term's logsumexp and coefficient [rows] (null for the KL alone)
  const float* hard_lse = nullptr;
  const float* hard_coef = nullptr;
  int64_t rows = 0, cols = 0, start = 0, k = 0;
  float scale = 1.0f;
  bool reverse = false, accumulate = false;
};

// Rows [begin, end) of the dense part.
void logsumexp_scalar(const ChunkArgs& a, int64_t begin, int64_t end);
void softmax_grad_scalar(const ChunkArgs& a, int64_t begin, int64_t end);
void kl_scalar(const ChunkArgs& a, int64_t begin, int64_t end);
void kl_grad_scalar(const ChunkArgs& a, int64_t begin, int64_t end);
void logsumexp_avx2(const ChunkArgs& a, int64_t begin, int64_t end);
void softmax_grad_avx2(const ChunkArgs& a, int64_t begin, int64_t end);
void kl_avx2(const ChunkArgs& a, int64_t begin, int64_t end);
void kl_grad_avx2(const ChunkArgs& a, int64_t begin, int64_t end);

// All rows, the indexed part included, on `device`'s `stream`.
void logsumexp_cuda(const ChunkArgs& a, int device, void* stream);
void softmax_grad_cuda(const ChunkArgs& a, int device, void* stream);
void kl_cuda(const ChunkArgs& a, int device, void* stream);
void kl_grad_cuda(const ChunkArgs& a, int device, void* stream);

// Element and row helpers shared by the scalar kernels, the AVX2 kernels' ragged tails and the CUDA kernels.
// In an anonymous namespace: a TU compiled with AVX2 flags must not provide the copy other TUs link to.
namespace {

// exp(x - m), 0 for m = -inf (a row of -inf logits has no mass).
FLASHLM_LOSS_HD inline float exp_from(float x, float m) { return m == -INFINITY ? 0.0f : expf(x - m); }

// One column of softmax_chunk_grad's dense part, before accumulation.
FLASHLM_LOSS_HD inline float softmax_grad_element(float x, float scale, float lse, float c) {
  return c == 0.0f ? 0.0f : c * exp_from(scale * x, lse);
}

// Adds one column's terms to a chunk's KL sums: s, u the scaled student and teacher logits, m = (student max,
// -, teacher max). Terms of zero probability add nothing (their difference may be infinite; NaN != 0 keeps
// a NaN).
template <class Acc>
FLASHLM_LOSS_HD inline void kl_add(float s, float u, const float* m, bool reverse, Acc& ss, Acc& st, Acc& acc) {
  const float es = exp_from(s, m[0]), et = exp_from(u, m[2]);
  ss += es;
  st += et;
  const float e = reverse ? es : et;
  if (e != 0.0f) acc += Acc(e) * (reverse ? Acc(s) - Acc(u) : Acc(u) - Acc(s));
}

// One column of kl_chunk_grad's dense part, before accumulation: stats = (student lse, teacher lse, mean).
FLASHLM_LOSS_HD inline float kl_grad_element(float s, float u, const float* stats, float c, bool reverse) {
  if (c == 0.0f) return 0.0f;
  const float ps = exp_from(s, stats[0]);
  if (reverse) return ps == 0.0f ? 0.0f : c * ps * ((s - u) - stats[2]);
  return c * (ps - exp_from(u, stats[1]));
}

// kl_grad_element plus the hard term's dense part (scale 1 on the raw logit x), when the step has one.
FLASHLM_LOSS_HD inline float distill_grad_element(float x, float scale, float t, const float* stats, float c,
                                                  bool reverse, const float* hard_lse, const float* hard_coef,
                                                  int64_t r) {
  const float v = kl_grad_element(scale * x, scale * t, stats, c, reverse);
  return hard_coef == nullptr ? v : v + softmax_grad_element(x, 1.0f, hard_lse[r], hard_coef[r]);
}

// Folds a chunk's (max m, sum s of exp(x - m)) into a running (max, sum); an all -inf chunk changes nothing.
FLASHLM_LOSS_HD inline void fold_lse(float* st, float m, float s) {
  const float m0 = st[0];
  const float mn = m0 > m ? m0 : m;
  if (mn == -INFINITY) return;
  st[1] = st[1] * expf(m0 - mn) + s * expf(m - mn);
  st[0] = mn;
}

// Folds a chunk's KL state (kKLState values, acc relative to the chunk's max of the side it weights by) into
// the running state.
FLASHLM_LOSS_HD inline void fold_kl(float* st, const float* chunk, bool reverse) {
  const int side = reverse ? 0 : 2;  // the max that acc is taken against
  const float m0 = st[side], mc = chunk[side];
  const float mn = m0 > mc ? m0 : mc;
  if (mn != -INFINITY) st[4] = st[4] * expf(m0 - mn) + chunk[4] * expf(mc - mn);
  fold_lse(st, chunk[0], chunk[1]);
  fold_lse(st + 2, chunk[2], chunk[3]);
}

}  // namespace
}  // namespace flashlm::loss::detail
