// AVX2 chunked loss kernels: the scalar kernels (chunked_loss_scalar.cpp) 8 columns per instruction, with
// attention's exp2 (max relative error ~1 ulp) and f32 sums in 8 lanes, so they agree with the scalar kernels
// to f32 rounding, not bit for bit. The ragged tail of a row runs element by element. Compiled with -mavx2
// -mfma -mf16c, called after the run-time CPU check.
#include <immintrin.h>

#include <cstdint>

#include "../attention/shared_avx2.h"
#include "../core/avx2.h"
#include "chunked_loss_kernels.h"

namespace flashlm::loss::detail {
namespace {

using attention::avx2::exp2_ps;
using attention::avx2::hsum;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_inff();
// The folds take a row in tiles of this many columns, each read twice (its max, then its exponentials) while
// it is in L1 (16 KiB of logits, 32 KiB with the teacher's): a whole row at vocab 152k is 594 KiB (1.2 MiB with
// the teacher), past L2 on this CPU, and its second read came from L3.
constexpr int64_t kTile = 4096;

FLASHLM_AVX2_INLINE float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// max over the row of scale * x (a NaN shows up later, in the sum).
FLASHLM_AVX2_INLINE float row_max(const float* x, int64_t n, float scale) {
  const __m256 vs = _mm256_set1_ps(scale);
  __m256 m = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_mul_ps(vs, _mm256_loadu_ps(x + j)));
  float r = hmax(m);
  for (; j < n; ++j) r = scale * x[j] > r ? scale * x[j] : r;
  return r;
}

// exp(v - m) for 8 lanes, 0 everywhere when m = -inf.
FLASHLM_AVX2_INLINE __m256 exp8_from(__m256 v, float m) {
  if (m == kNegInf) return _mm256_setzero_ps();
  return exp2_ps(_mm256_mul_ps(_mm256_sub_ps(v, _mm256_set1_ps(m)), _mm256_set1_ps(kLog2e)));
}

FLASHLM_AVX2_INLINE void store(float* g, int64_t j, __m256 v, bool accumulate) {
  if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(g + j));
  _mm256_storeu_ps(g + j, v);
}

}  // namespace

void logsumexp_avx2(const ChunkArgs& a, int64_t begin, int64_t end) {
  const __m256 vs = _mm256_set1_ps(a.scale);
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t c0 = 0; c0 < a.cols; c0 += kTile) {
      const float* x = a.logits + r * a.logits_stride + c0;
      const int64_t n = a.cols - c0 < kTile ? a.cols - c0 : kTile;
      const float m = row_max(x, n, a.scale);
      __m256 s = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) s = _mm256_add_ps(s, exp8_from(_mm256_mul_ps(vs, _mm256_loadu_ps(x + j)), m));
      float sum = hsum(s);
      for (; j < n; ++j) sum += exp_from(a.scale * x[j], m);
      fold_lse(a.state + r * kLseState, m, sum);
    }
  }
}

void softmax_grad_avx2(const ChunkArgs& a, int64_t begin, int64_t end) {
  const __m256 vs = _mm256_set1_ps(a.scale);
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.logits + r * a.logits_stride;
    float* g = a.dlogits + r * a.dlogits_stride;
    const float lse = a.stats[r], c = a.coef[r];
    const __m256 vc = _mm256_set1_ps(c);
    const bool zero = c == 0.0f;
    int64_t j = 0;
    for (; j + 8 <= a.cols; j += 8) {
      const __m256 x8 = _mm256_mul_ps(vs, _mm256_loadu_ps(x + j));
      const __m256 v = zero ? _mm256_setzero_ps() : _mm256_mul_ps(vc, exp8_from(x8, lse));
      store(g, j, v, a.accumulate);
    }
    for (; j < a.cols; ++j) {
      const float v = softmax_grad_element(x[j], a.scale, lse, c);
      g[j] = a.accumulate ? g[j] + v : v;
    }
  }
}

void kl_avx2(const ChunkArgs& a, int64_t begin, int64_t end) {
  const __m256 vs = _mm256_set1_ps(a.scale);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t c0 = 0; c0 < a.cols; c0 += kTile) {
      const float* x = a.logits + r * a.logits_stride + c0;
      const float* t = a.teacher + r * a.teacher_stride + c0;
      const int64_t n = a.cols - c0 < kTile ? a.cols - c0 : kTile;
      float chunk[kKLState];
      chunk[0] = row_max(x, n, a.scale);
      chunk[2] = row_max(t, n, a.scale);
      __m256 ss = zero, st = zero, acc = zero;
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        const __m256 s = _mm256_mul_ps(vs, _mm256_loadu_ps(x + j)), u = _mm256_mul_ps(vs, _mm256_loadu_ps(t + j));
        const __m256 es = exp8_from(s, chunk[0]), et = exp8_from(u, chunk[2]);
        ss = _mm256_add_ps(ss, es);
        st = _mm256_add_ps(st, et);
        const __m256 e = a.reverse ? es : et;
        const __m256 d = a.reverse ? _mm256_sub_ps(s, u) : _mm256_sub_ps(u, s);
        // Terms of zero probability count as 0 (their difference may be infinite); NaN != 0 keeps a NaN.
        const __m256 live = _mm256_cmp_ps(e, zero, _CMP_NEQ_UQ);
        acc = _mm256_add_ps(acc, _mm256_and_ps(live, _mm256_mul_ps(e, d)));
      }
      float sum_s = hsum(ss), sum_t = hsum(st), sum_acc = hsum(acc);
      for (; j < n; ++j) kl_add(a.scale * x[j], a.scale * t[j], chunk, a.reverse, sum_s, sum_t, sum_acc);
      chunk[1] = sum_s, chunk[3] = sum_t, chunk[4] = sum_acc;
      fold_kl(a.state + r * kKLState, chunk, a.reverse);
    }
  }
}

void kl_grad_avx2(const ChunkArgs& a, int64_t begin, int64_t end) {
  const __m256 vs = _mm256_set1_ps(a.scale);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.logits + r * a.logits_stride;
    const float* t = a.teacher + r * a.teacher_stride;
    float* g = a.dlogits + r * a.dlogits_stride;
    const float* st = a.stats + r * kKLStats;
    const float c = a.coef[r];
    const __m256 vc = _mm256_set1_ps(c), mean = _mm256_set1_ps(st[2]);
    // The hard term (distill_chunk_grad): hc * exp(x - hl), x unscaled.
    const float hc = a.hard_coef == nullptr ? 0.0f : a.hard_coef[r];
    const float hl = a.hard_coef == nullptr ? 0.0f : a.hard_lse[r];
    const __m256 vhc = _mm256_set1_ps(hc);
    int64_t j = 0;
    for (; j + 8 <= a.cols; j += 8) {
      __m256 v = zero;
      const __m256 x8 = _mm256_loadu_ps(x + j);
      if (c != 0.0f) {
        const __m256 s = _mm256_mul_ps(vs, x8), u = _mm256_mul_ps(vs, _mm256_loadu_ps(t + j));
        const __m256 ps = exp8_from(s, st[0]);
        if (a.reverse) {
          const __m256 live = _mm256_cmp_ps(ps, zero, _CMP_NEQ_UQ);
          v = _mm256_and_ps(live, _mm256_mul_ps(_mm256_mul_ps(vc, ps), _mm256_sub_ps(_mm256_sub_ps(s, u), mean)));
        } else {
          v = _mm256_mul_ps(vc, _mm256_sub_ps(ps, exp8_from(u, st[1])));
        }
      }
      if (hc != 0.0f) v = _mm256_fmadd_ps(vhc, exp8_from(x8, hl), v);
      store(g, j, v, a.accumulate);
    }
    for (; j < a.cols; ++j) {
      const float v = distill_grad_element(x[j], a.scale, t[j], st, c, a.reverse, a.hard_lse, a.hard_coef, r);
      g[j] = a.accumulate ? g[j] + v : v;
    }
  }
}

}  // namespace flashlm::loss::detail
