// Helpers shared by the CPU paged-attention kernels (scalar and AVX2): a sequence's queries and context,
// the keys a query sees, where token t's K/V row lives, and how a decode context is cut into splits.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../attention/shared_cpu.h"
#include "paged_params.h"

namespace flashlm::kvcache::cpu {
// Internal linkage (see core/avx2.h): the AVX2 kernels include this too.
namespace {

using core::bf16_to_f32;
using core::f32_to_bf16;
using attention::cpu::load_row;
using attention::cpu::store_row;

inline int64_t elem_bytes(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

// Sequence s: its queries are rows [q0, q0 + q_len) of q, its context tokens [0, len).
struct Sequence {
  int64_t q0 = 0, q_len = 0, len = 0;
};

inline Sequence sequence(const PagedParams& p, int s) {
  Sequence r;
  if (p.decode()) {
    r.q0 = s, r.q_len = 1;
  } else {
    r.q0 = p.cu_seqlens_q[s];
    r.q_len = p.cu_seqlens_q[s + 1] - r.q0;
  }
  r.len = p.seq_lens[s];
  return r;
}

// The context tokens [first, last) that query i (0-based within the sequence) sees; it sits at position
// len - q_len + i. A decode query of an empty context sees nothing.
struct KeyRange {
  int64_t first, last;
};

inline KeyRange visible_keys(const PagedParams& p, const Sequence& s, int64_t i) {
  const int64_t pos = s.len - s.q_len + i;
  const int64_t first = p.window_left >= 0 ? std::max<int64_t>(0, pos - p.window_left) : 0;
  const int64_t last = p.window_right >= 0 ? std::min<int64_t>(s.len, pos + p.window_right + 1) : s.len;
  return {first, std::max(first, last)};
}

// The ALiBi slope of head h of sequence s (0: no bias).
inline float alibi_slope(const PagedParams& p, int s, int h) {
  return p.alibi_slopes ? p.alibi_slopes[s * p.alibi_batch_stride + h] : 0.f;
}

// Split `part` of `splits` of a key range: equal parts of ceil(n / splits) tokens (the last ones may be
// shorter or empty).
inline KeyRange split_range(const KeyRange& r, int part, int splits) {
  const int64_t n = r.last - r.first, step = (n + splits - 1) / splits;
  const int64_t a = std::min(r.last, r.first + part * step), b = std::min(r.last, a + step);
  return {a, b};
}

// K (or V) row of context token t of sequence s at K/V head h.
inline const char* cache_row(const PagedParams& p, const void* cache, int64_t block_stride, int64_t row_stride,
                             int64_t head_stride, int s, int64_t t, int h) {
  const int64_t block = p.block_table[s * p.block_table_stride + t / p.block_size];
  return static_cast<const char*>(cache) +
         (block * block_stride + (t % p.block_size) * row_stride + h * head_stride) * elem_bytes(p.dtype);
}
inline const char* k_row(const PagedParams& p, int s, int64_t t, int h) {
  return cache_row(p, p.k_cache, p.kc_block_stride, p.kc_row_stride, p.kc_head_stride, s, t, h);
}
inline const char* v_row(const PagedParams& p, int s, int64_t t, int h) {
  return cache_row(p, p.v_cache, p.vc_block_stride, p.vc_row_stride, p.vc_head_stride, s, t, h);
}

inline const char* q_row(const PagedParams& p, int64_t row, int h) {
  return static_cast<const char*>(p.q) + (row * p.q_row_stride + h * p.q_head_stride) * elem_bytes(p.dtype);
}
inline char* out_row(const PagedParams& p, int64_t row, int h) {
  return static_cast<char*>(p.out) + (row * p.o_row_stride + h * p.o_head_stride) * elem_bytes(p.dtype);
}

}  // namespace
}  // namespace flashlm::kvcache::cpu
