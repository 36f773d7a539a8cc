/*
int8_peak: this CPU's int8 multiply-add ceiling, measured with tight loops of independent dot-product
instructions on every core (one thread per core, all at once), the figure the GGUF GEMM's GMAC/s is set
against (bench/results/gguf_matmul.md).

  avx2    vpmaddubsw + vpmaddwd (ymm): 32 u8 x s8 products into 8 int32 sums, two instructions, as the AVX2
          kernels multiply (their int16 add and offset subtraction come on top);
  vnni    vpdpbusd (zmm, AVX-512 VNNI): 64 products into 16 int32 sums, one instruction.

12 independent chains hide the latency. Multiply-adds per second over all threads, by the wall clock and by
the threads' own CPU time (the ceiling of the cores when other jobs share them).

Build and run (from the repository root):
  g++ -O3 -std=c++17 -pthread bench/int8_peak.cpp -o build/int8_peak
  build/int8_peak [threads]      # default: std::thread::hardware_concurrency()
Checks the CPU (__builtin_cpu_supports) before running each loop.
*/
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <thread>
#include <vector>

namespace {

constexpr int kAcc = 12;  // a constant trip count: -O3 unrolls it and keeps every chain in a register
constexpr long kIters = 20'000'000;

__attribute__((target("avx2"))) long avx2_loop(int seed) {
  __m256i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_epi32(i + seed);
  const __m256i s = _mm256_set1_epi8(-2), one = _mm256_set1_epi16(1);
  // Each product feeds the next one's bytes, so nothing can be hoisted out of the loop.
  for (long it = 0; it < kIters; ++it)
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(acc[i], s), one);
  long sum = 0;
  for (int i = 0; i < kAcc; ++i) sum += _mm256_extract_epi32(acc[i], 0);
  return sum;  // 32 products per accumulator per iteration
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) long vnni_loop(int seed) {
  __m512i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_epi32(i + seed);
  const __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-2);
  for (long it = 0; it < kIters; ++it)
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], u, s);
  long sum = 0;
  for (int i = 0; i < kAcc; ++i) sum += _mm_cvtsi128_si32(_mm512_castsi512_si128(acc[i]));
  return sum;  // 64 products per accumulator per iteration
}

double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Prints multiply-adds per second of wall time over all threads, and per second of each thread's own CPU
// time times the thread count: on a machine shared with other jobs the second is what the cores can do.
void run(const char* name, long (*loop)(int), int threads, double macs_per_iter_acc) {
  std::vector<std::thread> pool;
  std::vector<long> sink(threads);
  std::vector<double> cpu(threads);
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      const double c0 = thread_cpu_seconds();
      sink[t] = loop(t);
      cpu[t] = thread_cpu_seconds() - c0;
    });
  for (auto& th : pool) th.join();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  long keep = 0;
  double cpu_total = 0;
  for (int t = 0; t < threads; ++t) keep += sink[t], cpu_total += cpu[t];
  if (keep == 42) std::puts("");  // keeps the loops' results alive
  const double macs = double(threads) * kIters * kAcc * macs_per_iter_acc;
  std::printf("%-28s %7.1f GMAC/s wall, %7.1f GMAC/s per CPU-second x %d threads\n", name, macs / wall / 1e9,
              macs / cpu_total * threads / 1e9, threads);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  if (threads < 1 || threads > 1024) {
    std::fprintf(stderr, "int8_peak: error: threads must be in [1, 1024], got %s\n", argv[1]);
    return 2;
  }
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) run("avx2 maddubs+madd (ymm)", avx2_loop, threads, 32);
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
    run("avx512 vnni vpdpbusd (zmm)", vnni_loop, threads, 64);
  return 0;
}
