// Scalar paged attention: the plain reference the AVX2 and CUDA kernels are checked against, and the path
// on CPUs without AVX2. One query row at a time, one key at a time, in f32. Decode with num_splits > 1 runs
// flash-decoding as the fast kernels do: each split of the context gives a normalised partial output and
// its lse, and the splits are merged by their lse, so the tests exercise that path on the CPU.
#include <cmath>
#include <limits>
#include <vector>

#include "../attention/shared_softmax.h"
#include "flashlm/core/thread_pool.h"
#include "paged_cpu.h"
#include "paged_kernels.h"

namespace flashlm::kvcache {
namespace {

namespace softmax = attention::softmax;

constexpr float kInf = std::numeric_limits<float>::infinity();

float score(const PagedParams& p, const float* q, const float* k) {
  float x = 0.f;
  for (int d = 0; d < p.head_dim; ++d) x += q[d] * k[d];
  return p.softcap > 0.f ? p.softcap * std::tanh(x * p.scale / p.softcap) : x * p.scale;
}

// A query row: its position in the sequence's context and its head's ALiBi slope (0: none).
struct QueryAt {
  int64_t pos;
  float slope;
};

// Attention of query q (head h) over context tokens `keys` of sequence s: out = softmax . V (normalised,
// f32) and returns its lse, NaN and inf as shared_softmax.h rules for a split; no key (or only -inf scores):
// out 0 (NaN where a V row is) and lse -inf, the merge's identity.
float attend(const PagedParams& p, int s, int kvh, const float* q, const QueryAt& at, const cpu::KeyRange& keys,
             float* out, std::vector<float>& row) {
  const int D = p.head_dim;
  float m = -kInf, l = 0.f;
  for (int d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t t = keys.first; t < keys.last; ++t) {
    cpu::load_row(cpu::k_row(p, s, t, kvh), p.dtype, D, row.data());
    float x = score(p, q, row.data());
    if (at.slope != 0.f) x -= at.slope * std::fabs(float(at.pos - t));
    const float m_new = softmax::max_nan(m, x), base = softmax::base(m_new);
    const float alpha = std::exp(m - base), pt = std::exp(x - base);
    cpu::load_row(cpu::v_row(p, s, t, kvh), p.dtype, D, row.data());
    for (int d = 0; d < D; ++d) out[d] = out[d] * alpha + pt * row[d];
    l = l * alpha + pt;
    m = m_new;
  }
  const float scale = softmax::part_scale(l);
  for (int d = 0; d < D; ++d) out[d] *= scale;
  return softmax::row_lse(true, m, m + std::log(l));
}

// Merges `splits` partial outputs (each [D], normalised) by their lse into out: the softmax over the splits'
// lse, with shared_softmax.h's rules for a row that sees any key (`seen`); returns the total lse (+inf when
// the row sees no key, and then out is 0).
float merge(const float* parts, const float* lse, int splits, int D, bool seen, float* out) {
  float m = -kInf;
  for (int i = 0; i < splits; ++i) m = softmax::max_nan(m, lse[i]);
  const float base = softmax::base(m);
  for (int d = 0; d < D; ++d) out[d] = 0.f;
  float sum = 0.f;
  for (int i = 0; i < splits; ++i) {
    const float w = std::exp(lse[i] - base);  // 0 for an empty split (whose output is 0)
    sum += w;
    for (int d = 0; d < D; ++d) out[d] += w * parts[i * D + d];
  }
  const float scale = softmax::out_scale(seen, sum);
  for (int d = 0; d < D; ++d) out[d] = seen ? out[d] * scale : 0.f;
  return softmax::row_lse(seen, m, base + std::log(sum));
}

// Every query row of sequence s at head h.
void sequence_head(const PagedParams& p, int s, int h) {
  const cpu::Sequence seq = cpu::sequence(p, s);
  const int D = p.head_dim, kvh = h / p.group(), splits = p.decode() ? p.num_splits : 1;
  std::vector<float> q(D), row(D), out(D), parts(size_t(splits) * D), lses(splits);
  for (int64_t i = 0; i < seq.q_len; ++i) {
    cpu::load_row(cpu::q_row(p, seq.q0 + i, h), p.dtype, D, q.data());
    const cpu::KeyRange keys = cpu::visible_keys(p, seq, i);
    const QueryAt at{seq.len - seq.q_len + i, cpu::alibi_slope(p, s, h)};
    for (int part = 0; part < splits; ++part)
      lses[part] = attend(p, s, kvh, q.data(), at, cpu::split_range(keys, part, splits), &parts[size_t(part) * D],
                          row);
    const float lse = merge(parts.data(), lses.data(), splits, D, keys.first < keys.last, out.data());
    cpu::store_row(out.data(), D, cpu::out_row(p, seq.q0 + i, h), p.dtype);
    if (p.lse) p.lse[h * p.num_tokens + seq.q0 + i] = lse;
  }
}

}  // namespace

void paged_attention_scalar(const PagedParams& p) {
  parallel_for(int64_t(p.num_seqs) * p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) sequence_head(p, int(t / p.heads), int(t % p.heads));
  });
}

}  // namespace flashlm::kvcache
