// AVX2/FMA paged attention. Computes what paged_attention_scalar.cpp (the reference) computes, in f32 with
// a different summation order.
//
// Decode (one query per sequence) is a pass over the context that memory bandwidth bounds. A task is one
// (sequence, K/V head, split) and takes the whole GQA group, so each K and V row is read from memory once
// for all G query heads. It walks its keys in chunks of kChunk tokens:
//   scores S[g][j] = q_g . k_j for the chunk (8 keys at a time, reduced with one horizontal-add tree), in
//   log2 units; online softmax per head (m, l, alpha); acc_g = alpha acc_g + sum_j P[g][j] v_j with acc_g
//   kept in registers 64 floats at a time while the chunk's V rows stay in L1.
// f32 rows (head_dim a multiple of 8) and bf16 rows (a multiple of 16, as even/odd pairs: bf16_pairs) are
// read in place; other head dims are converted into an f32 chunk buffer once. Reading bf16 in pairs
// instead of through the buffer: 12.7 ms against 15.4 of CPU time (one thread, B=8, context 2048, Hkv=8,
// D=128). The next chunk's rows are prefetched, since pages scatter them where no hardware prefetcher
// looks. With num_splits > 1 every split writes its normalised output and lse to scratch and a second pass
// merges them (flash-decoding).
//
// ALiBi: prefill passes the slopes to flash attention; decode with ALiBi is left to the scalar kernel.
//
// Prefill (cu_seqlens_q given): each sequence's context is gathered into contiguous K/V (one copy of the
// cache rows, in their dtype) and flash attention's forward (flashlm/attention/flash_attention.h, whose AVX2
// kernel is attention_avx2_forward.cpp) runs over it as a packed batch, with its query blocks, GQA grouping and causal/window block skipping. The
// copy reads the context once more; against a prefill's q_len x context work it is small.
#include <climits>
#include <memory>
#include <vector>

#include "../attention/shared_avx2.h"
#include "../attention/shared_softmax.h"
#include "flashlm/attention/flash_attention.h"
#include "flashlm/core/thread_pool.h"
#include "paged_cpu.h"
#include "paged_kernels.h"

namespace flashlm::kvcache {
namespace {

using namespace attention::avx2;
namespace softmax = attention::softmax;

constexpr int64_t kChunk = 16;     // keys per online-softmax step
constexpr int kMaxGroup = 64;      // query heads per K/V head the decode kernel keeps state for

// The 8 horizontal sums of a[0..8) in one vector, lane u = sum of a[u].
FLASHLM_AVX2_INLINE __m256 reduce8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // s0123 = [a0 a1 a2 a3 | a0 a1 a2 a3] halves (low 128: low halves' sums, high: high halves').
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

FLASHLM_AVX2_INLINE void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

// bf16 rows read in place, 16 elements (one 32-byte load) at a time: the 32-bit lane i holds elements
// 2i (low half) and 2i + 1 (high half), so a shift gives the even elements as f32 and a mask the odd ones.
// q and acc are kept in the same order (per 16 elements: 8 even, then 8 odd) and put back in order at the
// end, so no element is ever converted into a buffer.
FLASHLM_AVX2_INLINE void bf16_pairs(const float* row, int64_t d, __m256& even, __m256& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + d));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
}

// Between natural order and the pairs order of bf16_pairs, n floats (a multiple of 16) in place.
void to_pairs(float* x, int64_t n) {
  float tmp[16];
  for (int64_t d = 0; d < n; d += 16) {
    for (int i = 0; i < 8; ++i) tmp[i] = x[d + 2 * i], tmp[8 + i] = x[d + 2 * i + 1];
    std::memcpy(x + d, tmp, sizeof(tmp));
  }
}
void from_pairs(float* x, int64_t n) {
  for (int64_t d = 0; d < n; d += 16) {
    const __m256 e = _mm256_loadu_ps(x + d), o = _mm256_loadu_ps(x + d + 8);
    const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);
    _mm256_storeu_ps(x + d, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(x + d + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

struct DecodeTask {
  const PagedParams& p;
  int G;
  int64_t dp;       // head_dim rounded up to 8
  bool in_place;    // rows read where they are: f32 with head_dim % 8 == 0, bf16 with head_dim % 16 == 0
  bool pairs;       // in place and bf16 (bf16_pairs)
  const float* q;   // [G x dp], pre-scaled so that q.k is the score in log2 units (or tanh's argument)
  float* kbuf;      // [kChunk x dp] converted K rows (when !in_place)
  float* vbuf;      // [kChunk x dp]
  float* acc;       // [G x dp]
  float* sc;        // [G x kChunk] scores, then probabilities
  float m[kMaxGroup], l[kMaxGroup];
};

// The cache rows of keys j0 .. j0 + n (n <= kChunk) of sequence s at K/V head kvh, walking the block
// table once per block rather than dividing per token.
void raw_rows(const PagedParams& p, int s, int kvh, int64_t j0, int64_t n, const char** k, const char** v) {
  const int64_t es = cpu::elem_bytes(p.dtype);
  const int32_t* table = p.block_table + s * p.block_table_stride;
  int64_t b = j0 / p.block_size, off = j0 % p.block_size;
  for (int64_t j = 0; j < n; ++j) {
    k[j] = static_cast<const char*>(p.k_cache) +
           (table[b] * p.kc_block_stride + off * p.kc_row_stride + kvh * p.kc_head_stride) * es;
    v[j] = static_cast<const char*>(p.v_cache) +
           (table[b] * p.vc_block_stride + off * p.vc_row_stride + kvh * p.vc_head_stride) * es;
    if (++off == p.block_size) off = 0, ++b;
  }
}

// The next chunk's rows, fetched while this chunk is computed: pages scatter them (a K/V head's row is one
// piece of each token's kv_heads rows) where the hardware prefetchers, which stop at 4 KiB pages, do not
// look. Measured on one thread (B=8, context 2048, Hkv=8, D=128), with bf16 still converted through the
// buffer: bf16 4.8 GB/s with it, 3.7 without; f32 7.4 either way. K rows are requested 8 at a time between the score FMAs, V rows before the update.
struct Prefetch {
  const char* const* rows = nullptr;
  int64_t n = 0, row_bytes = 0;
  FLASHLM_AVX2_INLINE void rows_of(int64_t j0, int64_t count) const {
    for (int64_t j = j0; j < j0 + count && j < n; ++j) prefetch_row(rows[j], row_bytes);
  }
};

// f32 rows for the kernels: the cache rows in place, or converted into the chunk buffers; rows
// n .. round_up(n, 8) point at a zero row.
void chunk_rows(DecodeTask& t, const char* const* k, const char* const* v, int64_t n, const float** kr,
                const float** vr, const float* zero) {
  for (int64_t j = 0; j < n; ++j) {
    if (t.in_place) {
      kr[j] = reinterpret_cast<const float*>(k[j]), vr[j] = reinterpret_cast<const float*>(v[j]);
    } else {
      load_row_f32(k[j], t.p.dtype, t.p.head_dim, t.dp, t.kbuf + j * t.dp);
      load_row_f32(v[j], t.p.dtype, t.p.head_dim, t.dp, t.vbuf + j * t.dp);
      kr[j] = t.kbuf + j * t.dp, vr[j] = t.vbuf + j * t.dp;
    }
  }
  for (int64_t j = n; j < round_up(n, 8); ++j) kr[j] = vr[j] = zero;
}

// Scores of the chunk's keys for every head of the group, log2 units, -inf past n.
template <bool kPairs>
void chunk_scores(DecodeTask& t, const float* const* kr, int64_t n, const Prefetch& next) {
  const PagedParams& p = t.p;
  const bool cap = p.softcap > 0.f;
  const __m256 capv = _mm256_set1_ps(p.softcap * kLog2e);
  for (int g = 0; g < t.G; ++g) {
    const float* q = t.q + g * t.dp;
    for (int64_t j = 0; j < n; j += 8) {
      if (g == 0) next.rows_of(j, 8);
      __m256 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
      if constexpr (kPairs) {
        for (int64_t d = 0; d < t.dp; d += 16) {
          const __m256 qe = _mm256_loadu_ps(q + d), qo = _mm256_loadu_ps(q + d + 8);
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) {
            __m256 e, o;
            bf16_pairs(kr[j + u], d, e, o);
            a[u] = _mm256_fmadd_ps(qo, o, _mm256_fmadd_ps(qe, e, a[u]));
          }
        }
      } else {
        for (int64_t d = 0; d < t.dp; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[j + u] + d), a[u]);
        }
      }
      __m256 s = reduce8(a);
      if (cap) s = _mm256_mul_ps(tanh_ps(s), capv);
      if (j + 8 > n) {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(int(n - j - 1))));
        s = _mm256_blendv_ps(s, _mm256_set1_ps(-__builtin_inff()), hidden);
      }
      _mm256_storeu_ps(t.sc + g * kChunk + j, s);
    }
  }
}

// Online softmax of each head's chunk scores, then acc_g = alpha acc_g + P_g . V. NaN and inf follow
// shared_softmax.h, checked once per chunk rather than per score: the max skips NaN scores but keeps a NaN
// running max, a NaN score's P is NaN, and a NaN chunk sum under a max below +inf marks m NaN; under a +inf
// max (where a +inf score's P is NaN too) the scores are searched for NaN.
template <bool kPairs>
void chunk_update(DecodeTask& t, const float* const* vr, int64_t n, const Prefetch& next) {
  const int64_t np = round_up(n, 8);
  for (int g = 0; g < t.G; ++g) {
    float* sc = t.sc + g * kChunk;
    __m256 mx = _mm256_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < np; j += 8) mx = _mm256_max_ps(_mm256_loadu_ps(sc + j), mx);  // NaN scores skipped
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float chunk_max = _mm_cvtss_f32(m4);
    float m_new = chunk_max > t.m[g] ? chunk_max : t.m[g];  // a NaN m stays
    if (m_new == __builtin_inff()) {
      for (int64_t j = 0; j < n; ++j) m_new = sc[j] != sc[j] ? sc[j] : m_new;
    }
    const float base = softmax::base(m_new);
    const float alpha = _mm256_cvtss_f32(exp2_ps(_mm256_set1_ps(t.m[g] - base)));
    const __m256 mv = _mm256_set1_ps(base);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < np; j += 8) {
      const __m256 pr = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mv));
      _mm256_storeu_ps(sc + j, pr);
      sum = _mm256_add_ps(sum, pr);
    }
    const float chunk_sum = hsum(sum);
    if (chunk_sum != chunk_sum && m_new != __builtin_inff()) m_new = chunk_sum;  // a NaN score: m is NaN
    t.l[g] = t.l[g] * alpha + chunk_sum;
    t.m[g] = m_new;
    if (g == 0) next.rows_of(0, kChunk);
    const __m256 av = _mm256_set1_ps(alpha);
    float* acc = t.acc + g * t.dp;
    int64_t d0 = 0;
    for (; d0 + 64 <= t.dp; d0 += 64) {  // 64 floats of acc_g in registers over the chunk
      __m256 o[8];
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) o[u] = _mm256_mul_ps(av, _mm256_loadu_ps(acc + d0 + 8 * u));
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_broadcast_ss(sc + j);
        if constexpr (kPairs) {
#pragma GCC unroll 4
          for (int u = 0; u < 8; u += 2) {
            __m256 e, od;
            bf16_pairs(vr[j], d0 + 8 * u, e, od);
            o[u] = _mm256_fmadd_ps(pj, e, o[u]);
            o[u + 1] = _mm256_fmadd_ps(pj, od, o[u + 1]);
          }
        } else {
          const float* v = vr[j] + d0;
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) o[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * u), o[u]);
        }
      }
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) _mm256_storeu_ps(acc + d0 + 8 * u, o[u]);
    }
    if constexpr (kPairs) {
      for (; d0 < t.dp; d0 += 16) {
        __m256 oe = _mm256_mul_ps(av, _mm256_loadu_ps(acc + d0)), oo = _mm256_mul_ps(av, _mm256_loadu_ps(acc + d0 + 8));
        for (int64_t j = 0; j < n; ++j) {
          __m256 e, od;
          bf16_pairs(vr[j], d0, e, od);
          const __m256 pj = _mm256_broadcast_ss(sc + j);
          oe = _mm256_fmadd_ps(pj, e, oe);
          oo = _mm256_fmadd_ps(pj, od, oo);
        }
        _mm256_storeu_ps(acc + d0, oe);
        _mm256_storeu_ps(acc + d0 + 8, oo);
      }
    } else {
      for (; d0 < t.dp; d0 += 8) {
        __m256 o = _mm256_mul_ps(av, _mm256_loadu_ps(acc + d0));
        for (int64_t j = 0; j < n; ++j)
          o = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + j), _mm256_loadu_ps(vr[j] + d0), o);
        _mm256_storeu_ps(acc + d0, o);
      }
    }
  }
}

// Where decode results go: the output row and lse directly (one split), or the split's slot of the
// partial buffers.
struct Partials {
  float* o = nullptr;    // [num_seqs * heads * splits x dp]
  float* lse = nullptr;  // [num_seqs * heads * splits]
};

void decode_task(const PagedParams& p, int s, int kvh, int part, const Partials& parts, Scratch& scratch) {
  const int G = p.group();
  const int64_t dp = round_up(p.head_dim, 8);
  Carver c{scratch.get(G * dp * 2 + 2 * kChunk * dp + G * kChunk + dp + 64 + 16 * 6)};
  float* q = c.take(G * dp);
  const bool pairs = p.dtype == DType::BF16 && p.head_dim % 16 == 0;
  DecodeTask t{p, G, dp, pairs || (p.dtype == DType::F32 && p.head_dim % 8 == 0), pairs, q, c.take(kChunk * dp),
               c.take(kChunk * dp), c.take(G * dp), c.take(G * kChunk), {}, {}};
  float* zero = c.take(dp);
  std::memset(zero, 0, size_t(dp) * 4);
  std::memset(t.acc, 0, size_t(G * dp) * 4);
  const cpu::Sequence seq = cpu::sequence(p, s);
  const float qmul = p.softcap > 0.f ? p.scale / p.softcap : p.scale * kLog2e;
  for (int g = 0; g < G; ++g) {
    load_row_f32(cpu::q_row(p, seq.q0, kvh * G + g), p.dtype, p.head_dim, dp, q + g * dp);
    for (int64_t d = 0; d < dp; ++d) q[g * dp + d] *= qmul;
    if (pairs) to_pairs(q + g * dp, dp);
    t.m[g] = -__builtin_inff(), t.l[g] = 0.f;
  }
  const cpu::KeyRange keys = cpu::split_range(cpu::visible_keys(p, seq, 0), part, p.num_splits);
  const float* kr[kChunk];
  const float* vr[kChunk];
  const char* raw[2][2][kChunk];  // [this / next chunk][K / V][key]
  const int64_t row_bytes = p.head_dim * cpu::elem_bytes(p.dtype);
  int cur = 0;
  raw_rows(p, s, kvh, keys.first, min64(kChunk, keys.last - keys.first), raw[cur][0], raw[cur][1]);
  for (int64_t j0 = keys.first; j0 < keys.last; j0 += kChunk, cur ^= 1) {
    const int64_t n = min64(kChunk, keys.last - j0), next = min64(kChunk, keys.last - j0 - kChunk);
    if (next > 0) raw_rows(p, s, kvh, j0 + kChunk, next, raw[cur ^ 1][0], raw[cur ^ 1][1]);
    chunk_rows(t, raw[cur][0], raw[cur][1], n, kr, vr, zero);
    const Prefetch next_k{raw[cur ^ 1][0], max64(next, 0), row_bytes}, next_v{raw[cur ^ 1][1], max64(next, 0), row_bytes};
    if (pairs) {
      chunk_scores<true>(t, kr, n, next_k);
      chunk_update<true>(t, vr, n, next_v);
    } else {
      chunk_scores<false>(t, kr, n, next_k);
      chunk_update<false>(t, vr, n, next_v);
    }
  }
  if (pairs) from_pairs(t.acc, G * dp);
  const bool seen = keys.first < keys.last;  // the row's keys, with one split
  for (int g = 0; g < G; ++g) {
    const int h = kvh * G + g;
    const float l = t.l[g], lse = t.m[g] * kLn2 + __builtin_logf(l);
    if (parts.o) {
      const float mul = softmax::part_scale(l);
      const int64_t slot = (int64_t(s) * p.heads + h) * p.num_splits + part;
      store_row_scaled(t.acc + g * dp, mul, dp, parts.o + slot * dp, DType::F32);
      parts.lse[slot] = softmax::row_lse(true, t.m[g], lse);
    } else {
      store_row_scaled(t.acc + g * dp, softmax::out_scale(seen, l), p.head_dim, cpu::out_row(p, seq.q0, h), p.dtype);
      if (p.lse) p.lse[int64_t(h) * p.num_tokens + seq.q0] = softmax::row_lse(seen, t.m[g], lse);
    }
  }
}

// Merges the splits of (s, h) by their lse into the output row: the softmax over the splits' lse, with
// shared_softmax.h's rules (no split skipped: one of weight 0 still passes on the NaN of a V row it saw); a
// row that sees no key gets out 0 and lse +inf.
void merge_task(const PagedParams& p, int s, int h, const Partials& parts, float* acc) {
  const int64_t dp = round_up(p.head_dim, 8), base_slot = (int64_t(s) * p.heads + h) * p.num_splits;
  const float* lse = parts.lse + base_slot;
  float m = -__builtin_inff();
  for (int i = 0; i < p.num_splits; ++i) m = softmax::max_nan(m, lse[i]);
  const float base = softmax::base(m);
  std::memset(acc, 0, size_t(dp) * 4);
  float sum = 0.f;
  for (int i = 0; i < p.num_splits; ++i) {
    const float w = _mm256_cvtss_f32(exp2_ps(_mm256_set1_ps((lse[i] - base) * kLog2e)));
    sum += w;
    const __m256 wv = _mm256_set1_ps(w);
    const float* o = parts.o + (base_slot + i) * dp;
    for (int64_t d = 0; d < dp; d += 8)
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(o + d), _mm256_loadu_ps(acc + d)));
  }
  const cpu::KeyRange keys = cpu::visible_keys(p, cpu::sequence(p, s), 0);
  const bool seen = keys.first < keys.last;  // else every split is empty: acc is 0
  store_row_scaled(acc, softmax::out_scale(seen, sum), p.head_dim, cpu::out_row(p, s, h), p.dtype);
  if (p.lse) p.lse[int64_t(h) * p.num_tokens + s] = softmax::row_lse(seen, m, base + __builtin_logf(sum));
}

void decode(const PagedParams& p) {
  const int splits = p.num_splits;
  std::vector<float> part_o, part_lse;
  Partials parts;
  if (splits > 1) {
    const int64_t slots = int64_t(p.num_seqs) * p.heads * splits;
    part_o.resize(size_t(slots * round_up(p.head_dim, 8)));
    part_lse.resize(size_t(slots));
    parts.o = part_o.data(), parts.lse = part_lse.data();
  }
  const int64_t tasks = int64_t(p.num_seqs) * p.kv_heads * splits;
  parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t t = begin; t < end; ++t)
      decode_task(p, int(t / (int64_t(p.kv_heads) * splits)), int(t / splits % p.kv_heads), int(t % splits), parts,
                  scratch);
  });
  if (splits == 1) return;
  parallel_for(int64_t(p.num_seqs) * p.heads, 4, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    float* acc = scratch.get(round_up(p.head_dim, 8));
    for (int64_t t = begin; t < end; ++t) merge_task(p, int(t / p.heads), int(t % p.heads), parts, acc);
  });
}

// Prefill: gathers every sequence's context into packed [total_k, kv_heads, head_dim] K and V and runs the
// attention forward kernel over them. Returns false where the packed batch would not fit int32 offsets.
bool prefill(const PagedParams& p) {
  std::vector<int32_t> cu_k(size_t(p.num_seqs) + 1, 0);
  int64_t total = 0, max_len = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    total += p.seq_lens[s];
    max_len = max64(max_len, p.seq_lens[s]);
    if (total > INT32_MAX) return false;
    cu_k[s + 1] = int32_t(total);
  }
  const int64_t es = cpu::elem_bytes(p.dtype), row = int64_t(p.kv_heads) * p.head_dim;
  // Not value-initialised: every byte is written by the gather.
  const std::unique_ptr<char[]> k(new char[size_t(max64(1, total * row * es))]);
  const std::unique_ptr<char[]> v(new char[size_t(max64(1, total * row * es))]);
  parallel_for(total, 64, [&](int64_t begin, int64_t end) {
    int s = 0;
    for (int64_t r = begin; r < end; ++r) {
      while (cu_k[s + 1] <= r) ++s;
      const int64_t t = r - cu_k[s];
      for (int h = 0; h < p.kv_heads; ++h) {
        std::memcpy(k.get() + (r * row + h * p.head_dim) * es, cpu::k_row(p, s, t, h), size_t(p.head_dim * es));
        std::memcpy(v.get() + (r * row + h * p.head_dim) * es, cpu::v_row(p, s, t, h), size_t(p.head_dim * es));
      }
    }
  });
  std::vector<float> lse_scratch(p.lse ? 0 : size_t(p.heads) * p.num_tokens);
  // The packed batch goes through flash attention's public entry point, which checks it and routes it to the
  // same AVX2 kernel (the ISA that chose this kernel chooses that one).
  AttentionForwardParams a;
  const auto rows = [&](const void* data, int64_t n, int heads, int64_t row_stride, int64_t head_stride) {
    TensorView t = TensorView::contiguous(const_cast<void*>(data), p.dtype, {n, heads, p.head_dim});
    t.strides[0] = row_stride, t.strides[1] = head_stride;
    return t;
  };
  a.q = rows(p.q, p.num_tokens, p.heads, p.q_row_stride, p.q_head_stride);
  a.k = TensorView::contiguous(k.get(), p.dtype, {total, p.kv_heads, p.head_dim});
  a.v = TensorView::contiguous(v.get(), p.dtype, {total, p.kv_heads, p.head_dim});
  a.out = rows(p.out, p.num_tokens, p.heads, p.o_row_stride, p.o_head_stride);
  a.lse = TensorView::contiguous(p.lse ? p.lse : lse_scratch.data(), DType::F32, {p.heads, p.num_tokens});
  a.cu_seqlens_q = TensorView::contiguous(const_cast<int32_t*>(p.cu_seqlens_q), DType::I32, {int64_t(p.num_seqs) + 1});
  a.cu_seqlens_k = TensorView::contiguous(cu_k.data(), DType::I32, {int64_t(p.num_seqs) + 1});
  a.max_seqlen_q = p.max_seqlen_q, a.max_seqlen_k = max_len;
  a.options.softmax_scale = p.scale, a.options.softcap = p.softcap;
  a.options.causal = p.causal, a.options.window_left = p.window_left, a.options.window_right = p.window_right;
  a.options.version = 2;
  if (p.alibi_slopes) {  // per sequence (batch) or one row, as flash attention takes them
    a.alibi_slopes = p.alibi_batch_stride
                         ? TensorView::contiguous(const_cast<float*>(p.alibi_slopes), DType::F32, {p.num_seqs, p.heads})
                         : TensorView::contiguous(const_cast<float*>(p.alibi_slopes), DType::F32, {p.heads});
  }
  flash_attention_forward(a);
  return true;
}

}  // namespace

bool paged_attention_avx2(const PagedParams& p) {
  if (p.decode()) {
    // ALiBi decode takes the scalar kernel: the bias would need each chunk's key positions here.
    if (p.group() > kMaxGroup || p.alibi_slopes) return false;
    decode(p);
    return true;
  }
  return prefill(p);
}

}  // namespace flashlm::kvcache
