// Checks the index arithmetic of the CUDA paged KV-cache kernels (csrc/kvcache/paged_tiles.h) on the host:
// clamped lengths and slots stay inside the tensors whatever the device-side inputs hold, in-range inputs
// map exactly as the layout says, and the decode kernel's split/warp/tile schedule visits every visible key
// exactly once with the right mask. Host-only; built and run by tests/test_attention_tiles.py:
//   c++ -std=c++17 -I csrc/kvcache tests/cpp/paged_tiles_test.cpp && ./a.out
#include <cstdio>
#include <random>
#include <vector>

#include "expect.h"
#include "paged_tiles.h"

using namespace flashlm::kvcache;

using ll = long long;

static void check_context_len() {
  const tiles::CacheShape c{10, 4, 16};  // 4 blocks of 16 per sequence at most
  EXPECT(tiles::context_len(37, 64, c) == 37, "in range");
  EXPECT(tiles::context_len(-5, 64, c) == 0, "negative");
  EXPECT(tiles::context_len(100, 64, c) == 64, "above max_seq_len");
  EXPECT(tiles::context_len(100, 1000, c) == 64, "above what the table row addresses");
  EXPECT(tiles::context_len(30, 20, c) == 20, "max_seq_len below the table");
  EXPECT(tiles::context_len(30, 64, tiles::CacheShape{0, 4, 16}) == 0, "no blocks");
  EXPECT(tiles::context_len(30, 64, tiles::CacheShape{10, 0, 16}) == 0, "empty table rows");
}

// Every position of a context maps to table[pos / bs] (clamped into the cache) at row pos % bs.
static void check_token_slot(std::mt19937& rng) {
  for (int bs : {1, 2, 3, 7, 16, 33}) {
    for (int64_t num_blocks : {1, 5, 40}) {
      const int64_t max_blocks = 9;
      const tiles::CacheShape c{num_blocks, max_blocks, bs};
      std::vector<int32_t> table(max_blocks);
      std::uniform_int_distribution<int32_t> any(-3, int32_t(num_blocks) + 3);
      for (int trial = 0; trial < 20; ++trial) {
        for (auto& b : table) b = any(rng);
        const int64_t len = tiles::context_len(max_blocks * bs + 5, 1 << 30, c);
        EXPECT(len == max_blocks * bs, "bs=%d len=%lld", bs, (ll)len);
        for (int64_t pos = 0; pos < len; ++pos) {
          const tiles::Slot s = tiles::token_slot(table.data(), pos, c);
          const int32_t entry = table[pos / bs];
          const int64_t want = entry < 0 ? 0 : (entry >= num_blocks ? num_blocks - 1 : entry);
          EXPECT(s.block == want && s.offset == pos % bs, "bs=%d nb=%lld pos=%lld block=%lld offset=%d", bs,
                 (ll)num_blocks, (ll)pos, (ll)s.block, s.offset);
        }
        // Past the row (only reachable if a caller skipped context_len): still inside the table and cache.
        const tiles::Slot far = tiles::token_slot(table.data(), len + 3 * bs, c);
        EXPECT(far.block >= 0 && far.block < num_blocks && far.offset >= 0 && far.offset < bs, "bs=%d past the row",
               bs);
      }
    }
  }
}

static void check_slot_mapping() {
  const int64_t num_blocks = 6;
  for (int bs : {1, 4, 5}) {
    for (int64_t slot = -3; slot < num_blocks * bs + 4; ++slot) {
      tiles::Slot s{-1, -1};
      const bool ok = tiles::slot_from_mapping(slot, num_blocks, bs, s);
      EXPECT(ok == (slot >= 0 && slot < num_blocks * bs), "bs=%d slot=%lld", bs, (ll)slot);
      if (ok) EXPECT(s.block * bs + s.offset == slot && s.offset >= 0 && s.offset < bs, "bs=%d slot=%lld", bs, (ll)slot);
    }
    tiles::Slot s{};
    EXPECT(!tiles::slot_from_mapping(INT64_MAX, num_blocks, bs, s), "huge slot");
    EXPECT(!tiles::slot_from_mapping(0, 0, bs, s), "empty cache");
  }
}

static void check_query_rows() {
  const int32_t cu[] = {-5, 3, 2, 40, 7, 9};
  for (int s = 0; s < 5; ++s) {
    const tiles::QueryRows r = tiles::query_rows(cu, s, 10, 4);
    EXPECT(r.q0 >= 0 && r.sq >= 0 && r.q0 + r.sq <= 10 && r.sq <= 4, "s=%d q0=%lld sq=%lld", s, (ll)r.q0, (ll)r.sq);
  }
  const tiles::QueryRows ok = tiles::query_rows(cu, 4, 10, 4);  // [7, 9)
  EXPECT(ok.q0 == 7 && ok.sq == 2, "q0=%lld sq=%lld", (ll)ok.q0, (ll)ok.sq);
}

// The prefill kernel's reads under arbitrary device-side inputs: whatever cu_seqlens_q and seq_lens hold, the
// query rows it reads lie in q, the key tiles it loads lie in the context (so every row has a slot inside the
// cache), and queries sit bottom-right aligned on the clamped context.
static void check_prefill_bounds(std::mt19937& rng) {
  constexpr int kBlockM = 128, kBlockN = 64;
  const int64_t num_tokens = 300, max_seqlen_q = 200;
  const tiles::CacheShape c{7, 5, 16};
  const int64_t max_seq_len = c.max_blocks_per_seq * c.block_size;
  std::uniform_int_distribution<int32_t> wild(-50, 400);
  for (int trial = 0; trial < 200; ++trial) {
    const int32_t cu[2] = {wild(rng), wild(rng)};
    const int64_t wl = trial % 3 == 0 ? -1 : trial % 37, wr = trial % 2 == 0 ? 0 : -1;
    const tiles::QueryRows qr = tiles::query_rows(cu, 0, num_tokens, max_seqlen_q);
    const int64_t sk = tiles::context_len(wild(rng), max_seq_len, c);
    EXPECT(qr.q0 >= 0 && qr.sq >= 0 && qr.q0 + qr.sq <= num_tokens && qr.sq <= max_seqlen_q, "trial %d", trial);
    EXPECT(sk >= 0 && sk <= max_seq_len, "trial %d sk=%lld", trial, (ll)sk);
    const tiles::Band band{qr.sq, sk, wl, wr};
    for (int64_t i0 = 0; i0 < qr.sq; i0 += kBlockM) {
      const int64_t i1 = tiles::min64(qr.sq, i0 + kBlockM);
      const tiles::Range keys = band.keys(i0, i1);
      const tiles::Range nt = tiles::tile_range(keys, kBlockN);
      for (int64_t n = nt.begin; n < nt.end; ++n) {
        const int64_t j0 = n * kBlockN, rows = tiles::min64(sk - j0, kBlockN);
        EXPECT(j0 >= 0 && rows >= 1 && j0 + rows <= sk, "trial %d tile %lld of sk=%lld", trial, (ll)n, (ll)sk);
      }
      // Query i sits at position sk - sq + i: with a causal mask it sees no key past that position.
      if (wr == 0)
        for (int64_t i = i0; i < i1; ++i)
          EXPECT(band.end_key(i) <= tiles::max64(0, sk - qr.sq + i + 1), "trial %d query %lld", trial, (ll)i);
    }
  }
}

// The decode kernel's schedule: splits own consecutive runs of key tiles, warps take a split's tiles
// round-robin, and each tile masks the columns outside the visible keys. Every visible key is attended
// exactly once and no other key is.
static void check_decode_schedule() {
  constexpr int kBlockN = 16, kWarps = 4;
  for (int64_t sk : {0, 1, 2, 15, 16, 17, 31, 64, 100, 257}) {
    for (int64_t wl : {-1, 0, 1, 5, 16, 40, 1000}) {
      const tiles::Range keys = tiles::decode_keys(sk, wl);
      for (int64_t j = 0; j < sk; ++j) {
        const bool visible = wl < 0 || j >= sk - 1 - wl;
        EXPECT(visible == (j >= keys.begin && j < keys.end), "sk=%lld wl=%lld j=%lld", (ll)sk, (ll)wl, (ll)j);
      }
      if (sk == 0) EXPECT(keys.begin >= keys.end, "sk=0 sees keys");
      const tiles::Range all = tiles::tile_range(keys, kBlockN);
      for (int splits : {1, 2, 3, 5, 8, 40}) {
        std::vector<int> seen(size_t(sk) + kBlockN, 0);
        int64_t next = all.begin;
        for (int split = 0; split < splits; ++split) {
          const tiles::Range mine = tiles::split_tiles(all, splits, split);
          if (mine.begin < mine.end) {
            EXPECT(mine.begin == next, "sk=%lld splits=%d split=%d: not consecutive", (ll)sk, splits, split);
            next = mine.end;
          }
          EXPECT(mine.end - mine.begin <= (all.end - all.begin + splits - 1) / splits, "split too long");
          for (int w = 0; w < kWarps; ++w)
            for (int64_t t = mine.begin + w; t < mine.end; t += kWarps) {
              const int64_t j0 = t * kBlockN;
              EXPECT(j0 < sk && j0 >= 0, "tile %lld outside the context of %lld", (ll)t, (ll)sk);
              const flashlm::attention::tiles::Cols c = tiles::tile_cols(keys, j0, kBlockN);
              for (int col = c.lo; col < c.hi; ++col) ++seen[size_t(j0 + col)];
            }
        }
        if (all.begin < all.end) EXPECT(next == all.end, "sk=%lld splits=%d: tiles left over", (ll)sk, splits);
        for (int64_t j = 0; j < int64_t(seen.size()); ++j)
          EXPECT(seen[size_t(j)] == ((j >= keys.begin && j < keys.end) ? 1 : 0),
                 "sk=%lld wl=%lld splits=%d key %lld attended %d times", (ll)sk, (ll)wl, splits, (ll)j,
                 seen[size_t(j)]);
      }
    }
  }
}

int main() {
  std::mt19937 rng(1234);
  check_context_len();
  check_token_slot(rng);
  check_slot_mapping();
  check_query_rows();
  check_prefill_bounds(rng);
  check_decode_schedule();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
