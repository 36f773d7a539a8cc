// How a row of the online softmax ends, the same in every attention kernel (flash and paged; scalar, AVX2 and
// CUDA) so that NaN and inf come out as from softmax(s) . V in float64 (tests/reference.py):
//   * a NaN score (a NaN in q, or in a key the row sees) makes out and lse NaN;
//   * a +inf score without a NaN one makes out NaN (e^(inf - inf)) and lse +inf;
//   * a row whose visible scores are all -inf gets out NaN (0 / 0) and lse -inf;
//   * a NaN or inf in a visible V row reaches out in its column, even at probability 0 (0 * NaN is NaN);
//   * keys a row does not see never reach it, whatever they hold; a row that sees none gets out 0, lse +inf.
// The kernels keep a running max m that a NaN score makes NaN for good (max_nan, or an equivalent checked
// once per block), exponentiate against base(m), and end a row with out_scale and row_lse; a split of a row
// (flash-decoding) ends with part_scale and row_lse(true, ...), and the merge of the splits is the same
// softmax over their lse. Plain __host__ __device__ functions, with internal linkage: the AVX2 kernels include
// them too, and a copy compiled with AVX2 flags must never serve other callers (see core/avx2.h).
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define FLASHLM_SOFTMAX_HD __host__ __device__ __forceinline__
#else
#define FLASHLM_SOFTMAX_HD inline
#endif

namespace flashlm::attention::softmax {
namespace {

// The larger of a running max m and a score s, NaN if either is: a row's max stays NaN once it is.
FLASHLM_SOFTMAX_HD float max_nan(float m, float s) { return (s > m || s != s) ? s : m; }

// What scores are exponentiated against: the running max, or 0 while it is -inf (no key yet, or only -inf
// scores), so that -inf - -inf never makes a NaN.
FLASHLM_SOFTMAX_HD float base(float m) { return m == -INFINITY ? 0.f : m; }

// The factor of a row's accumulated output, given whether the row sees any key and its sum l: 1 / l, which
// l = 0 (only -inf scores) makes inf, and so out NaN; 0 for a row that sees no key (its output is 0).
FLASHLM_SOFTMAX_HD float out_scale(bool seen, float l) { return seen ? 1.f / l : 0.f; }

// A row's lse from its max m and lse = m + log l (natural units): NaN after a NaN score and -inf when every
// score was -inf (both follow), +inf after a +inf score (where m + log l is NaN) or when the row sees no key.
FLASHLM_SOFTMAX_HD float row_lse(bool seen, float m, float lse) { return !seen || m == INFINITY ? INFINITY : lse; }

// A split's output factor: 0 where l = 0 (no key, or only -inf scores), so that the split's output is 0 (NaN
// where a V row it sees is) and its lse, row_lse(true, ...), is -inf: the merge's identity.
FLASHLM_SOFTMAX_HD float part_scale(float l) { return l == 0.f ? 0.f : 1.f / l; }

// The lse the backward pass recomputes P = exp(s - lse) from, given delta = rowsum(dout * out): a row that
// has out NaN under lse = +inf had a +inf score, and softmax gives all its probabilities NaN; so does NaN.
FLASHLM_SOFTMAX_HD float backward_lse(float lse, float delta) { return lse == INFINITY && delta != delta ? NAN : lse; }

}  // namespace
}  // namespace flashlm::attention::softmax
