// AVX2/FMA attention backward (FlashAttention-2): P is recomputed from Q, K and the saved logsumexp.
// Computes what backward_kv_head in attention_scalar.cpp (the reference) computes, in f32 with a different
// summation order.
//
// Work split, deterministic for a given thread count: one task per (batch, K/V head, chunk of K/V blocks).
// A task owns the dK and dV rows of its keys (summed over the query heads of the GQA group), so nothing
// is shared. dQ rows get contributions from every chunk: with one chunk per head (enough (batch, K/V head)
// pairs to keep the threads busy) the task writes dQ itself; otherwise each chunk writes an f32 partial
// and a second pass sums the partials in chunk order.
//
// For each key block (kBlockN keys, K and V packed once per task) and each query block (kBlockM rows of one
// head, packed once per task and head as Q, Q^T, dO, dO^T) that can see it:
//   S^T = K . Q^T               P^T = exp2(S^T - lse log2 e)        dP^T = V . dO^T
//   dS^T = P^T (dP^T - D) ds/dx   dV += P^T . dO   dK += dS^T . Q   dQ += dS . K
// with D = rowsum(dO * O) (written to p.delta) and ds/dx = scale (1 - tanh^2 with softcap). With dropout (factors
// Z of shared_dropout.h, the forward's draw), dP^T is Z (V . dO^T) and dV += (Z P)^T . dO.
#include "attention_avx2.h"
#include "attention_kernels.h"
#include "shared_softmax.h"
#include "flashlm/core/thread_pool.h"

namespace flashlm::attention {
namespace {

using namespace avx2;
using cpu::Sequence;

// Keys and query rows per block. Measured as in attention_avx2_forward.cpp (one thread, S=2048, D=64, not
// causal, GFLOP/s counting 2.5x the forward's FLOPs): 64 x 64: 81.1, kBlockM 32: 78.3, kBlockM 128: 79.5,
// kBlockN 32: 75.3, kBlockN 128: 81.2. The five GEMMs take 81% of the time, P and dS 8%.
constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockM = 64;
constexpr int64_t kMaxPartialBytes = int64_t(512) << 20;  // dQ partials of all chunks together

// The packed query side of one block of kBlockM rows of one head (cols = rows rounded up to 8; the padding
// columns are zero queries with lse = +inf, so their P is 0).
struct QueryBlock {
  float *qt, *q, *dot, *dout;  // [dp x cols], [cols x dp], [dp x cols], [cols x dp]
  float *lse2, *delta;         // [cols] lse in log2 units, rowsum(dO * O)
  ColumnRanges ranges;         // [cols]
  ColumnAlibi alibi;           // [cols], when p.alibi_slopes is set
  int64_t i0, n, cols;
  int64_t first_max, last_min;  // as in the forward pass: whether a key block needs the mask
  int64_t keys_first, keys_last;  // the keys any row of the block sees
};

int64_t query_block_floats(int64_t cols, int64_t dp) { return 4 * round_up(cols * dp, 16) + 6 * round_up(cols, 16); }

// Packs rows [i0, i0 + n) of head h and computes their delta (stored to p.delta when write_delta).
void pack_query_block(const Params& p, int b, const Sequence& s, int h, QueryBlock& qb, int64_t dp, float* orow,
                      bool write_delta) {
  const int64_t cols = qb.cols;
  for (int64_t c = 0; c < cols; ++c) {
    float* q = qb.q + c * dp;
    float* dout = qb.dout + c * dp;
    float lse2 = __builtin_inff(), delta = 0.f;
    int32_t first = 0, last = 0;
    if (p.alibi_slopes) set_column_alibi(p, b, s, h, c < qb.n ? qb.i0 + c : -1, qb.alibi, c);
    if (c < qb.n) {
      const int64_t i = qb.i0 + c;
      load_row_f32(cpu::row_ptr(p.q, p.dtype, b * p.q_batch_stride, s.q0 + i, p.q_row_stride, h, p.q_head_stride),
                   p.dtype, p.head_dim, dp, q);
      load_row_f32(cpu::row_ptr(p.dout, p.dtype, b * p.do_batch_stride, s.q0 + i, p.do_row_stride, h, p.do_head_stride),
                   p.dtype, p.head_dim, dp, dout);
      load_row_f32(cpu::row_ptr(p.out, p.dtype, b * p.o_batch_stride, s.q0 + i, p.o_row_stride, h, p.o_head_stride),
                   p.dtype, p.head_dim, dp, orow);
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < dp; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(dout + d), _mm256_loadu_ps(orow + d), acc);
      delta = hsum(acc);
      const int64_t stat = b * p.lse_batch_stride + h * p.lse_head_stride + s.q0 + i;
      if (write_delta) p.delta[stat] = delta;
      lse2 = softmax::backward_lse(p.lse[stat], delta) * kLog2e;  // +inf for a row that sees no key
      const cpu::KeyRange keys = cpu::visible_keys(p, s, i);
      first = int32_t(keys.first);
      last = int32_t(keys.last);
    } else {
      std::memset(q, 0, size_t(dp) * 4);
      std::memset(dout, 0, size_t(dp) * 4);
    }
    qb.lse2[c] = lse2;
    qb.delta[c] = delta;
    qb.ranges.first[c] = first;
    qb.ranges.last[c] = last;
  }
  transpose_into(qb.q, cols, dp, qb.qt, cols, 0);
  transpose_into(qb.dout, cols, dp, qb.dot, cols, 0);
  qb.first_max = cpu::visible_keys(p, s, qb.i0 + qb.n - 1).first;
  qb.last_min = cpu::visible_keys(p, s, qb.i0).last;
  const cpu::KeyRange keys = cpu::visible_keys(p, s, qb.i0, qb.i0 + qb.n);
  qb.keys_first = keys.first;
  qb.keys_last = keys.last;
}

// P^T and dS^T from S^T (log2 units, in s) and dP^T (in dp_): s <- P, dp_ <- dS. t: tanh values (softcap).
// kMask (a block some keys of which some rows do not see): both are exactly 0 where the row does not see the
// key, whatever its lse, delta and V hold (exp2 of -inf - -inf, or 0 times a NaN, would make them NaN).
// The dropout factors of the block's rows for keys j0 .. j0 + bn, laid out as S^T ([bn x cols]; 0 in padding
// columns).
void dropout_factors(const Params& p, int b, int h, const QueryBlock& qb, int64_t j0, int64_t bn, float* z) {
  float f[kBlockN];
  for (int64_t c = 0; c < qb.cols; ++c) {
    if (c < qb.n) dropout::row_factors(p.rng, b, h, qb.i0 + c, j0, j0 + bn, f);
    for (int64_t j = 0; j < bn; ++j) z[j * qb.cols + c] = c < qb.n ? f[j] : 0.f;
  }
}

// kDropout: z holds the dropout factors (dropout_factors).
template <bool kMask, bool kDropout>
void probabilities_and_score_grads(const Params& p, const QueryBlock& qb, int64_t j0, int64_t bn, float* s, float* dp_,
                                   const float* t, const float* z) {
  const int64_t cols = qb.cols;
  const __m256 scale = _mm256_set1_ps(p.scale), one = _mm256_set1_ps(1.f);
  for (int64_t j = 0; j < bn; ++j) {
    for (int64_t c = 0; c < cols; c += 8) {
      const int64_t e = j * cols + c;
      __m256 pr = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(s + e), _mm256_loadu_ps(qb.lse2 + c)));
      __m256 grad = scale;
      if (t) {
        const __m256 tv = _mm256_loadu_ps(t + e);
        grad = _mm256_mul_ps(scale, _mm256_fnmadd_ps(tv, tv, one));
      }
      __m256 dpv = _mm256_loadu_ps(dp_ + e), pr_v = pr;  // pr_v: the P that dV takes
      if constexpr (kDropout) {
        const __m256 zv = _mm256_loadu_ps(z + e);
        dpv = _mm256_mul_ps(dpv, zv);
        pr_v = _mm256_mul_ps(pr, zv);
      }
      __m256 ds = _mm256_mul_ps(_mm256_mul_ps(pr, _mm256_sub_ps(dpv, _mm256_loadu_ps(qb.delta + c))), grad);
      if constexpr (kMask) {
        const __m256 seen = visible(qb.ranges, c, j0 + j);
        pr_v = _mm256_and_ps(pr_v, seen);
        ds = _mm256_and_ps(ds, seen);
      }
      _mm256_storeu_ps(s + e, pr_v);
      _mm256_storeu_ps(dp_ + e, ds);
    }
  }
}

// The chunks per (batch, K/V head) and the key blocks of chunk c of a sequence with nkb key blocks.
int chunks_per_head(const Params& p, int64_t dp) {
  const int64_t pairs = int64_t(p.batch) * p.kv_heads, target = 4 * int64_t(num_threads());
  if (pairs >= target) return 1;
  const int64_t max_kb = (p.seqlen_k + kBlockN - 1) / kBlockN;
  int64_t n = min64((target + pairs - 1) / pairs, max64(1, max_kb));
  const int64_t rows = p.packed() ? p.total_q : int64_t(p.batch) * p.seqlen_q;
  while (n > 1 && n * rows * p.heads * dp * 4 > kMaxPartialBytes) --n;
  return int(n);
}

// Task (b, kvh, chunk): dK and dV of the chunk's keys, dQ (or its partial) of the group's heads.
void backward_task(const Params& p, int b, int kvh, int chunk, int nchunks, float* partial, Scratch& scratch) {
  const Sequence s = cpu::sequence(p, b);
  const int G = p.group();
  const int64_t dp = round_up(p.head_dim, 8);
  const int64_t nkb = (s.sk + kBlockN - 1) / kBlockN;
  const int64_t kb0 = nkb * chunk / nchunks, kb1 = nkb * (chunk + 1) / nchunks;
  const int64_t ka = min64(s.sk, kb0 * kBlockN), kz = min64(s.sk, kb1 * kBlockN), nk = kz - ka;
  const int64_t nqb = (s.sq + kBlockM - 1) / kBlockM;
  const int64_t cols_max = round_up(min64(kBlockM, max64(s.sq, 1)), 8);
  const bool cap = p.softcap > 0.f;
  Carver c{scratch.get(4 * round_up(nk * dp, 16) + nqb * (query_block_floats(cols_max, dp) + int64_t(sizeof(QueryBlock) / 4) + 32) +
                       round_up(nqb * kBlockM * dp, 16) + (2 + cap + p.dropout()) * round_up(kBlockN * cols_max, 16) +
                       2 * round_up(dp, 16) + 64)};
  float* k = c.take(nk * dp);
  float* v = c.take(nk * dp);
  float* dk = c.take(nk * dp);
  float* dv = c.take(nk * dp);
  QueryBlock* blocks = reinterpret_cast<QueryBlock*>(c.take(nqb * int64_t(sizeof(QueryBlock) / 4 + 1)));
  float* dq = c.take(nqb * kBlockM * dp);  // the head's dQ, rows in order
  float* sbuf = c.take(kBlockN * cols_max);
  float* dpbuf = c.take(kBlockN * cols_max);
  float* tbuf = cap ? c.take(kBlockN * cols_max) : nullptr;
  float* zbuf = p.dropout() ? c.take(kBlockN * cols_max) : nullptr;
  float* orow = c.take(dp);
  for (int64_t qi = 0; qi < nqb; ++qi) {
    QueryBlock& qb = blocks[qi];
    qb.i0 = qi * kBlockM;
    qb.n = min64(s.sq, qb.i0 + kBlockM) - qb.i0;
    qb.cols = round_up(qb.n, 8);
    qb.qt = c.take(dp * qb.cols);
    qb.q = c.take(dp * qb.cols);
    qb.dot = c.take(dp * qb.cols);
    qb.dout = c.take(dp * qb.cols);
    qb.lse2 = c.take(qb.cols);
    qb.delta = c.take(qb.cols);
    qb.ranges.first = reinterpret_cast<int32_t*>(c.take(qb.cols));
    qb.ranges.last = reinterpret_cast<int32_t*>(c.take(qb.cols));
    qb.alibi.slope2 = c.take(qb.cols);
    qb.alibi.diag = c.take(qb.cols);
  }
  pack_kv(p, b, s, kvh, ka, nk, dp, k, v);
  std::memset(dk, 0, size_t(nk * dp) * 4);
  std::memset(dv, 0, size_t(nk * dp) * 4);

  for (int h = kvh * G; h < (kvh + 1) * G; ++h) {
    for (int64_t qi = 0; qi < nqb; ++qi) pack_query_block(p, b, s, h, blocks[qi], dp, orow, chunk == 0);
    std::memset(dq, 0, size_t(nqb * kBlockM * dp) * 4);
    for (int64_t j0 = ka; j0 < kz; j0 += kBlockN) {
      const int64_t bn = min64(kBlockN, kz - j0);
      const float* kj = k + (j0 - ka) * dp;
      const float* vj = v + (j0 - ka) * dp;
      for (int64_t qi = 0; qi < nqb; ++qi) {
        const QueryBlock& qb = blocks[qi];
        if (qb.keys_first >= qb.keys_last || qb.keys_last <= j0 || qb.keys_first >= j0 + bn) continue;
        // Masked too: a block with padding columns, zero queries whose P would be NaN against a key with an
        // inf (0 * inf) and reach dK and dV through the sums over columns.
        const bool mask = j0 < qb.first_max || j0 + bn > qb.last_min || qb.n < qb.cols;
        scores(p, kj, dp, bn, qb.qt, qb.cols, mask, qb.ranges, j0, sbuf, tbuf);
        if (p.alibi_slopes) add_alibi(sbuf, bn, qb.cols, j0, qb.alibi);
        StoreEpi store_dp{dpbuf, qb.cols};
        gemm(AView<false>{vj, dp}, qb.dot, qb.cols, dp, bn, qb.cols, store_dp);
        if (zbuf) {
          dropout_factors(p, b, h, qb, j0, bn, zbuf);
          if (mask) probabilities_and_score_grads<true, true>(p, qb, j0, bn, sbuf, dpbuf, tbuf, zbuf);
          else probabilities_and_score_grads<false, true>(p, qb, j0, bn, sbuf, dpbuf, tbuf, zbuf);
        } else if (mask) {
          probabilities_and_score_grads<true, false>(p, qb, j0, bn, sbuf, dpbuf, tbuf, nullptr);
        } else {
          probabilities_and_score_grads<false, false>(p, qb, j0, bn, sbuf, dpbuf, tbuf, nullptr);
        }
        AccumulateEpi to_dv{dv + (j0 - ka) * dp, dp}, to_dk{dk + (j0 - ka) * dp, dp}, to_dq{dq + qb.i0 * dp, dp};
        gemm(AView<false>{sbuf, qb.cols}, qb.dout, dp, qb.cols, bn, dp, to_dv);
        gemm(AView<false>{dpbuf, qb.cols}, qb.q, dp, qb.cols, bn, dp, to_dk);
        gemm(AView<true>{dpbuf, qb.cols}, kj, dp, bn, qb.cols, dp, to_dq);
      }
    }
    for (int64_t i = 0; i < s.sq; ++i) {
      if (nchunks == 1) {
        store_row_scaled(dq + i * dp, 1.f, p.head_dim,
                         cpu::row_ptr(p.dq, p.dtype, b * p.dq_batch_stride, s.q0 + i, p.dq_row_stride, h, p.dq_head_stride),
                         p.dtype);
      } else {
        const int64_t r = p.packed() ? s.q0 + i : b * p.seqlen_q + i;
        std::memcpy(partial + ((chunk * (p.packed() ? p.total_q : int64_t(p.batch) * p.seqlen_q) + r) * p.heads + h) * dp,
                    dq + i * dp, size_t(dp) * 4);
      }
    }
  }
  for (int64_t j = 0; j < nk; ++j) {
    store_row_scaled(dk + j * dp, 1.f, p.head_dim,
                     cpu::row_ptr(p.dk, p.dtype, b * p.dk_batch_stride, s.k0 + ka + j, p.dk_row_stride, kvh, p.dk_head_stride),
                     p.dtype);
    store_row_scaled(dv + j * dp, 1.f, p.head_dim,
                     cpu::row_ptr(p.dv, p.dtype, b * p.dv_batch_stride, s.k0 + ka + j, p.dv_row_stride, kvh, p.dv_head_stride),
                     p.dtype);
  }
}

// dQ = the sum of the chunks' partials, in chunk order; rows r of the (packed or flattened padded) batch.
void reduce_dq(const Params& p, int nchunks, const float* partial, int64_t rows, int64_t r0, int64_t r1, float* acc) {
  const int64_t dp = round_up(p.head_dim, 8);
  for (int64_t rh = r0; rh < r1; ++rh) {
    const int64_t r = rh / p.heads;
    const int h = int(rh % p.heads);
    std::memcpy(acc, partial + rh * dp, size_t(dp) * 4);
    for (int c = 1; c < nchunks; ++c) {
      const float* src = partial + (c * rows * p.heads + rh) * dp;
      for (int64_t d = 0; d < dp; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_loadu_ps(src + d)));
    }
    const int64_t b = p.packed() ? 0 : r / p.seqlen_q, row = p.packed() ? r : r % p.seqlen_q;
    store_row_scaled(acc, 1.f, p.head_dim, cpu::row_ptr(p.dq, p.dtype, b * p.dq_batch_stride, row, p.dq_row_stride, h,
                                                        p.dq_head_stride),
                     p.dtype);
  }
}

}  // namespace

bool FLASHLM_ATTENTION_ENTRY(backward)(const Params& p) {
  const int64_t dp = round_up(p.head_dim, 8);
  const int nchunks = chunks_per_head(p, dp);
  const int64_t rows = p.packed() ? p.total_q : int64_t(p.batch) * p.seqlen_q;
  Scratch partial;
  float* part = nchunks > 1 ? partial.get(int64_t(nchunks) * rows * p.heads * dp) : nullptr;
  const int64_t tasks = int64_t(p.batch) * p.kv_heads * nchunks;
  parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t t = begin; t < end; ++t)
      backward_task(p, int(t / (p.kv_heads * nchunks)), int(t / nchunks % p.kv_heads), int(t % nchunks), nchunks, part,
                    scratch);
  });
  if (nchunks > 1) {
    // Packed rows outside every sequence (before cu_seqlens_q[0], past cu_seqlens_q[B]) are left alone, as
    // by the scalar kernel.
    const int64_t first = p.packed() ? p.cu_seqlens_q[0] : 0, last = p.packed() ? p.cu_seqlens_q[p.batch] : rows;
    parallel_for((last - first) * p.heads, 64, [&](int64_t begin, int64_t end) {
      Scratch acc;
      reduce_dq(p, nchunks, part, rows, first * p.heads + begin, first * p.heads + end, acc.get(dp));
    });
  }
  return true;
}

}  // namespace flashlm::attention
