// Index arithmetic of the tiled CUDA attention kernels (shared with the paged kernels of kvcache/): where a sequence's rows are (with cu_seqlens
// clamped, since on CUDA they live in device memory and cannot be checked on the host), which keys a query
// sees, which queries see a key, and which tiles need a mask. Plain __host__ __device__ functions so that
// tests/cpp/attention_tiles_test.cpp checks them against the scalar reference (attention_cpu.h).
#pragma once

#include <cstdint>

// Not core/half.h's FLASHLM_HD, which is `static` (member functions here cannot be) and may be
// included beside this header.
#ifdef __CUDACC__
#define FLASHLM_TILE_HD __host__ __device__ __forceinline__
#else
#define FLASHLM_TILE_HD inline
#endif

namespace flashlm::attention::tiles {

FLASHLM_TILE_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FLASHLM_TILE_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
FLASHLM_TILE_HD int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }
FLASHLM_TILE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One sequence of the batch: its first query and key rows in the (packed) tensors, and its lengths.
struct SeqRows {
  int64_t q0, k0, sq, sk;
};

// Padded batches (cu_q == nullptr): every sequence has seqlen_q queries and seqlen_k keys from row 0.
// Packed batches: rows [cu[b], cu[b + 1]) clamped so that whatever the offsets hold, the rows lie inside
// the packed tensors (total rows), never run backwards, and are no more than max_seqlen (the grid was sized
// from it): start = min(max(cu[b], 0), total), end = min(max(cu[b + 1], start), total).
FLASHLM_TILE_HD SeqRows sequence_rows(const int32_t* cu_q, const int32_t* cu_k, int b, int64_t total_q, int64_t total_k,
                                 int64_t seqlen_q, int64_t seqlen_k) {
  if (cu_q == nullptr) return {0, 0, seqlen_q, seqlen_k};
  const int64_t q0 = clamp64(cu_q[b], 0, total_q), q1 = clamp64(cu_q[b + 1], q0, total_q);
  const int64_t k0 = clamp64(cu_k[b], 0, total_k), k1 = clamp64(cu_k[b + 1], k0, total_k);
  return {q0, k0, min64(q1 - q0, max64(seqlen_q, 0)), min64(k1 - k0, max64(seqlen_k, 0))};
}

struct Range {
  int64_t begin, end;  // [begin, end); empty when begin >= end
};

// The bottom-right aligned band of one sequence: query i sits at key position diag(i) = i + sk - sq and sees
// key j when diag(i) - wl <= j <= diag(i) + wr, a negative side being unbounded (visible_keys in
// attention_cpu.h). Both sides are >= 0 or -1, so every query sees a contiguous run of keys, and the runs of
// successive queries move right by at most one key: the keys a run of queries sees are contiguous, and so
// are the queries that a run of keys is seen by.
struct Band {
  int64_t sq, sk, wl, wr;

  FLASHLM_TILE_HD int64_t diag(int64_t i) const { return i + sk - sq; }
  FLASHLM_TILE_HD int64_t first_key(int64_t i) const { return wl >= 0 ? max64(0, diag(i) - wl) : 0; }
  FLASHLM_TILE_HD int64_t end_key(int64_t i) const {
    return max64(first_key(i), wr >= 0 ? min64(sk, diag(i) + wr + 1) : sk);
  }
  // The keys seen by any of the queries [i0, i1), 0 <= i0 < i1 <= sq.
  FLASHLM_TILE_HD Range keys(int64_t i0, int64_t i1) const { return {first_key(i0), end_key(i1 - 1)}; }
  // The queries that see any of the keys [j0, j1), 0 <= j0 < j1 <= sk (the inverse of keys()).
  FLASHLM_TILE_HD Range queries(int64_t j0, int64_t j1) const {
    const int64_t off = sk - sq;
    return {wr >= 0 ? max64(0, j0 - off - wr) : 0, wl >= 0 ? min64(sq, j1 - off + wl) : sq};
  }
  // True when every query of [i0, i1) sees every key of [j0, j1) and both lie inside the sequence: such a
  // tile needs no mask.
  FLASHLM_TILE_HD bool tile_full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return i1 <= sq && j1 <= sk && (wl < 0 || j0 >= diag(i1 - 1) - wl) && (wr < 0 || j1 - 1 <= diag(i0) + wr);
  }
};

// The columns [lo, hi) of a tile of `width` keys starting at key j0 that query i sees (lo >= hi: none; a
// query outside the sequence sees none). Tile-relative ints: the per-element mask is then two int compares.
struct Cols {
  int lo, hi;
};
FLASHLM_TILE_HD Cols key_cols(const Band& band, int64_t i, int64_t j0, int width) {
  if (i < 0 || i >= band.sq) return {0, 0};
  return {int(clamp64(band.first_key(i) - j0, 0, width)), int(clamp64(band.end_key(i) - j0, 0, width))};
}
// The columns [lo, hi) of a tile of `width` queries starting at query i0 that see key j (the transposed
// view, for the dK/dV kernel; a key outside the sequence is seen by none).
FLASHLM_TILE_HD Cols query_cols(const Band& band, int64_t j, int64_t i0, int width) {
  if (j < 0 || j >= band.sk) return {0, 0};
  const Range r = band.queries(j, j + 1);
  return {int(clamp64(r.begin - i0, 0, width)), int(clamp64(r.end - i0, 0, width))};
}

// The tiles [begin, end) of `tile` rows that cover a range (none when the range is empty).
FLASHLM_TILE_HD Range tile_range(Range r, int64_t tile) {
  if (r.begin >= r.end) return {0, 0};
  return {r.begin / tile, ceil_div(r.end, tile)};
}

}  // namespace flashlm::attention::tiles
