/*
bench_attention: Google Benchmark microbenchmarks of flashlm::flash_attention_forward/backward on the CPU
(f32, bf16) and, in a CUDA build with a GPU present, on the GPU (f16, bf16), reported in FLOP/s.

What is measured
  attn_cpu/<pass>/<dtype>/S<S>/D<D>/<mask>   batch 1, 16 heads (--heads=), Sq = Sk = S, [B, S, H, D] inputs
      pass: fwd_v1 (FlashAttention-1 loop order), fwd_v2 (FlashAttention-2), bwd (FA2 backward; out and lse
      from one forward run beforehand); mask: full or causal. On the library's thread pool
      (FLASHLM_NUM_THREADS or --threads=) with the run-time ISA (--isa=).
  attn_cuda/<pass>/<dtype>/...               the same on GPU 0, timed with CUDA events (fwd_v2 and bwd).
  The CUDA benchmarks are only registered when the build has CUDA and cuda_device_count() > 0; the
  context line flashlm_cuda says why they are missing otherwise.

Columns
  FLOPS   the matmul FLOPs per second (decimal): forward 4 B H S^2 D (half of it under a causal mask), backward
          2.5 times the forward (its five matmuls against two). Hold it against a large f32 matmul on the same
          machine (bench/compare_attention.py prints one, and torch SDPA's figures, in the same run).

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF   # or ON
  cmake --build build/bench -j2 --target bench_attention
  build/bench/bench/bench_attention --threads=2 --benchmark_repetitions=5 \
      --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true   # medians
  build/bench/bench/bench_attention --benchmark_filter='fwd_v2/f32/S2048'                   # a subset
  build/bench/bench/bench_attention --quick            # smoke run: 2 heads, S = 512, --benchmark_min_time=0.01
  (libbenchmark 1.7 takes --benchmark_min_time in plain seconds, without the "s" suffix of 1.8.)
Own flags, taken out before Google Benchmark's: --heads=N (default 16), --threads=N, --isa=scalar|avx2, --quick.
*/
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;

int64_t g_heads = 16;
constexpr int kBatch = 1;

enum class Pass { FwdV1, FwdV2, Bwd };

const char* pass_name(Pass p) { return p == Pass::FwdV1 ? "fwd_v1" : p == Pass::FwdV2 ? "fwd_v2" : "bwd"; }
const char* dtype_label(DType t) { return t == DType::F32 ? "f32" : t == DType::BF16 ? "bf16" : "f16"; }
int64_t elem_bytes(DType t) { return t == DType::F32 ? 4 : 2; }

// The matmul FLOPs of one pass over B x H x S x S scores of head dimension D.
double attention_flops(Pass pass, int64_t s, int64_t d, bool causal) {
  const double pairs = causal ? double(s) * double(s + 1) / 2 : double(s) * double(s);
  const double fwd = 4.0 * kBatch * g_heads * pairs * double(d);
  return pass == Pass::Bwd ? 2.5 * fwd : fwd;
}

void set_flops(benchmark::State& state, double flops_per_iter) {
  state.counters["FLOPS"] = benchmark::Counter(flops_per_iter * double(state.iterations()),
                                               benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

// Random values in [-1, 1) stored as f32, bf16 or f16 bits (round to nearest; the values need no care).
uint16_t f32_to_half_bits(float f, DType t) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if (t == DType::BF16) return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
  // f16 of a value in [-1, 1): sign, exponent and mantissa rebiased (small values flush to 0).
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int exp = int((x >> 23) & 0xFF) - 127 + 15;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | (uint32_t(exp) << 10) | ((x >> 13) & 0x3FFu));
}

std::vector<uint8_t> random_tensor(int64_t n, DType t, uint64_t seed) {
  std::vector<uint8_t> data(static_cast<size_t>(n * elem_bytes(t)));
  bench::SplitMix64 rng{seed};
  for (int64_t i = 0; i < n; ++i) {
    const float f = float(rng.next() >> 40) / float(1 << 23) - 1.f;
    if (t == DType::F32) {
      std::memcpy(data.data() + i * 4, &f, 4);
    } else {
      const uint16_t h = f32_to_half_bits(f, t);
      std::memcpy(data.data() + i * 2, &h, 2);
    }
  }
  return data;
}

// The buffers of one problem on one device (host vectors; the CUDA path copies them to the device).
struct Problem {
  int64_t s, d;
  DType dtype;
  std::vector<uint8_t> q, k, v, dout, out, dq, dk, dv;
  std::vector<float> lse, delta;
  Problem(int64_t s_, int64_t d_, DType t) : s(s_), d(d_), dtype(t) {
    const int64_t n = kBatch * s * g_heads * d;
    q = random_tensor(n, t, 1);
    k = random_tensor(n, t, 2);
    v = random_tensor(n, t, 3);
    dout = random_tensor(n, t, 4);
    out.assign(q.size(), 0);
    dq.assign(q.size(), 0);
    dk.assign(q.size(), 0);
    dv.assign(q.size(), 0);
    lse.assign(static_cast<size_t>(kBatch * g_heads * s), 0.f);
    delta.assign(lse.size(), 0.f);
  }
};

flashlm::AttentionOptions options(int64_t d, bool causal, int version) {
  flashlm::AttentionOptions o;
  o.softmax_scale = 1.f / std::sqrt(float(d));
  o.causal = causal;
  o.version = version;
  return o;
}

// Forward and backward parameters over the given pointers (host or device) in [B, S, H, D] layout.
struct Views {
  flashlm::AttentionForwardParams fwd;
  flashlm::AttentionBackwardParams bwd;
};

Views make_views(int64_t s, int64_t d, DType t, void* q, void* k, void* v, void* out, float* lse, void* dout, void* dq,
                 void* dk, void* dv, float* delta, bool causal, int version, flashlm::Device device) {
  auto qkv = [&](void* p) { return flashlm::TensorView::contiguous(p, t, {kBatch, s, g_heads, d}, device); };
  auto stats = [&](float* p) { return flashlm::TensorView::contiguous(p, DType::F32, {kBatch, g_heads, s}, device); };
  Views w;
  w.fwd.q = qkv(q), w.fwd.k = qkv(k), w.fwd.v = qkv(v), w.fwd.out = qkv(out), w.fwd.lse = stats(lse);
  w.fwd.options = options(d, causal, version);
  w.bwd.q = w.fwd.q, w.bwd.k = w.fwd.k, w.bwd.v = w.fwd.v, w.bwd.out = w.fwd.out, w.bwd.lse = w.fwd.lse;
  w.bwd.dout = qkv(dout), w.bwd.dq = qkv(dq), w.bwd.dk = qkv(dk), w.bwd.dv = qkv(dv), w.bwd.delta = stats(delta);
  w.bwd.options = options(d, causal, 2);
  return w;
}

// --- CPU --------------------------------------------------------------------------------------------------

void BM_attention_cpu(benchmark::State& state, Pass pass, DType dtype, int64_t s, int64_t d, bool causal) {
  Problem pr(s, d, dtype);
  const Views w = make_views(s, d, dtype, pr.q.data(), pr.k.data(), pr.v.data(), pr.out.data(), pr.lse.data(),
                             pr.dout.data(), pr.dq.data(), pr.dk.data(), pr.dv.data(), pr.delta.data(), causal,
                             pass == Pass::FwdV1 ? 1 : 2, flashlm::Device{});
  auto run = [&] {
    if (pass == Pass::Bwd) flashlm::flash_attention_backward(w.bwd);
    else flashlm::flash_attention_forward(w.fwd);
  };
  try {
    flashlm::flash_attention_forward(w.fwd);  // out and lse for the backward; warm-up
    run();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_flops(state, attention_flops(pass, s, d, causal));
}

// --- CUDA -------------------------------------------------------------------------------------------------

#ifdef FLASHLM_WITH_CUDA
using bench::CudaTimer;
using bench::DeviceBuffer;

void BM_attention_cuda(benchmark::State& state, Pass pass, DType dtype, int64_t s, int64_t d, bool causal) {
  try {
    BENCH_CUDA_CHECK(cudaSetDevice(0));
    Problem pr(s, d, dtype);
    const size_t bytes = pr.q.size(), stat_bytes = pr.lse.size() * 4;
    DeviceBuffer q(pr.q.data(), bytes), k(pr.k.data(), bytes), v(pr.v.data(), bytes), dout(pr.dout.data(), bytes);
    DeviceBuffer out(bytes), dq(bytes), dk(bytes), dv(bytes), lse(stat_bytes), delta(stat_bytes);
    const Views w = make_views(s, d, dtype, q.ptr, k.ptr, v.ptr, out.ptr, static_cast<float*>(lse.ptr), dout.ptr,
                               dq.ptr, dk.ptr, dv.ptr, static_cast<float*>(delta.ptr), causal, 2,
                               flashlm::Device{flashlm::DeviceType::CUDA, 0});
    CudaTimer timer;
    auto run = [&] {
      if (pass == Pass::Bwd) flashlm::flash_attention_backward(w.bwd, timer.stream);
      else flashlm::flash_attention_forward(w.fwd, timer.stream);
    };
    timer.time([&] { flashlm::flash_attention_forward(w.fwd, timer.stream); });
    for (int i = 0; i < 3; ++i) timer.time(run);  // warm-up (module load, clocks)
    for (auto _ : state) state.SetIterationTime(timer.time(run));
    set_flops(state, attention_flops(pass, s, d, causal));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // e.g. the CUDA kernels are not built
  }
}

#endif  // FLASHLM_WITH_CUDA

// --- registration -----------------------------------------------------------------------------------------

using AttentionBench = void (*)(benchmark::State&, Pass, DType, int64_t, int64_t, bool);

// One device's set: every pass x dtype x S x D x mask. CPU runs are timed by the wall clock, CUDA runs by
// the events each benchmark records (manual time).
void register_device(const std::string& device, AttentionBench bench, std::initializer_list<Pass> passes,
                     std::initializer_list<DType> dtypes, bool manual_time) {
  for (Pass pass : passes)
    for (DType dtype : dtypes)
      for (int64_t s : bench::quick() ? std::vector<int64_t>{512} : std::vector<int64_t>{512, 2048})
        for (int64_t d : {64, 128})
          for (bool causal : {false, true}) {
            const std::string name = "attn_" + device + "/" + pass_name(pass) + "/" + dtype_label(dtype) + "/S" +
                                     std::to_string(s) + "/D" + std::to_string(d) + "/" + (causal ? "causal" : "full");
            auto* b = benchmark::RegisterBenchmark(name.c_str(), bench, pass, dtype, s, d, causal);
            b->Unit(benchmark::kMillisecond);
            manual_time ? b->UseManualTime() : b->UseRealTime();
          }
}

void register_all() {
  register_device("cpu", BM_attention_cpu, {Pass::FwdV1, Pass::FwdV2, Pass::Bwd}, {DType::F32, DType::BF16}, false);

  bench::register_cuda_and_context([] {
#ifdef FLASHLM_WITH_CUDA
    register_device("cuda", BM_attention_cuda, {Pass::FwdV2, Pass::Bwd}, {DType::F16, DType::BF16}, true);
#endif
  });
  benchmark::AddCustomContext("flashlm_shape", "B=1 H=" + std::to_string(g_heads) + " Sq=Sk=S [B, S, H, D]");
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) g_heads = 2;  // and S = 512 alone (register_device)
  return bench::take_flags(argc, argv, "bench_attention", {{"heads", &g_heads, 1, 4096}});
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
