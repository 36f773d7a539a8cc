// Scalar CPU attention: the plain reference the AVX2 and CUDA kernels are checked against, and the path on
// CPUs without AVX2. Forward in both loop orders (v1: K/V blocks outer; v2: Q blocks outer), backward as in
// FlashAttention-2 (P recomputed from the saved logsumexp), all in f32. Dropout scales P by the mask's factors
// (shared_dropout.h) after the sum l is taken and before P . V; the backward draws the same factors again.
#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "attention_kernels.h"
#include "shared_softmax.h"
#include "flashlm/core/thread_pool.h"

namespace flashlm::attention {
namespace {

using cpu::Sequence;

constexpr int64_t kBlockM = 32;  // query rows per block
constexpr int64_t kBlockN = 32;  // keys per block
constexpr float kInf = std::numeric_limits<float>::infinity();

float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// The running softmax state of one query row: max m, sum l and the unnormalised output acc.
struct RowState {
  float m = -kInf, l = 0.f;
};

// The query row a fold works on: row i of sequence s, its head's ALiBi slope (0: none).
struct QueryRow {
  const Sequence& s;
  int64_t i;
  float slope;
};

// The dropout factors of keys [j0, j1) of row i of head h (drop[j - j0]), or nullptr without dropout.
const float* dropout_factors(const Params& p, int b, int h, int64_t i, int64_t j0, int64_t j1,
                             std::vector<float>& drop) {
  if (!p.dropout()) return nullptr;
  drop.resize(size_t(std::max<int64_t>(j1 - j0, 1)));
  dropout::row_factors(p.rng, b, h, i, j0, j1, drop.data());
  return drop.data();
}

// Folds keys [j0, j1) (all visible to the row) into the row's state. k and v hold the sequence's keys as f32;
// drop: their dropout factors, or nullptr. NaN and inf follow shared_softmax.h: a NaN score makes m NaN, and
// the exponents are taken against base(m).
void fold_keys(const Params& p, const QueryRow& row, const float* q, const float* k, const float* v, int64_t j0,
               int64_t j1, RowState& st, float* acc, float* s, const float* drop) {
  const int D = p.head_dim;
  float m_new = st.m;
  for (int64_t j = j0; j < j1; ++j) {
    s[j - j0] = cpu::score(p, dot(q, k + j * D, D));
    if (row.slope != 0.f) s[j - j0] += cpu::alibi_bias(row.slope, row.s, row.i, j);
    m_new = softmax::max_nan(m_new, s[j - j0]);
  }
  const float base = softmax::base(m_new);
  const float alpha = std::exp(st.m - base);  // 0 when st.m is -inf
  st.l *= alpha;
  for (int d = 0; d < D; ++d) acc[d] *= alpha;
  for (int64_t j = j0; j < j1; ++j) {
    const float pj = std::exp(s[j - j0] - base);
    st.l += pj;
    const float pv = drop ? pj * drop[j - j0] : pj;
    for (int d = 0; d < D; ++d) acc[d] += pv * v[j * D + d];
  }
  st.m = m_new;
}

// Writes out = acc / l and lse = m + log(l), as shared_softmax.h rules; `seen`: the row sees some key (else
// out 0 and lse +inf).
void finish_row(const Params& p, bool seen, const RowState& st, float* acc, void* out, float* lse) {
  const int D = p.head_dim;
  const float scale = softmax::out_scale(seen, st.l);
  for (int d = 0; d < D; ++d) acc[d] = seen ? acc[d] * scale : 0.f;
  *lse = softmax::row_lse(seen, st.m, st.m + std::log(st.l));
  cpu::store_row(acc, D, out, p.dtype);
}

// The K and V rows of sequence s at K/V head kvh, as f32 [sk, D].
void load_kv(const Params& p, int b, const Sequence& s, int kvh, std::vector<float>& k, std::vector<float>& v) {
  const int D = p.head_dim;
  k.resize(size_t(s.sk) * D);
  v.resize(size_t(s.sk) * D);
  for (int64_t j = 0; j < s.sk; ++j) {
    cpu::load_row(cpu::row_ptr(p.k, p.dtype, b * p.k_batch_stride, s.k0 + j, p.k_row_stride, kvh, p.k_head_stride),
                  p.dtype, D, &k[j * D]);
    cpu::load_row(cpu::row_ptr(p.v, p.dtype, b * p.v_batch_stride, s.k0 + j, p.v_row_stride, kvh, p.v_head_stride),
                  p.dtype, D, &v[j * D]);
  }
}

float* lse_row(const Params& p, float* base, int b, const Sequence& s, int h, int64_t i) {
  return base + b * p.lse_batch_stride + h * p.lse_head_stride + s.q0 + i;
}

// v2: each task owns query block `qb` of (b, h) and walks the key blocks, normalising once at the end.
void forward_v2_block(const Params& p, int b, int h, int64_t qb) {
  const Sequence s = cpu::sequence(p, b);
  const int D = p.head_dim;
  const int64_t i0 = qb * kBlockM, i1 = std::min(s.sq, i0 + kBlockM);
  if (i0 >= i1) return;
  std::vector<float> k, v, q(D), acc(D), scores(kBlockN), drop;
  load_kv(p, b, s, h / p.group(), k, v);
  for (int64_t i = i0; i < i1; ++i) {
    cpu::load_row(cpu::row_ptr(p.q, p.dtype, b * p.q_batch_stride, s.q0 + i, p.q_row_stride, h, p.q_head_stride),
                  p.dtype, D, q.data());
    std::fill(acc.begin(), acc.end(), 0.f);
    RowState st;
    const cpu::KeyRange keys = cpu::visible_keys(p, s, i);
    for (int64_t j0 = keys.first; j0 < keys.last; j0 += kBlockN) {
      const int64_t j1 = std::min(keys.last, j0 + kBlockN);
      fold_keys(p, QueryRow{s, i, cpu::alibi_slope(p, b, h)}, q.data(), k.data(), v.data(), j0, j1, st, acc.data(),
                scores.data(), dropout_factors(p, b, h, i, j0, j1, drop));
    }
    finish_row(p, keys.first < keys.last, st, acc.data(),
               cpu::row_ptr(p.out, p.dtype, b * p.o_batch_stride, s.q0 + i, p.o_row_stride, h, p.o_head_stride),
               lse_row(p, p.lse, b, s, h, i));
  }
}

// v1: one task per (b, h); the outer loop walks key blocks, the inner loop query blocks, and every query
// block's m, l and output are read and written back for each key block.
void forward_v1_head(const Params& p, int b, int h) {
  const Sequence s = cpu::sequence(p, b);
  const int D = p.head_dim;
  std::vector<float> k, v, q(D), scores(kBlockN), drop;
  load_kv(p, b, s, h / p.group(), k, v);
  std::vector<RowState> state(s.sq);
  std::vector<float> acc(size_t(s.sq) * D, 0.f);  // the output, unnormalised, in f32
  for (int64_t j0 = 0; j0 < s.sk; j0 += kBlockN) {
    const int64_t j1 = std::min(s.sk, j0 + kBlockN);
    for (int64_t i0 = 0; i0 < s.sq; i0 += kBlockM) {
      for (int64_t i = i0; i < std::min(s.sq, i0 + kBlockM); ++i) {
        const cpu::KeyRange keys = cpu::visible_keys(p, s, i);
        const int64_t a = std::max(j0, keys.first), e = std::min(j1, keys.last);
        if (a >= e) continue;
        cpu::load_row(cpu::row_ptr(p.q, p.dtype, b * p.q_batch_stride, s.q0 + i, p.q_row_stride, h, p.q_head_stride),
                      p.dtype, D, q.data());
        fold_keys(p, QueryRow{s, i, cpu::alibi_slope(p, b, h)}, q.data(), k.data(), v.data(), a, e, state[i],
                  &acc[i * D], scores.data(), dropout_factors(p, b, h, i, a, e, drop));
      }
    }
  }
  for (int64_t i = 0; i < s.sq; ++i) {
    const cpu::KeyRange keys = cpu::visible_keys(p, s, i);
    finish_row(p, keys.first < keys.last, state[i], &acc[i * D],
               cpu::row_ptr(p.out, p.dtype, b * p.o_batch_stride, s.q0 + i, p.o_row_stride, h, p.o_head_stride),
               lse_row(p, p.lse, b, s, h, i));
  }
}

// One task per (b, K/V head): the gradients of its keys and values sum over the query heads that share it,
// and those heads' dq rows belong to this task alone, so no two tasks write the same memory.
void backward_kv_head(const Params& p, int b, int kvh) {
  const Sequence s = cpu::sequence(p, b);
  const int D = p.head_dim;
  std::vector<float> k, v, q(D), dout(D), out(D), dq(D), drop;
  load_kv(p, b, s, kvh, k, v);
  std::vector<float> dk(size_t(s.sk) * D, 0.f), dv(size_t(s.sk) * D, 0.f);
  for (int h = kvh * p.group(); h < (kvh + 1) * p.group(); ++h) {
    const float slope = cpu::alibi_slope(p, b, h);
    for (int64_t i = 0; i < s.sq; ++i) {
      cpu::load_row(cpu::row_ptr(p.q, p.dtype, b * p.q_batch_stride, s.q0 + i, p.q_row_stride, h, p.q_head_stride),
                    p.dtype, D, q.data());
      cpu::load_row(cpu::row_ptr(p.dout, p.dtype, b * p.do_batch_stride, s.q0 + i, p.do_row_stride, h, p.do_head_stride),
                    p.dtype, D, dout.data());
      cpu::load_row(cpu::row_ptr(p.out, p.dtype, b * p.o_batch_stride, s.q0 + i, p.o_row_stride, h, p.o_head_stride),
                    p.dtype, D, out.data());
      const float delta = dot(dout.data(), out.data(), D);  // D_i = rowsum(dO * O)
      *lse_row(p, p.delta, b, s, h, i) = delta;
      const float lse = softmax::backward_lse(*lse_row(p, p.lse, b, s, h, i), delta);
      std::fill(dq.begin(), dq.end(), 0.f);
      const cpu::KeyRange keys = cpu::visible_keys(p, s, i);
      const float* fac = dropout_factors(p, b, h, i, keys.first, keys.last, drop);
      for (int64_t j = keys.first; j < keys.last && lse != kInf; ++j) {
        const float sc = cpu::score(p, dot(q.data(), &k[j * D], D));
        const float bias = slope != 0.f ? cpu::alibi_bias(slope, s, i, j) : 0.f;  // a constant: no gradient
        const float pj = std::exp(sc + bias - lse);
        // With dropout, out = sum_j pj z_j v_j (z: the factor), so dV takes pj z_j and dP is z_j dO . v_j;
        // delta = rowsum(dO * O) is still sum_j pj dP_j.
        const float z = fac ? fac[j - keys.first] : 1.f;
        const float dp = z * dot(dout.data(), &v[j * D], D);
        const float dx = pj * (dp - delta) * cpu::score_grad(p, sc);  // dS, through the softcap and the scale
        const float pv = pj * z;
        for (int d = 0; d < D; ++d) {
          dq[d] += dx * k[j * D + d];
          dk[j * D + d] += dx * q[d];
          dv[j * D + d] += pv * dout[d];
        }
      }
      cpu::store_row(dq.data(), D,
                     cpu::row_ptr(p.dq, p.dtype, b * p.dq_batch_stride, s.q0 + i, p.dq_row_stride, h, p.dq_head_stride),
                     p.dtype);
    }
  }
  for (int64_t j = 0; j < s.sk; ++j) {
    cpu::store_row(&dk[j * D], D,
                   cpu::row_ptr(p.dk, p.dtype, b * p.dk_batch_stride, s.k0 + j, p.dk_row_stride, kvh, p.dk_head_stride),
                   p.dtype);
    cpu::store_row(&dv[j * D], D,
                   cpu::row_ptr(p.dv, p.dtype, b * p.dv_batch_stride, s.k0 + j, p.dv_row_stride, kvh, p.dv_head_stride),
                   p.dtype);
  }
}

}  // namespace

void forward_scalar(const Params& p) {
  if (p.version == 1) {
    parallel_for(int64_t(p.batch) * p.heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) forward_v1_head(p, int(t / p.heads), int(t % p.heads));
    });
    return;
  }
  const int64_t q_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;  // of the longest sequence
  parallel_for(int64_t(p.batch) * p.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      forward_v2_block(p, int(t / (p.heads * q_blocks)), int(t / q_blocks % p.heads), t % q_blocks);
  });
}

void backward_scalar(const Params& p) {
  parallel_for(int64_t(p.batch) * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) backward_kv_head(p, int(t / p.kv_heads), int(t % p.kv_heads));
  });
}

}  // namespace flashlm::attention
