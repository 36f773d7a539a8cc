// AVX-512 kernels of the quantized linear layers' input gradient for a few rows of dy (M <= kFusedRows): the
// fused AVX2 kernels' arithmetic (backward_input_fused_avx2.cpp) 16 columns a vector, with every element of dx
// getting the same products added in the same order, so both give the same bits. Called only where the CPU
// has AVX-512F and BW and set_backward_input_avx512 allows it (backward_input.cpp).
//
// The loop differs: a chunk of dx's columns (a block, half a K-quant block, an int4 group) stays in registers
// while 4 weight rows are added to it, and the weight rows 8 ahead are prefetched (a thread reads only its
// columns of each row, too short a run for the hardware prefetcher).
//
// What makes them faster than twice the AVX2 width: a 4-bit value becomes a float by a lookup in a 16-entry
// table (vpermps), not by sign-extending and converting. vpermps reads only an index's low 4 bits, so the
// 16 bytes of 32 nibbles are widened once to 16 dwords: the low nibbles index the table as they are and the
// high ones after a shift, with no mask. The table holds q - 8 (Q4_0, symmetric int4) or the decoded weight
// itself, computed for the 16 values of q as the scalar decoder computes it for one (Q4_K: d1 * q - m1;
// asymmetric int4: (u - z) * s).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "../core/avx2.h"
#include "../gguf/shared_decoders.h"
#include "../gguf/shared_unpack_avx2.h"
#include "backward_input_kernels.h"
#include "flashlm/gguf/blocks.h"

namespace flashlm::gemm::detail {
namespace {

using gguf::detail::load16B;
using gguf::detail::load32B;
using gguf::detail::load_f16;

// 16V columns of M rows of dx, held in registers while a few weight rows are added to them.
template <int M, int V>
struct Tile {
  __m512 acc[M][V];
  float a[M];  // the current weight row's M values of dy

  FLASHLM_AVX2_INLINE void load(const float* dx, int64_t ldx) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < V; ++j) acc[i][j] = _mm512_loadu_ps(dx + i * ldx + 16 * j);
  }
  FLASHLM_AVX2_INLINE void store(float* dx, int64_t ldx) const {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < V; ++j) _mm512_storeu_ps(dx + i * ldx + 16 * j, acc[i][j]);
  }
  // Columns 16j .. 16j + 16 += (a[i] * s) * v: s a scale (1 for decoded weights).
  FLASHLM_AVX2_INLINE void add(int j, __m512 v, float s) {
    for (int i = 0; i < M; ++i) acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(a[i] * s), v, acc[i][j]);
  }
  // The same with the factors given: f[i][l] for dx row i.
  FLASHLM_AVX2_INLINE void add_times(int j, __m512 v, const float (*f)[16], int l) {
    for (int i = 0; i < M; ++i) acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(f[i][l]), v, acc[i][j]);
  }
};

// 16 bytes widened to 16 dwords (unsigned), the lookup's indices.
FLASHLM_AVX2_INLINE __m512i dwords(const uint8_t* p) { return _mm512_cvtepu8_epi32(load16B(p)); }

// 16 signed bytes as 16 floats.
FLASHLM_AVX2_INLINE __m512 floats16(__m128i x) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)); }

// Table entry q (of the index's low 4 bits).
FLASHLM_AVX2_INLINE __m512 lookup(__m512i index, __m512 table) { return _mm512_permutexvar_ps(index, table); }
FLASHLM_AVX2_INLINE __m512i high_nibbles(__m512i x) { return _mm512_srli_epi32(x, 4); }

// The 16 values of a nibble, 0 .. 15, and centred, q - 8.
FLASHLM_AVX2_INLINE __m512 nibble_values() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
FLASHLM_AVX2_INLINE __m512 centred_values() {
  return _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
}

// Each kind reads a chunk of kCols columns (kCols / 16 vectors, kChunkBytes bytes) of weight row r at column col
// into a tile.

// Q4_0 and Q8_0 blocks begin with their scale d (f16). A row's d of kRun consecutive blocks are gathered,
// converted and multiplied by dy's values together (factors), so a block's own work is its quants' lookups or
// conversions and the multiply-adds, each taking its factor as a broadcast from memory: per block, the f16
// load, conversion, product and broadcast cost as many vector instructions as the 32 weights' lookups.
struct ScaleFirst {
  static constexpr bool kFactors = true;
  // f[i][l] = a[i] * d of block l < count of the blocks `stride` bytes apart from p; at: l * stride.
  template <int M>
  FLASHLM_AVX2_INLINE static void factors(const uint8_t* p, __m512i at, int count, const float* a, float (*f)[16]) {
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    const __m512i h = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, p, 1);
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
    for (int i = 0; i < M; ++i) _mm512_store_ps(f[i], _mm512_mul_ps(_mm512_set1_ps(a[i]), d));
  }
};

// Q4_0: a block, 32 elements d * (q - 8); element j < 16 the low nibble of qs[j], j + 16 its high nibble.
struct Q4_0 : ScaleFirst {
  static constexpr int kCols = 32, kChunkBytes = sizeof(gguf::block_q4_0);
  template <int M>
  FLASHLM_AVX2_INLINE static void add(const BackwardWeight&, const uint8_t* b, int64_t, int64_t, Tile<M, 2>& t,
                                      const float (*f)[16], int l) {
    const __m512 centred = centred_values();
    const __m512i x = dwords(b + offsetof(gguf::block_q4_0, qs));
    t.add_times(0, lookup(x, centred), f, l);
    t.add_times(1, lookup(high_nibbles(x), centred), f, l);
  }
};

// Q8_0: a block, 32 elements d * q.
struct Q8_0 : ScaleFirst {
  static constexpr int kCols = 32, kChunkBytes = sizeof(gguf::block_q8_0);
  template <int M>
  FLASHLM_AVX2_INLINE static void add(const BackwardWeight&, const uint8_t* b, int64_t, int64_t, Tile<M, 2>& t,
                                      const float (*f)[16], int l) {
    const uint8_t* q = b + offsetof(gguf::block_q8_0, qs);
    t.add_times(0, floats16(load16B(q)), f, l);
    t.add_times(1, floats16(load16B(q + 16)), f, l);
  }
};

// The kinds below read their scales block by block.
struct ScaleWithin {
  static constexpr bool kFactors = false;
  template <int M>
  FLASHLM_AVX2_INLINE static void factors(const uint8_t*, __m512i, int, const float*, float (*)[16]) {}
};

// Q4_K: P of a block's 4 pairs of sub-blocks (8 sub-blocks of 32, d1 * q - m1 with d1 = d * scale, m1 = dmin *
// min); sub-blocks 2p and 2p + 1 are the low and high nibbles of qs[32p .. 32p + 32). The 8 scales and 8 mins
// are unpacked together (ggml's get_scale_min_k4 in 16 lanes) and multiplied by d and dmin as the scalar
// decoder does, one rounding each. A whole block (P = 4) unpacks them once; for M = 2 its 32 sums would not
// fit the registers, so half a block.
template <int P>
struct Q4_K : ScaleWithin {
  static constexpr int kCols = 64 * P, kChunkBytes = P * sizeof(gguf::block_q4_K) / 4;
  template <int M>
  FLASHLM_AVX2_INLINE static void add(const BackwardWeight&, const uint8_t* p, int64_t, int64_t col,
                                      Tile<M, 4 * P>& t, const float (*)[16], int) {
    const int first = static_cast<int>(col % 256) / 64;  // the chunk's first pair
    const uint8_t* b = p - first * sizeof(gguf::block_q4_K) / 4;
    // Lane j < 8: scale j; lane 8 + j: min j. Scale/min j < 4: the low 6 bits of byte j / j + 4; j >= 4: the
    // low (scale) or high (min) nibble of byte j + 4, with the top 2 bits of byte j - 4 / j above it.
    const __m512i q = dwords(b + offsetof(gguf::block_q4_K, scales));
    const __m512i low = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11), q),
                          _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4)),
        _mm512_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    const __m512i top = _mm512_maskz_permutexvar_epi32(
        0xF0F0, _mm512_setr_epi32(0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7), _mm512_srli_epi32(q, 6));
    const __m512 dm = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_or_si512(low, _mm512_slli_epi32(top, 4))),
        _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(load_f16(b + offsetof(gguf::block_q4_K, d))),
                             _mm512_set1_ps(load_f16(b + offsetof(gguf::block_q4_K, dmin)))));
    alignas(64) float scale_min[16];
    _mm512_store_ps(scale_min, dm);
    for (int pp = 0; pp < P; ++pp) {
      const int p = first + pp;
      const uint8_t* qs = b + offsetof(gguf::block_q4_K, qs) + 32 * p;
      const __m512i x[2] = {dwords(qs), dwords(qs + 16)};
      for (int s = 0; s < 2; ++s) {
        const int j = 2 * p + s;
        const __m512 table =
            _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(scale_min[j]), nibble_values()), _mm512_set1_ps(scale_min[8 + j]));
        for (int h = 0; h < 2; ++h) t.add(4 * pp + 2 * s + h, lookup(s ? high_nibbles(x[h]) : x[h], table), 1.f);
      }
    }
  }
};

// Q6_K: half a block, 128 elements (16 sub-blocks of 16, d * scale * (q - 32)); the element layout is
// shared_decoders.h's Decoder<Q6_K>: element 32u + j (u < 4, j < 32) has the nibble u / 2 of ql[32 (u % 2) + j]
// and the crumb u of qh[j] above it. q - 32 is assembled 64 bytes at a time (AVX-512BW): the low nibbles of all
// 64 ql bytes with the crumbs 0 and 1 of the 32 qh bytes (each half of the vector shifted by its own count),
// then the high nibbles with crumbs 2 and 3, 9 instructions for 128 values where 32-byte vectors took 24. The
// bytes go through a buffer on the stack to be widened to 16 dwords straight from memory (no extract).
struct Q6_K : ScaleWithin {
  static constexpr int kCols = 128, kChunkBytes = sizeof(gguf::block_q6_K) / 2;
  template <int M>
  FLASHLM_AVX2_INLINE static void add(const BackwardWeight&, const uint8_t* p, int64_t, int64_t col, Tile<M, 8>& t,
                                      const float (*)[16], int) {
    const int h = static_cast<int>(col % 256) / 128;
    const uint8_t* b = p - h * sizeof(gguf::block_q6_K) / 2;
    // d * scale of the 8 sub-blocks, then times dy: the AVX2 kernel's (a * (d * scale)).
    const __m512 ds = _mm512_mul_ps(_mm512_set1_ps(load_f16(b + offsetof(gguf::block_q6_K, d))),
                                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadl_epi64(
                                        reinterpret_cast<const __m128i*>(b + offsetof(gguf::block_q6_K, scales) + 8 * h)))));
    alignas(64) float f[M][16];
    for (int i = 0; i < M; ++i) _mm512_store_ps(f[i], _mm512_mul_ps(_mm512_set1_ps(t.a[i]), ds));
    const __m512i ql = _mm512_loadu_si512(b + offsetof(gguf::block_q6_K, ql) + 64 * h);
    const __m512i qh = _mm512_broadcast_i64x4(load32B(b + offsetof(gguf::block_q6_K, qh) + 32 * h));
    // Crumb u to bits 4-5 of its byte: u = 0, 1 shifted left by 4, 2; u = 2, 3 right by 0, 2. The 16-bit shifts
    // carry a neighbour's bits into the rest of the byte, which the masks drop.
    const __m512i left = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i right = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i crumb = _mm512_set1_epi8(0x30), nibble = _mm512_set1_epi8(0x0F), offset = _mm512_set1_epi8(32);
    // (a & nibble) | (c & crumb) - 32: ternary-logic 0xEA is (A & B) | C.
    alignas(64) uint8_t q[128];
    const __m512i c01 = _mm512_and_si512(_mm512_sllv_epi16(qh, left), crumb);
    const __m512i c23 = _mm512_and_si512(_mm512_srlv_epi16(qh, right), crumb);
    _mm512_store_si512(q, _mm512_sub_epi8(_mm512_ternarylogic_epi32(ql, nibble, c01, 0xEA), offset));
    const __m512i high = _mm512_srli_epi16(ql, 4);
    _mm512_store_si512(q + 64, _mm512_sub_epi8(_mm512_ternarylogic_epi32(high, nibble, c23, 0xEA), offset));
    for (int l = 0; l < 8; ++l) t.add_times(l, floats16(load16B(q + 16 * l)), f, l);
  }
};

// int8: 64 columns of a row, s * q.
struct Int8 : ScaleWithin {
  static constexpr int kCols = 64, kChunkBytes = 64;
  template <int M>
  FLASHLM_AVX2_INLINE static void add(const BackwardWeight& w, const uint8_t* q, int64_t r, int64_t, Tile<M, 4>& t,
                                      const float (*)[16], int) {
    for (int j = 0; j < 4; ++j) t.add(j, floats16(load16B(q + 16 * j)), w.scales[r]);
  }
};

// int4: a group of G elements, byte j holding element j (low nibble) and j + G / 2 (high); (u - z) * s, or
// s * (u - 8) where zeros are absent.
template <int G>
struct Int4 : ScaleWithin {
  static constexpr int kCols = G, kChunkBytes = G / 2;
  template <int M>
  FLASHLM_AVX2_INLINE static void add(const BackwardWeight& w, const uint8_t* q, int64_t r, int64_t col,
                                      Tile<M, G / 16>& t, const float (*)[16], int) {
    const int64_t g = r * (w.k / G) + col / G;
    const float s = w.scales[g];
    const __m512 table = w.zeros ? _mm512_mul_ps(_mm512_sub_ps(nibble_values(), _mm512_set1_ps(w.zeros[g])),
                                                 _mm512_set1_ps(s))
                                 : centred_values();
    const float f = w.zeros ? 1.f : s;
    for (int j = 0; j < G / 32; ++j) {
      const __m512i x = dwords(q + 16 * j);
      t.add(j, lookup(x, table), f);
      t.add(j + G / 32, lookup(high_nibbles(x), table), f);
    }
  }
};

// Weight rows are added kRows at a time: each chunk of dx is loaded and stored once per kRows rows, and the
// rows stream side by side. Every element still gets its rows' products in row order.
constexpr int kRows = 4;
// A thread reads only its columns of each row, a run too short for the hardware prefetcher to follow, so the
// rows kAhead rows ahead are prefetched, chunk by chunk: a prefetch every 64 bytes from the chunk's first, a
// count known at compile time. Prefetches are cheap, a loop around them is not: with the chunk's size a run-time
// value, the loop and its tests were 40 of the ~80 instructions of a Q4_0 chunk (4 rows of 32 columns), and
// on a core shared by two threads the instructions issued, not the vector ports, bound these kernels.
constexpr int kAhead = 8;
// Chunks whose factors (ScaleFirst) are computed together: one vector of them.
constexpr int kRun = 16;

// Weight rows r0 .. r0 + R into columns [c0, c1) of M rows of dx; `first`: the byte of column c0 within a row.
template <class Kind, int M, int R>
FLASHLM_AVX2_INLINE void rows(const BackwardWeight& w, const float* dyt, float* dx, int64_t c0, int64_t c1,
                              int64_t r0, int shift, int64_t first) {
  constexpr int V = Kind::kCols / 16;
  const uint8_t* src[R];
  const uint8_t* ahead[R];
  for (int rr = 0; rr < R; ++rr) {
    src[rr] = w.w + (r0 + rr) * w.row_bytes + first;
    ahead[rr] = w.w + (r0 + rr + kAhead < w.n ? r0 + rr + kAhead : w.n - 1) * w.row_bytes + first;
  }
  constexpr int64_t chunk_bytes = Kind::kChunkBytes;
  float a[R][M];
  for (int rr = 0; rr < R; ++rr)
    for (int i = 0; i < M; ++i) a[rr][i] = dyt[(r0 + rr) * M + i];
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(static_cast<int>(chunk_bytes)));
  for (int64_t run = c0; run < c1; run += kRun * Kind::kCols) {
    const int64_t run_byte = ((run - c0) * w.block_bytes) >> shift;
    const int count = static_cast<int>((c1 - run < kRun * Kind::kCols ? c1 - run : kRun * Kind::kCols) / Kind::kCols);
    alignas(64) float f[R][M][16];
    if constexpr (Kind::kFactors)
      for (int rr = 0; rr < R; ++rr) Kind::template factors<M>(src[rr] + run_byte, at, count, a[rr], f[rr]);
    for (int l = 0; l < count; ++l) {
      const int64_t c = run + l * Kind::kCols, byte = run_byte + l * chunk_bytes;
      for (int rr = 0; rr < R; ++rr)
        for (int at = 0; at < chunk_bytes; at += 64)
          _mm_prefetch(reinterpret_cast<const char*>(ahead[rr] + byte + at), _MM_HINT_T0);
      Tile<M, V> t;
      t.load(dx + c, w.k);
      for (int rr = 0; rr < R; ++rr) {
        for (int i = 0; i < M; ++i) t.a[i] = a[rr][i];
        Kind::template add<M>(w, src[rr] + byte, r0 + rr, c, t, f[rr], l);
      }
      t.store(dx + c, w.k);
    }
  }
}

// Columns [c0, c1) of M rows of dx += dy @ W[:, c0 .. c1), every weight row.
template <class Kind, int M>
void walk(const BackwardWeight& w, const float* dyt, float* dx, int64_t c0, int64_t c1) {
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.block));  // blocks are powers of two
  const int64_t first = (c0 >> shift) * w.block_bytes;
  int64_t r0 = 0;
  for (; r0 + kRows <= w.n; r0 += kRows) rows<Kind, M, kRows>(w, dyt, dx, c0, c1, r0, shift, first);
  for (; r0 < w.n; ++r0) rows<Kind, M, 1>(w, dyt, dx, c0, c1, r0, shift, first);
}

template <class Kind>
void walk_m(const BackwardWeight& w, const float* dyt, int64_t m, float* dx, int64_t c0, int64_t c1) {
  if (m == 1) {
    walk<Kind, 1>(w, dyt, dx, c0, c1);
  } else {
    walk<Kind, 2>(w, dyt, dx, c0, c1);
  }
}

}  // namespace

bool accumulate_fused_avx512(const BackwardWeight& w, const float* dyt, int64_t m, float* dx, int64_t t0,
                             int64_t t1) {
  const int64_t c0 = t0 * w.block, c1 = t1 * w.block;
  if (w.kind == WeightKind::Int8) {
    if (w.block % Int8::kCols) return false;
    walk_m<Int8>(w, dyt, m, dx, c0, c1);
  } else if (w.kind == WeightKind::Int4) {
    switch (w.block) {
      case 32: walk_m<Int4<32>>(w, dyt, m, dx, c0, c1); break;
      case 64: walk_m<Int4<64>>(w, dyt, m, dx, c0, c1); break;
      case 128: walk_m<Int4<128>>(w, dyt, m, dx, c0, c1); break;
      default: return false;
    }
  } else if (w.type == DType::Q4_0) {
    walk_m<Q4_0>(w, dyt, m, dx, c0, c1);
  } else if (w.type == DType::Q8_0) {
    walk_m<Q8_0>(w, dyt, m, dx, c0, c1);
  } else if (w.type == DType::Q4_K) {
    if (m == 1) {
      walk<Q4_K<4>, 1>(w, dyt, dx, c0, c1);
    } else {
      walk<Q4_K<2>, 2>(w, dyt, dx, c0, c1);
    }
  } else if (w.type == DType::Q6_K) {
    walk_m<Q6_K>(w, dyt, m, dx, c0, c1);
  } else {
    return false;
  }
  return true;
}

}  // namespace flashlm::gemm::detail
