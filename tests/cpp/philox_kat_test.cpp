// Checks the Philox4x32-10 generator of the attention dropout (csrc/attention/shared_dropout.h) against
// Random123's published known-answer vectors (its tests/kat_vectors, philox4x32 with 10 rounds), and the
// keep rule against the words it reads. Host-only; built and run by tests/test_attention_dropout.py:
//   c++ -std=c++17 -I csrc/attention tests/cpp/philox_kat_test.cpp && ./a.out
#include <cstdint>
#include <cstdio>

#include "shared_dropout.h"
#include "expect.h"

using namespace flashlm::attention::dropout;

struct Kat {
  uint32_t ctr[4], key[2], out[4];
};

int main() {
  const Kat kats[] = {
      {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u}, {0x00000000u, 0x00000000u},
       {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const Words w = philox4x32_10(Words{{k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]}}, k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) EXPECT(w.w[i] == k.out[i], "ctr0=%08x word %d: got %08x, want %08x", k.ctr[0], i, w.w[i], k.out[i]);
  }
  // Element (b, h, row, col) reads word col % 4 of the counter (col / 4, row, offset + b * heads + h), keyed by
  // the seed; row_factors agrees with keep column by column from any start.
  Rng r;
  r.seed = 0x0123456789abcdefull;
  r.offset = 0xfffffffeull;  // b * heads + h carries into the high word
  r.heads = 3;
  r.keep_below = keep_below(0.3);
  r.scale = 1.f / 0.7f;
  const uint64_t sub = r.offset + 1 * 3 + 2;
  const Words w = philox4x32_10(Words{{5, 9, uint32_t(sub), uint32_t(sub >> 32)}}, 0x89abcdefu, 0x01234567u);
  for (int c = 0; c < 4; ++c)
    EXPECT(keep(r, 1, 2, 9, 20 + c) == (w.w[c] < r.keep_below), "col %d", 20 + c);
  float f[40];
  row_factors(r, 1, 2, 9, 3, 43, f);
  for (int j = 3; j < 43; ++j)
    EXPECT(f[j - 3] == (keep(r, 1, 2, 9, j) ? r.scale : 0.f), "row_factors col %d: %g", j, double(f[j - 3]));
  EXPECT(keep_below(0.0) == (uint64_t(1) << 32), "keep_below(0) = %llu", (unsigned long long)keep_below(0.0));
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
