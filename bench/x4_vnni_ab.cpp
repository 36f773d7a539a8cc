/*
x4_vnni_ab: two revisions of the regrouped AVX-512 VNNI kernels (csrc/gemm/repack_x4_vnni.cpp and
repack_x4k_vnni.cpp) in one program, called alternately on the same random weights and activations, so that a
change to them is measured against its base under the same load (bench/results/gguf_matmul.md). Each side is
the kernels' sources of one revision compiled with their namespace renamed (flashlm_a, flashlm_b) and this file
as its wrapper (X4_AB_SIDE); the driver (X4_AB_SIDE unset) checks that both sides give the same bits, then
times them per CPU-second of the thread (one thread), best and median of the turns, for Q4_0, Q8_0, Q4_K and
Q6_K at N = 2048, K = 768 and 2048, M = 1, 8, 16 and 64 (hot weights; the extras included).

Build and run (from the repository root): bench/x4_vnni_ab.sh [base revision, default HEAD] [turns, default 15]
*/
#include <cstdint>

#ifdef X4_AB_SIDE
#include "gguf_matmul_kernels.h"

#define X4_AB_CAT2(a, b) a##_##b
#define X4_AB_CAT(a, b) X4_AB_CAT2(a, b)

namespace {
flashlm::DType type_of(int t) {
  using flashlm::DType;
  return t == 0 ? DType::Q4_0 : t == 1 ? DType::Q8_0 : t == 2 ? DType::Q4_K : DType::Q6_K;
}
}  // namespace

extern "C" void X4_AB_CAT(X4_AB_SIDE, x4)(int t, const uint8_t* packed, int64_t k, const uint8_t* acts,
                                          int64_t act_bytes, const uint8_t* extras, int64_t m, float* y, int64_t ldy,
                                          int64_t n0, int64_t n1) {
  flashlm::gemm::detail::matmul_x4_vnni(type_of(t), packed, k, acts, act_bytes, extras, m, y, ldy, n0, n1);
}
extern "C" void X4_AB_CAT(X4_AB_SIDE, extras)(const uint8_t* acts, int64_t act_bytes, int64_t m, int64_t k,
                                              uint8_t* extras) {
  flashlm::gemm::detail::x4_pair_extras_vnni(acts, act_bytes, m, k, extras);
}

#else
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#define X4_AB_DECLARE(side)                                                                                     \
  extern "C" void side##_x4(int, const uint8_t*, int64_t, const uint8_t*, int64_t, const uint8_t*, int64_t, float*, \
                            int64_t, int64_t, int64_t);                                                          \
  extern "C" void side##_extras(const uint8_t*, int64_t, int64_t, int64_t, uint8_t*);
X4_AB_DECLARE(a)
X4_AB_DECLARE(b)

namespace {

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

void put_f16_one(std::vector<uint8_t>& w, int64_t at) { w[at] = 0x00, w[at + 1] = 0x3C; }  // 1.0

}  // namespace

int main(int argc, char** argv) {
  const int turns = argc > 1 ? std::atoi(argv[1]) : 15;
  if (turns < 1 || turns > 10000) {
    std::fprintf(stderr, "x4_vnni_ab: error: turns must be in [1, 10000], got %s\n", argv[1]);
    return 2;
  }
  const char* names[] = {"Q4_0", "Q8_0", "Q4_K", "Q6_K"};
  const int64_t block_bytes[] = {18, 34, 144, 210}, block[] = {32, 32, 256, 256};
  const int64_t n = 2048;
  std::mt19937 rng(1);
  for (int64_t k : {768, 2048}) {
    for (int t = 0; t < 4; ++t) {
      // Random quants; the f16 scales of each group's run (x4 layout, shared_gguf_matmul.h) set to 1.
      std::vector<uint8_t> w(static_cast<size_t>(n * (k / block[t]) * block_bytes[t]));
      for (auto& v : w) v = static_cast<uint8_t>(rng());
      const int64_t run = t == 0 ? 144 : t == 1 ? 272 : t == 2 ? 576 : 840, scales = t == 3 ? 4 : 8;
      for (int64_t at = 0; at + run <= static_cast<int64_t>(w.size()); at += run)
        for (int i = 0; i < scales; ++i) put_f16_one(w, at + 2 * i);
      for (int64_t m : {1, 8, 16, 64}) {
        // Activation rows (ActQ8x2 pairs or block_q8_K): random quants, float scales 0.01.
        const int64_t act_bytes = t < 2 ? k / 64 * 80 : k / 256 * 292, unit = t < 2 ? 80 : 292;
        std::vector<uint8_t> acts(static_cast<size_t>(m * act_bytes));
        for (auto& v : acts) v = static_cast<uint8_t>(rng() % 200);
        const float d[2] = {0.01f, 0.01f};
        for (int64_t at = 0; at < static_cast<int64_t>(acts.size()); at += unit)
          std::memcpy(&acts[at], d, t < 2 ? 8 : 4);
        std::vector<uint8_t> extras_a(static_cast<size_t>(m * (k / 64) * 64)), extras_b(extras_a.size());
        std::vector<float> y_a(static_cast<size_t>(m * n)), y_b(y_a.size());
        auto run_a = [&] {
          if (t < 2) a_extras(acts.data(), act_bytes, m, k, extras_a.data());
          a_x4(t, w.data(), k, acts.data(), act_bytes, extras_a.data(), m, y_a.data(), n, 0, n);
        };
        auto run_b = [&] {
          if (t < 2) b_extras(acts.data(), act_bytes, m, k, extras_b.data());
          b_x4(t, w.data(), k, acts.data(), act_bytes, extras_b.data(), m, y_b.data(), n, 0, n);
        };
        run_a();
        run_b();
        if (std::memcmp(y_a.data(), y_b.data(), y_a.size() * sizeof(float)) != 0) {
          std::printf("%s %ldx%ld M=%ld: the two revisions' outputs differ\n", names[t], long(n), long(k), long(m));
          return 1;
        }
        const int64_t calls = std::max<int64_t>(1, 100'000'000 / (m * n * k));
        std::vector<double> ta, tb;
        for (int turn = 0; turn < turns; ++turn) {
          double c = cpu_seconds();
          for (int64_t i = 0; i < calls; ++i) run_a();
          ta.push_back((cpu_seconds() - c) / calls);
          c = cpu_seconds();
          for (int64_t i = 0; i < calls; ++i) run_b();
          tb.push_back((cpu_seconds() - c) / calls);
        }
        std::sort(ta.begin(), ta.end());
        std::sort(tb.begin(), tb.end());
        const double gmac = double(m) * n * k / 1e9;
        std::printf("%s %ldx%ld M=%-3ld GMAC/s base %6.1f new %6.1f (best), %6.1f %6.1f (median); new/base %.2f, %.2f\n",
                    names[t], long(n), long(k), long(m), gmac / ta[0], gmac / tb[0], gmac / ta[turns / 2],
                    gmac / tb[turns / 2], ta[0] / tb[0], ta[turns / 2] / tb[turns / 2]);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
#endif
