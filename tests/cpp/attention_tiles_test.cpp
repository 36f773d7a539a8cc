// Checks the tile arithmetic of the CUDA attention kernels (csrc/attention/shared_tiles.h) against the
// scalar reference's visibility rule (visible_keys in attention_cpu.h) by brute force over small shapes,
// windows and tile sizes. Host-only; built and run by tests/test_attention_tiles.py:
//   c++ -std=c++17 -I csrc/attention -I csrc/include tests/cpp/attention_tiles_test.cpp && ./a.out
#include <cstdio>
#include <cstdlib>

#include "attention_cpu.h"
#include "shared_tiles.h"
#include "expect.h"

using namespace flashlm::attention;

static bool sees(const Params& p, const cpu::Sequence& s, int64_t i, int64_t j) {
  const cpu::KeyRange r = cpu::visible_keys(p, s, i);
  return j >= r.first && j < r.last;
}

static void check_band(int64_t sq, int64_t sk, int64_t wl, int64_t wr, int tm, int tn) {
  Params p;
  p.window_left = wl;
  p.window_right = wr;
  cpu::Sequence s;
  s.sq = sq;
  s.sk = sk;
  const tiles::Band band{sq, sk, wl, wr};
  const char* fmt = "sq=%lld sk=%lld wl=%lld wr=%lld tm=%d tn=%d at i=%lld j=%lld";
#define ARGS(i, j) (long long)sq, (long long)sk, (long long)wl, (long long)wr, tm, tn, (long long)(i), (long long)(j)
  // Per query: the same keys as the reference.
  for (int64_t i = 0; i < sq; ++i) {
    const cpu::KeyRange r = cpu::visible_keys(p, s, i);
    const bool empty_ref = r.first >= r.last, empty = band.first_key(i) >= band.end_key(i);
    EXPECT(empty_ref == empty, fmt, ARGS(i, -1));
    if (!empty) EXPECT(band.first_key(i) == r.first && band.end_key(i) == r.last, fmt, ARGS(i, -1));
  }
  // Per query tile: keys() is the union of the rows' keys (contiguous), key_cols() the per-row mask.
  for (int64_t i0 = 0; i0 < sq; i0 += tm) {
    const int64_t i1 = std::min<int64_t>(sq, i0 + tm);
    const tiles::Range keys = band.keys(i0, i1);
    for (int64_t j = 0; j < sk; ++j) {
      bool any = false;
      for (int64_t i = i0; i < i1; ++i) any |= sees(p, s, i, j);
      EXPECT(any == (j >= keys.begin && j < keys.end), fmt, ARGS(i0, j));
    }
    const tiles::Range kt = tiles::tile_range(keys, tn);
    for (int64_t j0 = 0; j0 < sk + tn; j0 += tn) {
      const int64_t tile = j0 / tn;
      bool any = false, all = true;
      for (int64_t i = i0; i < i0 + tm; ++i) {
        for (int64_t j = j0; j < j0 + tn; ++j) {
          const bool v = i < sq && j < sk && sees(p, s, i, j);
          any |= v;
          all &= v;
          const tiles::Cols c = tiles::key_cols(band, i, j0, tn);
          EXPECT(v == (j - j0 >= c.lo && j - j0 < c.hi), fmt, ARGS(i, j));
        }
      }
      EXPECT(any == (tile >= kt.begin && tile < kt.end), fmt, ARGS(i0, j0));
      // A tile the kernels leave unmasked must be fully visible.
      if (band.tile_full(i0, i0 + tm, j0, j0 + tn)) EXPECT(all, fmt, ARGS(i0, j0));
      // And a fully visible tile inside the sequence is recognised as such (no needless masking).
      if (all) EXPECT(band.tile_full(i0, i0 + tm, j0, j0 + tn), fmt, ARGS(i0, j0));
    }
  }
  // Per key tile: queries() is exactly the set of queries that see a key of the tile; query_cols() the
  // transposed per-key mask; the query tiles it visits are those whose key-tile range holds this tile (the
  // FA1 loop order relies on that to know a query tile's first visit).
  for (int64_t j0 = 0; j0 < sk; j0 += tn) {
    const int64_t j1 = std::min<int64_t>(sk, j0 + tn);
    const tiles::Range qs = band.queries(j0, j1);
    for (int64_t i = 0; i < sq; ++i) {
      bool any = false;
      for (int64_t j = j0; j < j1; ++j) any |= sees(p, s, i, j);
      EXPECT(any == (i >= qs.begin && i < qs.end), fmt, ARGS(i, j0));
    }
    const tiles::Range mt = tiles::tile_range(qs, tm);
    for (int64_t m = 0; m * tm < sq; ++m) {
      const int64_t i0 = m * tm, i1 = std::min<int64_t>(sq, i0 + tm);
      const tiles::Range kt = tiles::tile_range(band.keys(i0, i1), tn);
      const bool visits = m >= mt.begin && m < mt.end, listed = j0 / tn >= kt.begin && j0 / tn < kt.end;
      EXPECT(visits == listed, fmt, ARGS(i0, j0));
    }
    for (int64_t j = j0; j < j0 + tn; ++j) {
      for (int64_t i0 = 0; i0 < sq + tm; i0 += tm) {
        const tiles::Cols c = tiles::query_cols(band, j, i0, tm);
        for (int64_t i = i0; i < i0 + tm; ++i) {
          const bool v = i < sq && j < sk && sees(p, s, i, j);
          EXPECT(v == (i - i0 >= c.lo && i - i0 < c.hi), fmt, ARGS(i, j));
        }
      }
    }
  }
#undef ARGS
}

static void check_sequence_rows() {
  // Offsets from device memory are clamped into the tensors whatever they hold.
  const int32_t cu_q[] = {-5, 3, 2, 40, 7};
  const int32_t cu_k[] = {0, 100, 50, 60, 61};
  for (int b = 0; b < 4; ++b) {
    const tiles::SeqRows r = tiles::sequence_rows(cu_q, cu_k, b, 10, 60, 4, 55);
    EXPECT(r.q0 >= 0 && r.sq >= 0 && r.q0 + r.sq <= 10 && r.sq <= 4, "b=%d q0=%lld sq=%lld", b, (long long)r.q0,
           (long long)r.sq);
    EXPECT(r.k0 >= 0 && r.sk >= 0 && r.k0 + r.sk <= 60 && r.sk <= 55, "b=%d k0=%lld sk=%lld", b, (long long)r.k0,
           (long long)r.sk);
  }
  const tiles::SeqRows ok = tiles::sequence_rows(cu_q, cu_k, 1, 10, 60, 4, 55);  // [3, 2) -> empty
  EXPECT(ok.q0 == 3 && ok.sq == 0, "q0=%lld sq=%lld", (long long)ok.q0, (long long)ok.sq);
  const tiles::SeqRows pad = tiles::sequence_rows(nullptr, nullptr, 3, 0, 0, 7, 9);
  EXPECT(pad.q0 == 0 && pad.k0 == 0 && pad.sq == 7 && pad.sk == 9, "padded");
}

int main() {
  const int64_t windows[] = {-1, 0, 1, 3, 17};
  int cases = 0;
  for (int64_t sq : {1, 2, 5, 16, 17, 33})
    for (int64_t sk : {0, 1, 3, 16, 19, 40})
      for (int64_t wl : windows)
        for (int64_t wr : windows)
          for (int t : {0, 1, 2}) {
            const int tm = t == 0 ? 4 : (t == 1 ? 8 : 16), tn = t == 2 ? 4 : 8;
            check_band(sq, sk, wl, wr, tm, tn);
            ++cases;
          }
  check_sequence_rows();
  std::printf("%d band cases, %d failures\n", cases, failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
