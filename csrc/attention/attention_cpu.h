// Helpers shared by the CPU attention kernels (scalar and AVX2): where a sequence's rows are, which keys
// a query sees, and the score of a dot product; row access is shared_cpu.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention_params.h"
#include "shared_cpu.h"

namespace flashlm::attention::cpu {
// Internal linkage: the AVX2 kernels include these too, and a copy compiled with AVX2 flags must never be
// the one that callers on other CPUs get (see core/avx2.h).
namespace {

// One sequence of the batch: its first query and key rows in the (possibly packed) tensors and its lengths.
struct Sequence {
  int64_t q0 = 0, k0 = 0;  // first row (packed batches) or 0 (padded)
  int64_t sq = 0, sk = 0;
};

inline Sequence sequence(const Params& p, int b) {
  Sequence s;
  if (p.packed()) {
    s.q0 = p.cu_seqlens_q[b];
    s.k0 = p.cu_seqlens_k[b];
    s.sq = p.cu_seqlens_q[b + 1] - s.q0;
    s.sk = p.cu_seqlens_k[b + 1] - s.k0;
  } else {
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
  }
  return s;
}

// The keys [first, last) that query i of a sequence sees (first >= last: none).
struct KeyRange {
  int64_t first, last;
};

inline KeyRange visible_keys(const Params& p, const Sequence& s, int64_t i) {
  const int64_t diag = i + s.sk - s.sq;  // the key aligned with query i
  int64_t first = p.window_left >= 0 ? std::max<int64_t>(0, diag - p.window_left) : 0;
  int64_t last = p.window_right >= 0 ? std::min<int64_t>(s.sk, diag + p.window_right + 1) : s.sk;
  return {first, std::max(first, last)};
}

// The keys any query of rows [i0, i1) sees (the union of their ranges; i0 < i1).
inline KeyRange visible_keys(const Params& p, const Sequence& s, int64_t i0, int64_t i1) {
  KeyRange a = visible_keys(p, s, i0), b = visible_keys(p, s, i1 - 1);
  return {std::min(a.first, b.first), std::max(a.last, b.last)};
}

// Address of element (row, head, 0) of a tensor given as (base, batch, strides) and its element size.
inline const void* row_ptr(const void* base, DType dtype, int64_t batch_off, int64_t row, int64_t row_stride,
                           int64_t head, int64_t head_stride) {
  const int64_t elem = dtype == DType::F32 ? 4 : 2;
  return static_cast<const char*>(base) + (batch_off + row * row_stride + head * head_stride) * elem;
}
inline void* row_ptr(void* base, DType dtype, int64_t batch_off, int64_t row, int64_t row_stride, int64_t head,
                     int64_t head_stride) {
  return const_cast<void*>(row_ptr(static_cast<const void*>(base), dtype, batch_off, row, row_stride, head, head_stride));
}

// The ALiBi slope of head h of sequence b (0: no bias), and the bias of query i and key j of sequence s.
inline float alibi_slope(const Params& p, int b, int h) {
  return p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
}
inline float alibi_bias(float slope, const Sequence& s, int64_t i, int64_t j) {
  return -slope * std::fabs(float(i + s.sk - s.sq - j));
}

// The score of a raw dot product x = q.k, and ds/dx given the score (for the backward pass).
inline float score(const Params& p, float x) {
  return p.softcap > 0.f ? p.softcap * std::tanh(x * p.scale / p.softcap) : x * p.scale;
}
inline float score_grad(const Params& p, float s) {
  if (p.softcap > 0.f) {
    const float t = s / p.softcap;  // tanh(scale * x / softcap)
    return p.scale * (1.f - t * t);
  }
  return p.scale;
}

}  // namespace
}  // namespace flashlm::attention::cpu
