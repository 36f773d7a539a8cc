/*
bench_kvcache: Google Benchmark microbenchmarks of flashlm::paged_attention decode on the CPU (f32, bf16) and,
in a CUDA build with a GPU present, on the GPU (f16, bf16), reported as K/V bytes read per second.

What is measured
  paged_cpu/<dtype>/B<B>/ctx<C>/splits<N>   B sequences of C cached tokens each, one query per sequence,
      H=32 query heads over Hkv=8 K/V heads (--heads=, --kv-heads=), D=128, blocks of 16 tokens whose order
      in the cache is shuffled. splits 0 is the library's choice. On the library's thread pool
      (FLASHLM_NUM_THREADS or --threads=) with the run-time ISA (--isa=).
  paged_cuda/<dtype>/...                     the same on GPU 0, timed with CUDA events.

Columns
  KV_bytes   bytes of K and V read per second (decimal): decode is bounded by memory bandwidth, so hold it
             against the machine's copy bandwidth (bench/compare_kvcache.py prints one, and torch's figures).

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j2 --target bench_kvcache
  build/bench/bench/bench_kvcache --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_kvcache --quick            # smoke run: H=4 Hkv=2, context 512, --benchmark_min_time=0.01
Own flags, taken out before Google Benchmark's: --heads=N, --kv-heads=N, --threads=N, --isa=scalar|avx2, --quick.
*/
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;

int64_t g_heads = 32, g_kv_heads = 8;
constexpr int64_t kHeadDim = 128, kBlockSize = 16;

int64_t elem_bytes(DType t) { return t == DType::F32 ? 4 : 2; }

// Bytes of n elements of small pseudo-random values: f32 as is, f16/bf16 as the top bits of an f32 in
// [-1, 1) (bf16) or a plain f16 bit pattern of magnitude < 1 (f16). Their values do not matter here.
std::vector<uint8_t> filled(int64_t n, DType t, uint64_t seed) {
  std::vector<uint8_t> out(size_t(n * elem_bytes(t)));
  bench::SplitMix64 rng{seed};
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t r = rng.next();
    if (t == DType::F32) {
      const float f = float(int32_t(r >> 40) - (1 << 23)) / float(1 << 23);
      std::memcpy(&out[size_t(i) * 4], &f, 4);
    } else {
      const uint16_t h = t == DType::BF16 ? uint16_t(0x3C00u | (r & 0x7Fu) | ((r >> 8) & 0x8000u))   // +-2^-7..
                                          : uint16_t(0x2C00u | (r & 0x3FFu) | ((r >> 16) & 0x8000u));  // f16 +-2^-4..
      std::memcpy(&out[size_t(i) * 2], &h, 2);
    }
  }
  return out;
}

// One decode problem in host memory: caches, a shuffled block table, full-length sequences, queries.
struct Problem {
  int64_t batch, context, blocks_per_seq, num_blocks;
  DType dtype;
  std::vector<uint8_t> q, k_cache, v_cache, out;
  std::vector<int32_t> table, seq_lens;
  Problem(int64_t b, int64_t c, DType t) : batch(b), context(c), dtype(t) {
    blocks_per_seq = (c + kBlockSize - 1) / kBlockSize;
    num_blocks = b * blocks_per_seq;
    const int64_t cache_elems = num_blocks * kBlockSize * g_kv_heads * kHeadDim;
    k_cache = filled(cache_elems, t, 1);
    v_cache = filled(cache_elems, t, 2);
    q = filled(b * g_heads * kHeadDim, t, 3);
    out.assign(q.size(), 0);
    table.resize(size_t(num_blocks));
    for (int64_t i = 0; i < num_blocks; ++i) table[size_t(i)] = int32_t(i);
    bench::SplitMix64 rng{4};
    for (int64_t i = num_blocks - 1; i > 0; --i) std::swap(table[size_t(i)], table[size_t(rng.next() % uint64_t(i + 1))]);
    seq_lens.assign(size_t(b), int32_t(c));
  }
  double kv_bytes() const { return 2.0 * double(batch * context * g_kv_heads * kHeadDim * elem_bytes(dtype)); }
};

// Params over the given pointers (host or device).
flashlm::PagedAttentionParams params(const Problem& pr, void* q, void* kc, void* vc, void* table, void* lens, void* out,
                                     int splits, flashlm::Device device) {
  flashlm::PagedAttentionParams a;
  a.q = TensorView::contiguous(q, pr.dtype, {pr.batch, g_heads, kHeadDim}, device);
  a.out = TensorView::contiguous(out, pr.dtype, {pr.batch, g_heads, kHeadDim}, device);
  a.k_cache = TensorView::contiguous(kc, pr.dtype, {pr.num_blocks, kBlockSize, g_kv_heads, kHeadDim}, device);
  a.v_cache = TensorView::contiguous(vc, pr.dtype, {pr.num_blocks, kBlockSize, g_kv_heads, kHeadDim}, device);
  a.block_table = TensorView::contiguous(table, DType::I32, {pr.batch, pr.blocks_per_seq}, device);
  a.seq_lens = TensorView::contiguous(lens, DType::I32, {pr.batch}, device);
  a.options.softmax_scale = 1.f / std::sqrt(float(kHeadDim));
  a.num_splits = splits;
  return a;
}

void set_rate(benchmark::State& state, double bytes_per_iter) {
  state.counters["KV_bytes"] = benchmark::Counter(bytes_per_iter * double(state.iterations()),
                                                  benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

void BM_paged_cpu(benchmark::State& state, DType dtype, int64_t batch, int64_t context, int splits) {
  Problem pr(batch, context, dtype);
  const auto a = params(pr, pr.q.data(), pr.k_cache.data(), pr.v_cache.data(), pr.table.data(), pr.seq_lens.data(),
                        pr.out.data(), splits, flashlm::Device{});
  try {
    flashlm::paged_attention(a);  // warm-up
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    flashlm::paged_attention(a);
    benchmark::ClobberMemory();
  }
  set_rate(state, pr.kv_bytes());
}

#ifdef FLASHLM_WITH_CUDA
using bench::CudaTimer;
using bench::DeviceBuffer;

void BM_paged_cuda(benchmark::State& state, DType dtype, int64_t batch, int64_t context, int splits) {
  try {
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    Problem pr(batch, context, dtype);
    DeviceBuffer q(pr.q.data(), pr.q.size()), kc(pr.k_cache.data(), pr.k_cache.size()),
        vc(pr.v_cache.data(), pr.v_cache.size()), out(pr.out.size()),
        table(pr.table.data(), pr.table.size() * 4), lens(pr.seq_lens.data(), pr.seq_lens.size() * 4);
    const auto a = params(pr, q.ptr, kc.ptr, vc.ptr, table.ptr, lens.ptr, out.ptr, splits,
                          flashlm::Device{flashlm::DeviceType::CUDA, 0});
    CudaTimer timer;
    auto run = [&] { flashlm::paged_attention(a, timer.stream); };
    for (int i = 0; i < 3; ++i) timer.time(run);  // warm-up (module load, clocks)
    for (auto _ : state) state.SetIterationTime(timer.time(run));
    set_rate(state, pr.kv_bytes());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // e.g. the CUDA kernels are not built
  }
}
#endif  // FLASHLM_WITH_CUDA

using PagedBench = void (*)(benchmark::State&, DType, int64_t, int64_t, int);

void register_device(const std::string& device, PagedBench bench, std::initializer_list<DType> dtypes,
                     bool manual_time) {
  for (DType dtype : dtypes)
    for (int64_t batch : {1, 8})
      for (int64_t context : bench::quick() ? std::vector<int64_t>{512} : std::vector<int64_t>{512, 2048, 8192})
        for (int splits : {0, 1}) {
          const char* label = dtype == DType::F32 ? "f32" : dtype == DType::BF16 ? "bf16" : "f16";
          const std::string name = "paged_" + device + "/" + label + "/B" + std::to_string(batch) + "/ctx" +
                                   std::to_string(context) + "/splits" + std::to_string(splits);
          auto* b = benchmark::RegisterBenchmark(name.c_str(), bench, dtype, batch, context, splits);
          b->Unit(benchmark::kMillisecond);
          manual_time ? b->UseManualTime() : b->UseRealTime();
        }
}

void register_all() {
  register_device("cpu", BM_paged_cpu, {DType::F32, DType::BF16}, false);
  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    register_device("cuda", BM_paged_cuda, {DType::F16, DType::BF16}, true);
#endif
  });
  benchmark::AddCustomContext("flashlm_shape", "H=" + std::to_string(g_heads) + " Hkv=" + std::to_string(g_kv_heads) +
                                                   " D=128 block_size=16, decode");
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_heads = 4, g_kv_heads = 2;  // and context 512 alone (register_device)
  if (!bench::take_flags(argc, argv, "bench_kvcache",
                         {{"heads", &g_heads, 1, 1024}, {"kv-heads", &g_kv_heads, 1, 1024}}))
    return false;
  if (g_heads % g_kv_heads != 0) {
    std::fprintf(stderr, "bench_kvcache: --kv-heads must divide --heads\n");
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
