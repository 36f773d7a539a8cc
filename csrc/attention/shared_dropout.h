// Attention dropout from a counter-based generator (Philox4x32-10, Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011; the generator flash-attn and torch's CUDA dropout use), so that whether element
// (b, h, row, col) of P is kept depends only on (seed, offset, b, h, row, col): every kernel (scalar, AVX2,
// CUDA) and every pass (forward, backward) draws the same mask without storing it, in any order.
//
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (col / 4, row, low and high 32 bits of offset + b * heads + h)
//   element (b, h, row, col) is kept when word col % 4 of philox(counter, key) < keep_below,
// keep_below = round((1 - p) * 2^32). Rows and columns are a sequence's own (0 for its first query and key, in
// packed batches too). A call draws batch * heads consecutive offsets; flashlm.ops advances the generator's
// offset by that many, as flash-attn advances torch's.
// Plain __host__ __device__ functions with internal linkage: the AVX2 kernels include them too (core/avx2.h);
// the structs are plain data, at namespace scope so that Params can hold an Rng.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FLASHLM_DROPOUT_HD __host__ __device__ __forceinline__
#else
#define FLASHLM_DROPOUT_HD inline
#endif

namespace flashlm::attention::dropout {

struct Words {
  uint32_t w[4];
};

// What one call's mask depends on. keep_below = 2^32 keeps everything (p = 0).
struct Rng {
  uint64_t seed = 0, offset = 0;
  uint64_t keep_below = uint64_t(1) << 32;
  float scale = 1.f;  // 1 / (1 - p), the factor of a kept probability
  int heads = 1;
};

namespace {

// Philox4x32 with 10 rounds: the 128-bit counter c under the 64-bit key (k0, k1).
FLASHLM_DROPOUT_HD Words philox4x32_10(Words c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c.w[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c.w[2];
    c = Words{{uint32_t(p1 >> 32) ^ c.w[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c.w[3] ^ k1, uint32_t(p0)}};
    k0 += 0x9E3779B9u;  // the Weyl sequence of the key schedule
    k1 += 0xBB67AE85u;
  }
  return c;
}

// keep_below for a dropout probability p in [0, 1), computed once by the dispatcher in double precision.
inline uint64_t keep_below(double p) { return uint64_t(std::llround((1.0 - p) * 4294967296.0)); }

// The random words of columns 4 g .. 4 g + 3 of row `row` of head h of sequence b.
FLASHLM_DROPOUT_HD Words group_words(const Rng& r, int b, int h, int64_t row, int64_t g) {
  const uint64_t sub = r.offset + uint64_t(b) * uint64_t(r.heads) + uint64_t(h);
  return philox4x32_10(Words{{uint32_t(g), uint32_t(row), uint32_t(sub), uint32_t(sub >> 32)}}, uint32_t(r.seed),
                       uint32_t(r.seed >> 32));
}

// Word i % 4 of w, picked without a run-time index (which would put w in local memory on a GPU).
FLASHLM_DROPOUT_HD uint32_t word(const Words& w, int64_t i) {
  const int k = int(i & 3);
  return k == 0 ? w.w[0] : k == 1 ? w.w[1] : k == 2 ? w.w[2] : w.w[3];
}

FLASHLM_DROPOUT_HD bool keep(const Rng& r, int b, int h, int64_t row, int64_t col) {
  return word(group_words(r, b, h, row, col >> 2), col) < r.keep_below;
}

// The factor of P's element (b, h, row, col): scale where kept, 0 where dropped.
FLASHLM_DROPOUT_HD float factor(const Rng& r, int b, int h, int64_t row, int64_t col) {
  return keep(r, b, h, row, col) ? r.scale : 0.f;
}

// The factor of P for columns [j0, j1) of one row: out[j - j0] = scale where kept, 0 where dropped. One
// Philox call per four columns.
inline void row_factors(const Rng& r, int b, int h, int64_t row, int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1;) {
    const int64_t g = j >> 2;
    const Words w = group_words(r, b, h, row, g);
    for (; j < j1 && (j >> 2) == g; ++j) out[j - j0] = w.w[j & 3] < r.keep_below ? r.scale : 0.f;
  }
}

}  // namespace
}  // namespace flashlm::attention::dropout
