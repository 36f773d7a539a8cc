// Vocabulary-chunked softmax losses: the native steps of cross-entropy and KL divergence computed one
// vocabulary chunk of logits at a time, so that the [tokens, vocab] logits never exist at once
// (flashlm.ops.loss runs the chunk GEMMs and chains these steps; see docs/ARCHITECTURE.md).
//
// A chunk is `logits` [rows, cols] (f32), the columns [start, start + cols) of the vocabulary, optionally
// scaled by `scale` (1 / temperature) before the softmax. The forward steps fold a chunk into per-row running
// state (an online logsumexp); the gradient steps recompute the chunk's softmax from the final logsumexp and
// write dL/dlogits of the chunk. Every view: f32 (index: I64), on one device, the last dimension
// contiguous, rows at any stride >= cols. Throws ValueError naming the argument.
#pragma once

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::loss {

// Online logsumexp of scale * logits, row by row: state [rows, 2] holds (max, sum of exp(x - max)), to be
// started at (-inf, 0); logsumexp = max + log(sum). `index` [rows, k] (optional: ndim 0) names vocabulary
// entries per row whose raw logits are copied to `gathered` [rows, k] when they fall in this chunk (the
// target of cross-entropy, a teacher's top-k tokens); entries outside the chunk (negative ones included)
// are left alone.
FLASHLM_API void logsumexp_chunk(const TensorView& logits, int64_t start, double scale, const TensorView& state,
                                 const TensorView& index, const TensorView& gathered, void* stream = nullptr);

// dlogits = coef[r] * exp(scale * logits - lse[r]) - sum over k of weight[r, k] where index[r, k] is the
// column (index and weight optional together). With `accumulate` the result is added to dlogits. The
// gradient of any loss of the form f(logsumexp) - sum_k w_k * logit[index_k] (cross-entropy, top-k KL).
FLASHLM_API void softmax_chunk_grad(const TensorView& logits, int64_t start, double scale, const TensorView& lse,
                                    const TensorView& coef, const TensorView& index, const TensorView& weight,
                                    const TensorView& dlogits, bool accumulate, void* stream = nullptr);

// KL divergence between softmax(scale * teacher) and softmax(scale * logits), one chunk: state [rows, 5]
// holds (student max, student sum, teacher max, teacher sum, acc), started at (-inf, 0, -inf, 0, 0), where acc
// is sum exp(t - teacher max) * (t - s) (forward KL(teacher || student)) or, with `reverse`,
// sum exp(s - student max) * (s - t) (KL(student || teacher)); s, t the scaled logits, terms of zero
// probability count as 0. KL = acc / (that side's sum) - its logsumexp + the other side's logsumexp.
FLASHLM_API void kl_chunk(const TensorView& logits, const TensorView& teacher, double scale, bool reverse,
                          const TensorView& state, void* stream = nullptr);

// The gradient of kl_chunk's KL times coef[r], with respect to the scaled student logits: stats [rows, 3] holds
// (student logsumexp, teacher logsumexp, mean) where mean = acc / student sum (used by `reverse` only).
// Forward: coef * (p_s - p_t); reverse: coef * p_s * ((s - t) - mean). `accumulate` adds to dlogits.
FLASHLM_API void kl_chunk_grad(const TensorView& logits, const TensorView& teacher, double scale, bool reverse,
                               const TensorView& stats, const TensorView& coef, const TensorView& dlogits,
                               bool accumulate, void* stream = nullptr);

// Cross-entropy and the KL together, one pass over the chunk (a distillation loss's two terms):
// dlogits = kl_chunk_grad's term (teacher, scale, reverse, stats, coef) + softmax_chunk_grad's term at scale 1
// (lse, hard_coef, index, weight; index and weight optional together, `start` the chunk's first column).
// dlogits may be the logits themselves: each element is read before it is written.
FLASHLM_API void distill_chunk_grad(const TensorView& logits, const TensorView& teacher, int64_t start,
                                    double scale, bool reverse, const TensorView& stats, const TensorView& coef,
                                    const TensorView& lse, const TensorView& hard_coef, const TensorView& index,
                                    const TensorView& weight, const TensorView& dlogits, void* stream = nullptr);

}  // namespace flashlm::loss
