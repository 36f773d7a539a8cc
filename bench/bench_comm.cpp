/*
bench_comm: Google Benchmark microbenchmarks of flashlm::comm: the ring allreduce over its shared-memory
transport, with one thread per rank in this process (each rank makes its own Ring with make_shm_ring, as
processes do), and the reduction kernel the ring runs at each step (reduce_add) alone, on the CPU and, in a
CUDA build with a GPU present, on the GPU.

Reference: exact arithmetic. Every value is a small integer, so sums and halves are exact in f32, bf16 and
f16, and each case's first call must give exactly (a + b) / 2 (reduce_add) or, on every rank, the sum over
ranks divided by their number, rounded once to the dtype (allreduce, ReduceOp::Avg). A mismatch skips the
case and the program exits 1.

What is measured
  allreduce_shm/<dtype>/ranks<N>/<KiB>KiB   a ReduceOp::Avg allreduce of a buffer of that size (1 MiB and
      64 MiB; --kib=) among N ranks (2; --ranks= adds another N), timed on rank 0; the other ranks run the
      same number of calls. An average of equal buffers gives them back, so the values stay put.
  reduce_add_cpu/<dtype>/<KiB>KiB           dst = (dst + src) / 2 over buffers of that size, in the calling
      thread (the ring's ranks each reduce their own slices), with the run-time ISA (--isa=).
  reduce_add_cuda/<dtype>/<KiB>KiB          the same on GPU 0, timed with CUDA events.

Columns
  algbw, busbw  allreduce: bytes of the buffer per second, and that times 2(N-1)/N, the bytes each rank
                sends and receives over the ring (nccl-tests' definitions).
  bytes         reduce_add: bytes moved per second (dst and src read, dst written).
  pct_copy      busbw as a percentage of one thread's memcpy (bytes copied per second: every byte a rank
                sends is copied once into shared memory and read once by its neighbour's reduction, so busbw
                near it means the ring adds little to the copies it needs); for reduce_add, bytes as a
                percentage of a copy moving as many bytes in one thread (on the GPU cudaMemcpyAsync). Both
                measured in the same run.
The peer comparison (torch.distributed's gloo, between processes) is bench/compare_comm.py; figures in
bench/results/comm.md.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j2 --target bench_comm
  build/bench/bench/bench_comm --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_comm --quick                                                     # smoke run
Own flags, taken out before Google Benchmark's: --kib=N, --ranks=N, --isa=scalar|avx2, --quick.
*/
#include <benchmark/benchmark.h>

#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench_check.h"
#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;
namespace comm = flashlm::comm;

int64_t g_kib = 64 << 10, g_ranks = 2;
constexpr int64_t kSmallKiB = 1024;

// The integers in [-32, 32] a rank (or a reduce_add operand) starts from: any 8 of them sum exactly in bf16.
std::vector<uint8_t> small_integers(int64_t n, DType t, int64_t seed) {
  std::vector<uint8_t> out(size_t(n * bench::elem_bytes(t)));
  for (int64_t i = 0; i < n; ++i) bench::store_float(out.data(), t, i, float((i * 7 + seed * 13) % 65 - 32));
  return out;
}

// --- reduce_add -------------------------------------------------------------------------------------------

struct ReduceCase {
  DType dtype;
  int64_t n;
  std::vector<uint8_t> dst, src;
  ReduceCase(DType t, int64_t kib)
      : dtype(t), n(kib * 1024 / bench::elem_bytes(t)), dst(small_integers(n, t, 1)), src(small_integers(n, t, 2)) {}
  double bytes() const { return 3.0 * double(dst.size()); }
  // dst after one call against (a + b) / 2, exact.
  std::string check(const std::vector<uint8_t>& after) const {
    std::vector<double> want(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      want[size_t(i)] = (double(bench::load_float(dst.data(), dtype, i)) + bench::load_float(src.data(), dtype, i)) / 2;
    return bench::compare("dst", bench::to_floats(after, dtype), want, 0.0, 0.0);
  }
};

std::string reduce_name(const std::string& device, DType t, int64_t kib) {
  return "reduce_add_" + device + "/" + bench::dtype_label(t) + "/" + std::to_string(kib) + "KiB";
}

void BM_reduce_add_cpu(benchmark::State& state, DType dtype, int64_t kib) {
  const ReduceCase c(dtype, kib);
  std::vector<uint8_t> dst = c.dst;
  const TensorView d = TensorView::contiguous(dst.data(), dtype, {c.n});
  const TensorView s = TensorView::contiguous(const_cast<uint8_t*>(c.src.data()), dtype, {c.n});
  auto run = [&] { comm::reduce_add(d, s, 2.0f); };
  try {
    run();  // the call that is checked; a clean skip for what this build does not serve
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  if (!bench::check_once(state, reduce_name("cpu", dtype, kib), [&] { return c.check(dst); })) return;
  const double seconds = bench::timed_loop(state, run);
  bench::set_bandwidth(state, c.bytes(), seconds, bench::cpu_copy_rate(int64_t(c.bytes() / 2), true));
}

#ifdef FLASHLM_WITH_CUDA
void BM_reduce_add_cuda(benchmark::State& state, DType dtype, int64_t kib) {
  try {
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    const ReduceCase c(dtype, kib);
    bench::DeviceBuffer dst(c.dst.data(), c.dst.size()), src(c.src.data(), c.src.size());
    const flashlm::Device gpu{flashlm::DeviceType::CUDA, 0};
    const TensorView d = TensorView::contiguous(dst.ptr, dtype, {c.n}, gpu);
    const TensorView s = TensorView::contiguous(src.ptr, dtype, {c.n}, gpu);
    bench::CudaTimer timer;
    auto run = [&] { comm::reduce_add(d, s, 2.0f, timer.stream); };
    timer.time(run);
    std::vector<uint8_t> after(c.dst.size());
    BENCH_CUDA_CHECK(cudaMemcpy(after.data(), dst.ptr, after.size(), cudaMemcpyDeviceToHost));
    if (!bench::check_once(state, reduce_name("cuda", dtype, kib), [&] { return c.check(after); })) return;
    const double seconds = bench::timed_loop_cuda(state, timer, run);
    bench::set_bandwidth(state, c.bytes(), seconds, bench::cuda_copy_rate(int64_t(c.bytes() / 2)));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // e.g. the CUDA kernels are not built
  }
}
#endif  // FLASHLM_WITH_CUDA

// --- the ring ---------------------------------------------------------------------------------------------

// Where the rank threads report their check and then wait for rank 0's word: time, or stop.
class Rendezvous {
 public:
  void report(const std::string& result) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failure_.empty()) failure_ = result;
    ++reported_;
    cv_.notify_all();
  }
  std::string wait_for_reports(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return reported_ == n; });
    return failure_;
  }
  void decide(bool go) {
    std::lock_guard<std::mutex> lock(mu_);
    decision_ = go ? 1 : 2;
    cv_.notify_all();
  }
  bool wait_for_decision() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return decision_ != 0; });
    return decision_ == 1;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int reported_ = 0, decision_ = 0;
  std::string failure_;
};

// One rank: its ring, its buffer (rank r's integers), and the check of the first allreduce.
struct Rank {
  DType dtype;
  int64_t n, world;
  std::unique_ptr<comm::Ring> ring;
  std::vector<uint8_t> buf;
  Rank(const std::string& job, int rank, DType t, int64_t n_, int64_t world_)
      : dtype(t), n(n_), world(world_), buf(small_integers(n_, t, rank)) {
    comm::RingOptions options;
    options.timeout_s = 20;  // a rank that fails leaves the others waiting this long at most
    ring = comm::make_shm_ring(job, rank, int(world), options);
  }
  void allreduce() { ring->allreduce(TensorView::contiguous(buf.data(), dtype, {n}), comm::ReduceOp::Avg); }
  // After the first allreduce: the exact sum over ranks divided by their number in f32, rounded once to the
  // dtype (the ring's sums of these integers are exact in every dtype).
  std::string check() const {
    std::vector<double> want(static_cast<size_t>(n));
    std::vector<uint8_t> rounded(static_cast<size_t>(bench::elem_bytes(dtype)));
    for (int64_t i = 0; i < n; ++i) {
      float sum = 0;
      for (int64_t r = 0; r < world; ++r) sum += float((i * 7 + r * 13) % 65 - 32);
      bench::store_float(rounded.data(), dtype, 0, sum / float(world));
      want[size_t(i)] = bench::load_float(rounded.data(), dtype, 0);
    }
    return bench::compare("rank " + std::to_string(ring->rank()), bench::to_floats(buf, dtype), want, 0.0, 0.0);
  }
};

std::string allreduce_name(DType t, int64_t world, int64_t kib) {
  return "allreduce_shm/" + std::string(bench::dtype_label(t)) + "/ranks" + std::to_string(world) + "/" +
         std::to_string(kib) + "KiB";
}

void BM_allreduce_shm(benchmark::State& state, DType dtype, int64_t world, int64_t kib) {
  static int job_counter = 0;  // every Ring needs segments of its own
  const std::string job = "bench-" + std::to_string(getpid()) + "-" + std::to_string(job_counter++);
  const int64_t n = kib * 1024 / bench::elem_bytes(dtype);
  const auto iterations = state.max_iterations;  // the other ranks run as many calls as rank 0's loop
  Rendezvous rendezvous;
  std::vector<std::thread> others;
  for (int r = 1; r < world; ++r) {
    others.emplace_back([&, r] {
      std::unique_ptr<Rank> rank;
      std::string result;
      try {
        rank = std::make_unique<Rank>(job, r, dtype, n, world);
        rank->allreduce();
        result = rank->check();
      } catch (const std::exception& e) {
        result = std::string("rank ") + std::to_string(r) + ": " + e.what();
        rank.reset();
      }
      rendezvous.report(result);
      if (!rendezvous.wait_for_decision() || !rank) return;
      try {
        for (benchmark::IterationCount i = 0; i < iterations; ++i) rank->allreduce();
      } catch (const std::exception&) {
        // the ring is aborted on every rank: rank 0's loop raises and reports it
      }
    });
  }
  std::unique_ptr<Rank> rank0;
  std::string result, error;
  try {
    rank0 = std::make_unique<Rank>(job, 0, dtype, n, world);
    rank0->allreduce();
    result = rank0->check();
  } catch (const std::exception& e) {
    error = e.what();
  }
  const std::string others_result = rendezvous.wait_for_reports(int(world - 1));
  if (result.empty()) result = others_result;
  const bool go = error.empty() && bench::check_once(state, allreduce_name(dtype, world, kib), [&] { return result; });
  rendezvous.decide(go);
  if (!error.empty()) state.SkipWithError(error.c_str());
  double seconds = 0;
  if (go) {
    try {
      seconds = bench::timed_loop(state, [&] { rank0->allreduce(); });
    } catch (const std::exception& e) {
      state.SkipWithError(e.what());
    }
  }
  for (std::thread& t : others) t.join();
  if (!go || seconds <= 0) return;
  const double bytes = double(n * bench::elem_bytes(dtype)), iters = double(state.iterations());
  const double bus_bytes = iters * bytes * 2.0 * double(world - 1) / double(world);
  state.counters["algbw"] = benchmark::Counter(iters * bytes, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["busbw"] = benchmark::Counter(bus_bytes, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["pct_copy"] = 100.0 * bus_bytes / seconds / (bench::cpu_copy_rate(int64_t(bytes), true) / 2);
}

// --- registration -------------------------------------------------------------------------------------------

void register_all() {
  const std::vector<int64_t> sizes = {bench::quick() ? 64 : kSmallKiB, g_kib};
  std::vector<int64_t> worlds = {2};
  if (g_ranks != 2) worlds.push_back(g_ranks);
  for (DType t : {DType::F32, DType::BF16})
    for (int64_t world : worlds)
      for (int64_t kib : sizes)
        bench::register_case(allreduce_name(t, world, kib), false, benchmark::kMillisecond, BM_allreduce_shm, t, world,
                             kib);
  for (DType t : {DType::F32, DType::BF16})
    for (int64_t kib : sizes)
      bench::register_case(reduce_name("cpu", t, kib), false, benchmark::kMicrosecond, BM_reduce_add_cpu, t, kib);
  bench::register_cuda_and_context([&] {
#ifdef FLASHLM_WITH_CUDA
    for (DType t : {DType::F32, DType::F16, DType::BF16})
      for (int64_t kib : sizes)
        bench::register_case(reduce_name("cuda", t, kib), true, benchmark::kMicrosecond, BM_reduce_add_cuda, t, kib);
#endif
  });
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_kib = 1024;
  return bench::take_flags(argc, argv, "bench_comm",
                           {{"kib", &g_kib, 1, int64_t{1} << 24}, {"ranks", &g_ranks, 2, 64}});
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
