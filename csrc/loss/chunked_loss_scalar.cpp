// Scalar chunked loss kernels: the reference the AVX2 kernels are tested against (tests/test_loss.py). Each
// row is read twice per step: once for its maximum, once for the exponentials; sums are taken in double.
#include <cmath>
#include <cstdint>
#include <limits>

#include "chunked_loss_kernels.h"

namespace flashlm::loss::detail {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float row_max(const float* x, int64_t n, float scale) {
  float m = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    const float v = scale * x[j];
    m = (v > m || std::isnan(v)) ? v : m;
    if (std::isnan(m)) return m;
  }
  return m;
}

}  // namespace

void logsumexp_scalar(const ChunkArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.logits + r * a.logits_stride;
    const float m = row_max(x, a.cols, a.scale);
    double s = 0;
    for (int64_t j = 0; j < a.cols; ++j) s += exp_from(a.scale * x[j], m);
    fold_lse(a.state + r * kLseState, m, float(s));
  }
}

void softmax_grad_scalar(const ChunkArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.logits + r * a.logits_stride;
    float* g = a.dlogits + r * a.dlogits_stride;
    const float lse = a.stats[r], c = a.coef[r];
    for (int64_t j = 0; j < a.cols; ++j) {
      const float v = softmax_grad_element(x[j], a.scale, lse, c);
      g[j] = a.accumulate ? g[j] + v : v;
    }
  }
}

void kl_scalar(const ChunkArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.logits + r * a.logits_stride;
    const float* t = a.teacher + r * a.teacher_stride;
    float chunk[kKLState];
    chunk[0] = row_max(x, a.cols, a.scale);
    chunk[2] = row_max(t, a.cols, a.scale);
    double ss = 0, st = 0, acc = 0;
    for (int64_t j = 0; j < a.cols; ++j) kl_add(a.scale * x[j], a.scale * t[j], chunk, a.reverse, ss, st, acc);
    chunk[1] = float(ss), chunk[3] = float(st), chunk[4] = float(acc);
    fold_kl(a.state + r * kKLState, chunk, a.reverse);
  }
}

void kl_grad_scalar(const ChunkArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.logits + r * a.logits_stride;
    const float* t = a.teacher + r * a.teacher_stride;
    float* g = a.dlogits + r * a.dlogits_stride;
    const float* st = a.stats + r * kKLStats;
    const float c = a.coef[r];
    for (int64_t j = 0; j < a.cols; ++j) {
      const float v = distill_grad_element(x[j], a.scale, t[j], st, c, a.reverse, a.hard_lse, a.hard_coef, r);
      g[j] = a.accumulate ? g[j] + v : v;
    }
  }
}

}  // namespace flashlm::loss::detail
