// Index arithmetic of the CUDA paged KV-cache kernels: the clamped lengths of a sequence, where a token's row
// lives in the cache, and which key tiles a decode split owns. Block tables, sequence lengths and slot
// mappings live in device memory and cannot be checked on the host, so every value read from them is
// clamped here into the tensors' bounds. Plain __host__ __device__ functions so that
// tests/cpp/paged_tiles_test.cpp checks them on the host.
#pragma once

#include <cstdint>

#include "../attention/shared_tiles.h"  // FLASHLM_TILE_HD, tiles::Range, tiles::Band, min64/max64/clamp64/ceil_div

namespace flashlm::kvcache::tiles {

using attention::tiles::Band;
using attention::tiles::ceil_div;
using attention::tiles::clamp64;
using attention::tiles::max64;
using attention::tiles::min64;
using attention::tiles::Range;
using attention::tiles::tile_range;

// The cache geometry a kernel may touch.
struct CacheShape {
  int64_t num_blocks;          // blocks in the caches
  int64_t max_blocks_per_seq;  // entries of a block table row
  int block_size;              // tokens per block (>= 1)
};

// The tokens of a sequence the kernels read: seq_lens[s] clamped to [0, max_seq_len] and to what the block
// table row can address; 0 when the cache holds no block at all.
FLASHLM_TILE_HD int64_t context_len(int64_t seq_len, int64_t max_seq_len, const CacheShape& c) {
  if (c.num_blocks <= 0 || c.max_blocks_per_seq <= 0 || c.block_size <= 0) return 0;
  return clamp64(seq_len, 0, min64(max_seq_len, c.max_blocks_per_seq * c.block_size));
}

// Where token `pos` (0 <= pos < context_len) of a sequence lives: its physical block (the table entry,
// clamped to [0, num_blocks)) and its row within the block.
struct Slot {
  int64_t block;
  int offset;
};
FLASHLM_TILE_HD Slot token_slot(const int32_t* table_row, int64_t pos, const CacheShape& c) {
  const int64_t logical = min64(pos / c.block_size, c.max_blocks_per_seq - 1);
  return {clamp64(table_row[logical], 0, c.num_blocks - 1), int(pos - (pos / c.block_size) * c.block_size)};
}

// A slot of slot_mapping (block * block_size + offset); false for -1 and anything outside the cache, which
// the CUDA write kernel skips.
FLASHLM_TILE_HD bool slot_from_mapping(int64_t slot, int64_t num_blocks, int block_size, Slot& out) {
  if (slot < 0 || block_size <= 0 || num_blocks <= 0 || slot / block_size >= num_blocks) return false;
  out = {slot / block_size, int(slot % block_size)};
  return true;
}

// The rows of sequence s in the packed queries: [cu[s], cu[s + 1]) clamped into [0, num_tokens], never
// backwards, and at most max_seqlen_q long (the grid was sized from it).
struct QueryRows {
  int64_t q0, sq;
};
FLASHLM_TILE_HD QueryRows query_rows(const int32_t* cu_seqlens_q, int s, int64_t num_tokens, int64_t max_seqlen_q) {
  const int64_t q0 = clamp64(cu_seqlens_q[s], 0, num_tokens), q1 = clamp64(cu_seqlens_q[s + 1], q0, num_tokens);
  return {q0, min64(q1 - q0, max64(max_seqlen_q, 0))};
}

// The keys a decode query sees: it sits at the sequence's last position, so only window_left limits it.
FLASHLM_TILE_HD Range decode_keys(int64_t sk, int64_t window_left) {
  if (sk <= 0) return {0, 0};
  return Band{1, sk, window_left, -1}.keys(0, 1);
}

// The columns [lo, hi) of a tile of `width` keys starting at key j0 that lie in `keys` (the decode mask,
// the same for every row since the rows are one query's heads).
FLASHLM_TILE_HD attention::tiles::Cols tile_cols(Range keys, int64_t j0, int width) {
  return {int(clamp64(keys.begin - j0, 0, width)), int(clamp64(keys.end - j0, 0, width))};
}

// Split `split` of `num_splits` of the key tiles [tiles.begin, tiles.end): consecutive runs of equal length
// (the last ones shorter or empty), so the splits cover every tile exactly once.
FLASHLM_TILE_HD Range split_tiles(Range tiles, int num_splits, int split) {
  const int64_t n = max64(tiles.end - tiles.begin, 0);
  const int64_t per = ceil_div(n, num_splits < 1 ? 1 : num_splits);
  const int64_t b = min64(tiles.begin + split * per, tiles.begin + n);
  return {b, min64(b + per, tiles.begin + n)};
}

}  // namespace flashlm::kvcache::tiles
