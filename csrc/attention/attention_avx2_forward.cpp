// AVX2/FMA attention forward, in the two loop orders of the FlashAttention papers. Computes what
// attention_scalar.cpp (the reference) computes, in f32 with a different summation order.
//
//   v2 (FlashAttention-2): a query block is kBlockM rows of every head of a GQA group, so each K/V block
//       serves G x kBlockM query rows. Tasks are (batch, K/V head, chunk), chunk c taking query blocks c,
//       c + nchunks, ... (as many chunks as keep the pool busy; interleaved so that under a causal mask each
//       chunk gets long and short blocks alike). A task packs the keys its blocks see once; each block then
//       walks the K/V blocks it can see (blocks outside the causal/window band are never touched), keeping
//       the running max m, sum l and the unnormalised output in a task-local tile, and normalises once.
//   v1 (FlashAttention-1): one task per (batch, head); the outer loop walks K/V blocks, the inner loop the
//       query blocks, and each query block's output (f32), m and l are read and written back for every K/V
//       block; normalised at the end.
//
// One step of both (block_step) takes a K/V block of up to kBlockN keys against a tile of query columns:
//   S^T = K . Q^T (log2 units, masked)  ->  m, alpha, P^T = exp2(S^T - m), l  ->  O = alpha O + P . V
// Tiles are f32 and padded to multiples of 8 in head_dim (zeros); see attention_avx2.h for the layouts.
// Dropout multiplies P^T by the mask's factors (shared_dropout.h) after l is summed, before P . V.
//
// Block sizes: measured on this project's 2-vCPU Zen 3 machine with one thread (CPU time, so that the
// shared machine's load does not blur the comparison), B=1, H=16, S=2048, f32, not causal; medians of three
// interleaved rounds, GFLOP/s at D = 64 / 128 (before the GEMM was kept out of line, +5% everywhere):
//   kBlockN (keys per K/V block) 32: 68.6 / 69.4, 64: 70.7 / 73.8, 128: 69.0 / 71.9. 64 keys make K and V
//     blocks of 16 KiB at D = 64: one of them stays in L1 while all query columns pass over it.
//   kBlockM (query rows per head and block) 32: 70.6 / 70.4, 48: 70.7, 64: 70.7 / 73.8, 128: 69.0 / 71.4.
// With those, the GEMMs take 81% of the time at about the speed of a large torch matmul on one thread
// (90-93 GFLOP/s), the online softmax (mostly exp2) 10%, packing 4% (perf, bench_attention).
#include "attention_avx2.h"
#include "attention_kernels.h"
#include "shared_softmax.h"
#include "flashlm/core/thread_pool.h"

namespace flashlm::attention {
namespace {

using namespace avx2;
using cpu::Sequence;

constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockM = 64;
constexpr int64_t kMaxColumns = 256;  // v2: query rows of one task over the whole GQA group

// The query side of a block step: `cols` columns (a multiple of 8) of transposed queries and their
// running softmax state. Columns past the real ones are zero queries whose results are never stored.
struct QueryTile {
  const float* qt;  // [dp x cols]
  int64_t cols;
  ColumnRanges ranges;     // [cols]
  ColumnAlibi alibi;       // [cols], when p.alibi_slopes is set
  int64_t first_max = 0;   // the largest first key of the real columns
  int64_t last_min = 0;    // the smallest end of their key ranges
  float* m;                // [cols] running max, log2 units
  float* l;                // [cols] running sum
  float* alpha;            // [cols] scratch: the rescale of this step
  float* o;                // [cols x dp] unnormalised output
  // Which row column c is, for dropout: row i0 + c % np of head h0 + c / np of sequence b (a padding column
  // when c % np >= n).
  int b = 0, h0 = 0;
  int64_t i0 = 0, np = 0, n = 0;
};

// A packed K/V block: keys j0 .. j0 + bn, rows of dp floats.
struct KvBlock {
  const float* k;
  const float* v;
  int64_t j0, bn;
};

// Queries i0 .. i0 + n of head h as columns c0 .. c0 + round_up(n, 8) of tile t's [dp x cols] Q^T, with their
// key ranges (and ALiBi); the padding columns are zero queries that see no key. rows: scratch
// [round_up(n, 8) x dp].
void pack_queries(const Params& p, int b, const Sequence& s, int h, int64_t i0, int64_t n, int64_t dp, float* rows,
                  const QueryTile& t, int64_t c0) {
  const int64_t np = round_up(n, 8);
  const ColumnRanges& ranges = t.ranges;
  for (int64_t i = 0; i < np; ++i) {
    if (p.alibi_slopes) set_column_alibi(p, b, s, h, i < n ? i0 + i : -1, t.alibi, c0 + i);
    if (i < n) {
      load_row_f32(cpu::row_ptr(p.q, p.dtype, b * p.q_batch_stride, s.q0 + i0 + i, p.q_row_stride, h, p.q_head_stride),
                   p.dtype, p.head_dim, dp, rows + i * dp);
      const cpu::KeyRange keys = cpu::visible_keys(p, s, i0 + i);
      ranges.first[c0 + i] = int32_t(keys.first);
      ranges.last[c0 + i] = int32_t(keys.last);
    } else {
      std::memset(rows + i * dp, 0, size_t(dp) * 4);
      ranges.first[c0 + i] = ranges.last[c0 + i] = 0;
    }
  }
  transpose_into(rows, np, dp, const_cast<float*>(t.qt), t.cols, c0);
}

void init_state(const QueryTile& t, int64_t dp) {
  for (int64_t c = 0; c < t.cols; ++c) {
    t.m[c] = -__builtin_inff();
    t.l[c] = 0.f;
  }
  std::memset(t.o, 0, size_t(t.cols * dp) * 4);
}

// The columns among c .. c + 8 that hold a NaN score in the block (all-ones lanes).
__m256 nan_columns(const float* s, int64_t bn, int64_t cols, int64_t c) {
  __m256 nan = _mm256_setzero_ps();
  for (int64_t j = 0; j < bn; ++j) {
    const __m256 x = _mm256_loadu_ps(s + j * cols + c);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  return nan;
}

// The online softmax over one block of scores s[bn x cols] (log2 units): new max, alpha = 2^(m_old - m_new),
// s <- P = 2^(s - m_new), l <- alpha l + rowsum(P). A column that has seen no visible key yet keeps
// m = -inf and gets P = 0 (its exponents are taken against 0 instead of -inf). NaN follows shared_softmax.h
// without a test per score: the max skips NaN scores but keeps a NaN max, a NaN score's P is NaN, and a
// column whose block sum comes out NaN under a max below +inf gets m = NaN. Only under a +inf max, where
// +inf scores give NaN P too, are the column's scores searched for NaN.
void online_softmax(const QueryTile& t, float* s, int64_t bn) {
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff()), pinf = _mm256_set1_ps(__builtin_inff());
  for (int64_t c = 0; c < t.cols; c += 8) {
    const __m256 m_old = _mm256_loadu_ps(t.m + c);
    __m256 mx0 = m_old, mx1 = ninf;
    int64_t j = 0;
    // max_ps returns its second operand when either is NaN: the score goes first.
    for (; j + 2 <= bn; j += 2) {
      mx0 = _mm256_max_ps(_mm256_loadu_ps(s + j * t.cols + c), mx0);
      mx1 = _mm256_max_ps(_mm256_loadu_ps(s + (j + 1) * t.cols + c), mx1);
    }
    if (j < bn) mx0 = _mm256_max_ps(_mm256_loadu_ps(s + j * t.cols + c), mx0);
    __m256 mx = _mm256_max_ps(mx1, mx0);
    const __m256 inf_max = _mm256_cmp_ps(mx, pinf, _CMP_EQ_OQ);
    if (!_mm256_testz_ps(inf_max, inf_max))  // or-ing all-ones makes a NaN
      mx = _mm256_or_ps(mx, _mm256_and_ps(inf_max, nan_columns(s, bn, t.cols, c)));
    const __m256 m_use = _mm256_andnot_ps(_mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ), mx);  // -inf -> 0
    const __m256 alpha = exp2_ps(_mm256_sub_ps(m_old, m_use));
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    for (j = 0; j + 2 <= bn; j += 2) {
      float* s0 = s + j * t.cols + c;
      float* s1 = s0 + t.cols;
      const __m256 p0 = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(s0), m_use));
      const __m256 p1 = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(s1), m_use));
      _mm256_storeu_ps(s0, p0);
      _mm256_storeu_ps(s1, p1);
      sum0 = _mm256_add_ps(sum0, p0);
      sum1 = _mm256_add_ps(sum1, p1);
    }
    if (j < bn) {
      float* s0 = s + j * t.cols + c;
      const __m256 p0 = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(s0), m_use));
      _mm256_storeu_ps(s0, p0);
      sum0 = _mm256_add_ps(sum0, p0);
    }
    const __m256 sum = _mm256_add_ps(sum0, sum1);
    mx = _mm256_or_ps(mx, _mm256_andnot_ps(inf_max, _mm256_cmp_ps(sum, sum, _CMP_UNORD_Q)));  // a NaN score
    _mm256_storeu_ps(t.l + c, _mm256_fmadd_ps(_mm256_loadu_ps(t.l + c), alpha, sum));
    _mm256_storeu_ps(t.m + c, mx);
    _mm256_storeu_ps(t.alpha + c, alpha);
  }
}

// Whether n floats (a multiple of 8) are all finite: x - x is +0 for them and NaN for inf and NaN.
bool all_finite(const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_or_ps(acc, _mm256_sub_ps(v, v));
  }
  return _mm256_testz_si256(_mm256_castps_si256(acc), _mm256_castps_si256(acc));  // every bit, not only signs
}

// O = alpha O + P . V for a masked block whose V holds an inf or NaN, column by column over the keys each
// column sees: the GEMM would multiply a hidden key's P = 0 by it and poison columns that never see it.
void accumulate_visible(const QueryTile& t, const KvBlock& kv, int64_t dp, const float* s) {
  for (int64_t c = 0; c < t.cols; ++c) {
    float* o = t.o + c * dp;
    const __m256 alpha = _mm256_set1_ps(t.alpha[c]);
    for (int64_t d = 0; d < dp; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(alpha, _mm256_loadu_ps(o + d)));
    const int64_t j1 = min64(t.ranges.last[c] - kv.j0, kv.bn);
    for (int64_t j = max64(t.ranges.first[c] - kv.j0, 0); j < j1; ++j) {
      const __m256 pj = _mm256_set1_ps(s[j * t.cols + c]);
      const float* v = kv.v + j * dp;
      for (int64_t d = 0; d < dp; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + d), _mm256_loadu_ps(o + d)));
    }
  }
}

// P^T[bn x cols] (in s) times the dropout factors of its rows' keys kv.j0 ...: the same draw as the scalar
// kernel's, one column (query row) at a time.
void apply_dropout(const Params& p, const QueryTile& t, const KvBlock& kv, float* s) {
  float f[kBlockN];
  for (int64_t c = 0; c < t.cols; ++c) {
    if (c % t.np >= t.n) continue;  // a padding column: P is 0
    dropout::row_factors(p.rng, t.b, t.h0 + int(c / t.np), t.i0 + c % t.np, kv.j0, kv.j0 + kv.bn, f);
    for (int64_t j = 0; j < kv.bn; ++j) s[j * t.cols + c] *= f[j];
  }
}

// Folds one K/V block into a query tile. s: scratch [kBlockN x cols] (and as much again with softcap).
void block_step(const Params& p, const QueryTile& t, const KvBlock& kv, int64_t dp, float* s) {
  const bool mask = kv.j0 < t.first_max || kv.j0 + kv.bn > t.last_min;
  scores(p, kv.k, dp, kv.bn, t.qt, t.cols, mask, t.ranges, kv.j0, s, s + kBlockN * t.cols);
  if (p.alibi_slopes) add_alibi(s, kv.bn, t.cols, kv.j0, t.alibi);
  online_softmax(t, s, kv.bn);
  if (p.dropout()) apply_dropout(p, t, kv, s);
  if (mask && !all_finite(kv.v, kv.bn * dp)) {
    accumulate_visible(t, kv, dp, s);
    return;
  }
  RescaleAccumulateEpi epi{t.o, dp, t.alpha};
  gemm(AView<true>{s, t.cols}, kv.v, dp, kv.bn, t.cols, dp, epi);
}

// out = o / l and lse = m ln2 + ln l for query column c (row i of head h), as shared_softmax.h rules; 0 and
// +inf for a row that sees no key.
void finish_column(const Params& p, const QueryTile& t, int64_t c, int64_t dp, int b, const Sequence& s, int h,
                   int64_t i) {
  void* out = cpu::row_ptr(p.out, p.dtype, b * p.o_batch_stride, s.q0 + i, p.o_row_stride, h, p.o_head_stride);
  float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + s.q0 + i;
  const bool seen = t.ranges.first[c] < t.ranges.last[c];  // o is 0 otherwise, and 0 * 0 keeps it so
  store_row_scaled(t.o + c * dp, softmax::out_scale(seen, t.l[c]), p.head_dim, out, p.dtype);
  *lse = softmax::row_lse(seen, t.m[c], t.m[c] * kLn2 + __builtin_logf(t.l[c]));
}

int64_t query_tile_floats(int64_t cols, int64_t dp) { return 2 * round_up(cols * dp, 16) + 7 * round_up(cols, 16); }

QueryTile carve_query_tile(Carver& c, int64_t cols, int64_t dp) {
  QueryTile t;
  t.qt = c.take(dp * cols);
  t.cols = cols;
  t.o = c.take(cols * dp);
  t.m = c.take(cols);
  t.l = c.take(cols);
  t.alpha = c.take(cols);
  t.ranges.first = reinterpret_cast<int32_t*>(c.take(cols));
  t.ranges.last = reinterpret_cast<int32_t*>(c.take(cols));
  t.alibi.slope2 = c.take(cols);
  t.alibi.diag = c.take(cols);
  return t;
}

// v2: the query blocks qb = chunk, chunk + nchunks, ... (last first) of every head sharing K/V head kvh.
// The keys those blocks see are packed once, then each block walks them.
void forward_v2_task(const Params& p, int b, int kvh, int64_t chunk, int64_t nchunks, int64_t bm, Scratch& scratch) {
  const Sequence s = cpu::sequence(p, b);
  const int64_t nqb = (s.sq + bm - 1) / bm;
  if (chunk >= nqb) return;
  const int G = p.group();
  const int64_t dp = round_up(p.head_dim, 8), cols = G * round_up(min64(bm, s.sq), 8);
  const int64_t last_qb = chunk + (nqb - 1 - chunk) / nchunks * nchunks;
  const cpu::KeyRange keys = cpu::visible_keys(p, s, chunk * bm, min64(s.sq, (last_qb + 1) * bm));
  const int64_t nk = max64(0, keys.last - keys.first);
  const int64_t s_floats = kBlockN * cols * (p.softcap > 0.f ? 2 : 1);
  Carver c{scratch.get(query_tile_floats(cols, dp) + 2 * round_up(nk * dp, 16) + round_up(bm, 8) * dp + s_floats + 64)};
  QueryTile t = carve_query_tile(c, cols, dp);
  float* k = c.take(nk * dp);
  float* v = c.take(nk * dp);
  float* rows = c.take(round_up(bm, 8) * dp);
  float* sbuf = c.take(s_floats);
  pack_kv(p, b, s, kvh, keys.first, nk, dp, k, v);
  for (int64_t qb = last_qb; qb >= chunk; qb -= nchunks) {
    const int64_t i0 = qb * bm, n = min64(s.sq, i0 + bm) - i0, np = round_up(n, 8);
    t.cols = G * np;
    for (int g = 0; g < G; ++g)
      pack_queries(p, b, s, kvh * G + g, i0, n, dp, rows, t, g * np);
    init_state(t, dp);
    t.b = b, t.h0 = kvh * G, t.i0 = i0, t.np = np, t.n = n;
    const cpu::KeyRange mine = cpu::visible_keys(p, s, i0, i0 + n);
    t.first_max = cpu::visible_keys(p, s, i0 + n - 1).first;
    t.last_min = cpu::visible_keys(p, s, i0).last;
    for (int64_t j0 = mine.first; j0 < mine.last; j0 += kBlockN) {
      const int64_t off = (j0 - keys.first) * dp;
      block_step(p, t, KvBlock{k + off, v + off, j0, min64(kBlockN, mine.last - j0)}, dp, sbuf);
    }
    for (int g = 0; g < G; ++g)
      for (int64_t i = 0; i < n; ++i) finish_column(p, t, g * np + i, dp, b, s, kvh * G + g, i0 + i);
  }
}

// v1: head h of sequence b; K/V blocks outer, query blocks inner.
void forward_v1_task(const Params& p, int b, int h, Scratch& scratch) {
  const Sequence s = cpu::sequence(p, b);
  if (s.sq <= 0) return;
  const int64_t dp = round_up(p.head_dim, 8), bm = kBlockM;
  const int64_t nqb = (s.sq + bm - 1) / bm;
  const int64_t s_floats = kBlockN * bm * (p.softcap > 0.f ? 2 : 1);
  Carver c{scratch.get(nqb * (query_tile_floats(bm, dp) + int64_t(sizeof(QueryTile) / 4) + 32) +
                       2 * kBlockN * dp + bm * dp + s_floats + 64)};
  float* k = c.take(kBlockN * dp);
  float* v = c.take(kBlockN * dp);
  float* rows = c.take(bm * dp);
  float* sbuf = c.take(s_floats);
  // One query tile per block of kBlockM rows (the last one narrower), all kept for the whole pass.
  QueryTile* tiles = reinterpret_cast<QueryTile*>(c.take(nqb * int64_t(sizeof(QueryTile) / 4 + 1)));
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t i0 = qb * bm, n = min64(s.sq, i0 + bm) - i0;
    QueryTile& t = tiles[qb];
    t = carve_query_tile(c, round_up(n, 8), dp);
    pack_queries(p, b, s, h, i0, n, dp, rows, t, 0);
    init_state(t, dp);
    t.b = b, t.h0 = h, t.i0 = i0, t.np = t.cols, t.n = n;
    t.first_max = cpu::visible_keys(p, s, i0 + n - 1).first;
    t.last_min = cpu::visible_keys(p, s, i0).last;
  }
  const cpu::KeyRange all = cpu::visible_keys(p, s, 0, s.sq);
  for (int64_t j0 = all.first / kBlockN * kBlockN; j0 < all.last; j0 += kBlockN) {
    const int64_t bn = min64(kBlockN, all.last - j0);
    pack_kv(p, b, s, h / p.group(), j0, bn, dp, k, v);
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t i0 = qb * bm, i1 = min64(s.sq, i0 + bm);
      const cpu::KeyRange keys = cpu::visible_keys(p, s, i0, i1);
      if (keys.first >= keys.last || keys.last <= j0 || keys.first >= j0 + bn) continue;
      block_step(p, tiles[qb], KvBlock{k, v, j0, bn}, dp, sbuf);
    }
  }
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t i0 = qb * bm, n = min64(s.sq, i0 + bm) - i0;
    for (int64_t i = 0; i < n; ++i) finish_column(p, tiles[qb], i, dp, b, s, h, i0 + i);
  }
}

}  // namespace

bool FLASHLM_ATTENTION_ENTRY(forward)(const Params& p) {
  if (p.version == 1) {
    parallel_for(int64_t(p.batch) * p.heads, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t t = begin; t < end; ++t) forward_v1_task(p, int(t / p.heads), int(t % p.heads), scratch);
    });
    return true;
  }
  const int G = p.group();
  const int64_t bm = max64(8, min64(kBlockM, kMaxColumns / G / 8 * 8));
  const int64_t nqb = (p.seqlen_q + bm - 1) / bm;  // of the longest sequence
  // Enough tasks for the pool's 4 ranges per thread; each (batch, K/V head) is split into chunks that take
  // every nchunks-th query block, so under a causal mask every chunk gets as many long blocks as short ones.
  const int64_t pairs = int64_t(p.batch) * p.kv_heads;
  const int64_t nchunks = max64(1, min64(nqb, (4 * int64_t(num_threads()) + pairs - 1) / pairs));
  parallel_for(pairs * nchunks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t t = begin; t < end; ++t)
      forward_v2_task(p, int(t / (p.kv_heads * nchunks)), int(t / nchunks % p.kv_heads), t % nchunks, nchunks, bm,
                      scratch);
  });
  return true;
}

}  // namespace flashlm::attention
