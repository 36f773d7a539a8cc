/*
int8_peak: this CPU's int8 multiply-add ceiling, measured with tight loops of independent dot-product
instructions on every core (one thread per core, all at once), the figure the GGUF GEMM's GMAC/s is set
against (bench/results/gguf_matmul.md).

  avx2    vpmaddubsw + vpmaddwd (ymm): 32 u8 x s8 products into 8 int32 sums, two instructions, as the AVX2
          kernels multiply (their int16 add and offset subtraction come on top);
  vnni    vpdpbusd (zmm, AVX-512 VNNI): 64 products into 16 int32 sums, one instruction;
  vnni + GEMV rounding
          what the regrouped Q4_0 / Q8_0 kernel (csrc/gemm/repack_x4_vnni.cpp) must issue per 16 int32 lanes to
          keep the plain GEMV's rounding: two vpdpbusd (a lane sums 8 products), then the lane's conversion to
          float, the scale product (weight x activation scale) and the FMA into its float accumulator; the
          chain's start (the offset) comes from memory, as in the kernel. Its ceiling, not the vpdpbusd one,
          is what that kernel can reach;
  vnni maddubs + dpwssd
          the K-quant kernels' integer step (repack_x4k_vnni.cpp): vpmaddubsw into int16 pair sums, then
          vpdpwssd times the sub-block scale into int32, two instructions per 64 products.

12 independent chains (8 in the GEMV-rounding loop) hide the latency. Multiply-adds per second over all threads, by the wall clock and by
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
constexpr int kChains = 8;  // the GEMV-rounding loop's float accumulators: they and the temporaries fit the 32 zmm

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

__attribute__((target("avx512f,avx512bw,avx512vnni"))) long vnni_gemv_rounding_loop(int seed) {
  alignas(64) int32_t start[kChains][16];
  alignas(64) float scale[kChains][16];
  for (int i = 0; i < kChains; ++i)
    for (int j = 0; j < 16; ++j) start[i][j] = -8 * (i + j + seed), scale[i][j] = 1e-3f * float(i + 1);
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i w0 = _mm512_set1_epi8(3), w1 = _mm512_set1_epi8(5), y0 = _mm512_set1_epi8(-2), y1 = _mm512_set1_epi8(7);
  const __m512 dw = _mm512_set1_ps(0.5f);
  for (long it = 0; it < kIters; ++it) {
    asm volatile("" ::: "memory");  // the starts and scales are loaded again each iteration, as in the kernel
    for (int i = 0; i < kChains; ++i) {
      const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_load_si512(start[i]), w0, y0), w1, y1);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_load_ps(scale[i])), acc[i]);
    }
  }
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm_cvtss_f32(_mm512_castps512_ps128(acc[i]));
  return static_cast<long>(sum);  // 128 products per chain per iteration
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) long vnni_maddubs_dpwssd_loop(int seed) {
  __m512i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_epi32(i + seed);
  const __m512i s = _mm512_set1_epi8(-2), scale = _mm512_set1_epi16(3);
  for (long it = 0; it < kIters; ++it)
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpwssd_epi32(acc[i], _mm512_maddubs_epi16(acc[i], s), scale);
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
void run(const char* name, long (*loop)(int), int threads, double macs_per_iter) {
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
  const double macs = double(threads) * kIters * macs_per_iter;
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
  if (__builtin_cpu_supports("avx2")) run("avx2 maddubs+madd (ymm)", avx2_loop, threads, 32 * kAcc);
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
    run("avx512 vnni vpdpbusd (zmm)", vnni_loop, threads, 64 * kAcc);
    run("vnni + GEMV rounding (zmm)", vnni_gemv_rounding_loop, threads, 128 * kChains);
    run("vnni maddubs + dpwssd (zmm)", vnni_maddubs_dpwssd_loop, threads, 64 * kAcc);
  }
  return 0;
}
