/*
bench_decode: Google Benchmark microbenchmarks of flashlm::runtime::Decoder, the native Llama-family decoder
stack (runtime/decoder.h), on random Q4_0 and Q8_0 weights of a small llama shape: whole steps, embedding to
logits, on the CPU, reported as tokens and weight bytes per second.

The model (compare_decode.py's default shape): d_model 768, 12 layers, 12 query heads over 4 K/V heads of 64,
d_ff 2048, vocab 4096, untied head; every linear, the embedding and the head in the type under test (blocks
of random quants whose f16 scales give weights of standard deviation ~ 1/sqrt(K)); a bf16 paged KV cache in
blocks of 16 tokens, as the runtime keeps it.

Reference: before a type is timed, a 4-token prefill's last logits are checked against a plain forward pass
in double over the dequantized weights (flashlm::dequantize), with K, V, q and the attention output rounded
to bf16 where the decoder rounds them. The decoder's matmuls quantize their activations to 8 bits, each
~0.5% off; through the model the logits stay within 5% (norm-wise; a wrong layout or rotation is ~100%). A
mismatch skips the type and the program exits 1.

What is measured
  decode/<type>/ctx<C>     one token at position C (128; --context=) after C cached ones, one sequence:
                           Decoder::logits for one row, as the runtime's decode step.
  prefill/<type>/T<P>      a prompt of P tokens (128; --prompt=) from position 0, the last row's logits.
Both on the library's thread pool (FLASHLM_NUM_THREADS or --threads=) with the run-time ISA (--isa=).

Columns
  tokens    tokens per second.
  bytes     weight bytes read per second (every linear and the head once per step; decimal), the figure that
            bounds decode, which reads each weight once per token.
  pct_copy  bytes as a percentage of a copy moving as many bytes, measured in the same run (a memcpy over the
            same pool).
The peer comparison (llama.cpp through llama-cpp-python, on the same GGUF files) is bench/compare_decode.py;
figures in bench/results/decode.md.

Build and run (from the repository root)
  cmake -S . -B build/bench -DFLASHLM_BUILD_BENCH=ON -DFLASHLM_BUILD_PYTHON=OFF -DFLASHLM_CUDA=OFF
  cmake --build build/bench -j2 --target bench_decode
  build/bench/bench/bench_decode --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  build/bench/bench/bench_decode --quick                                                   # smoke run
Own flags, taken out before Google Benchmark's: --layers=N, --context=N, --prompt=N, --threads=N,
--isa=scalar|avx2, --quick (a 2-layer d_model 128 model).
*/
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "bench_check.h"
#include "bench_common.h"
#include "flashlm/flashlm.h"

namespace {

using flashlm::DType;
using flashlm::TensorView;
namespace rt = flashlm::runtime;

struct Shape {
  int64_t d = 768, layers = 12, heads = 12, kv_heads = 4, head_dim = 64, d_ff = 2048, vocab = 4096;
};
Shape g_shape;
int64_t g_context = 128, g_prompt = 128;
constexpr int64_t kBlockSize = 16, kCheckTokens = 4;
constexpr double kRopeTheta = 10000.0;

// --- the model ------------------------------------------------------------------------------------------

// n x k of `type` (Q4_0 or Q8_0, an f16 scale at the start of each block): random quants, scales of random
// sign and magnitude in [0.5, 1) x (std / the quants' standard deviation).
std::vector<uint8_t> random_matrix(DType type, int64_t n, int64_t k, double std, uint64_t seed) {
  const flashlm::DTypeInfo& info = flashlm::dtype_info(type);
  std::vector<uint8_t> w(size_t(flashlm::storage_bytes(type, n * k)));
  bench::SplitMix64 rng{seed};
  for (auto& byte : w) byte = uint8_t(rng.next());
  const double quant_std = type == DType::Q4_0 ? 4.6 : 73.9;  // uniform over -8..7 or -128..127
  for (size_t b = 0; b < w.size(); b += size_t(info.block_bytes)) {
    const uint64_t r = rng.next();
    const double scale = (0.5 + double(r >> 12) * 0x1p-53) * std / quant_std;
    bench::store_float(&w[b], DType::F16, 0, float((r & 1) ? -scale : scale));
  }
  return w;
}

std::vector<float> norm_weight(int64_t d, uint64_t seed) {
  const bench::Values v = bench::random_values(d, DType::F32, -5, -3, seed);  // 1 + a few percent
  std::vector<float> w(v.values);
  for (float& x : w) x += 1.0f;
  return w;
}

struct Linear {
  int64_t n, k;
  std::vector<uint8_t> w;
};

// Every buffer of the model and the decoder built over them, for one weight type.
struct Model {
  DType type;
  Shape s;
  std::vector<std::vector<float>> norms;  // per layer: attention, MLP; then the final norm
  std::vector<Linear> linears;            // per layer: q, k, v, o, gate, up, down; then the head
  std::vector<uint8_t> embedding;
  std::unique_ptr<rt::Decoder> decoder;
  double weight_bytes = 0;  // what one step reads: every linear and the head

  Model(DType t, const Shape& shape) : type(t), s(shape) {
    const int64_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
    uint64_t seed = 100;
    for (int64_t l = 0; l < s.layers; ++l) {
      norms.push_back(norm_weight(s.d, seed++));
      norms.push_back(norm_weight(s.d, seed++));
      const int64_t dims[7][2] = {{qd, s.d},     {kvd, s.d},    {kvd, s.d},   {s.d, qd},
                                  {s.d_ff, s.d}, {s.d_ff, s.d}, {s.d, s.d_ff}};
      for (const auto& nk : dims)  // q, k, v, o, gate, up, down
        linears.push_back({nk[0], nk[1], random_matrix(t, nk[0], nk[1], 1.0 / std::sqrt(double(nk[1])), seed++)});
    }
    norms.push_back(norm_weight(s.d, seed++));
    linears.push_back({s.vocab, s.d, random_matrix(t, s.vocab, s.d, 1.0 / std::sqrt(double(s.d)), seed++)});
    embedding = random_matrix(t, s.vocab, s.d, 1.0, seed++);
    for (const Linear& l : linears) weight_bytes += double(l.w.size());

    rt::DecoderConfig c;
    c.d_model = s.d, c.n_head = s.heads, c.n_kv_head = s.kv_heads, c.head_dim = s.head_dim, c.d_ff = s.d_ff;
    std::vector<rt::DecoderLayer> layers(size_t(s.layers));
    for (int64_t l = 0; l < s.layers; ++l) {
      rt::DecoderLayer& dl = layers[size_t(l)];
      dl.attn_norm = vector_view(norms[size_t(2 * l)]);
      dl.mlp_norm = vector_view(norms[size_t(2 * l + 1)]);
      rt::QuantLinear* parts[] = {&dl.q, &dl.k, &dl.v, &dl.o, &dl.gate, &dl.up, &dl.down};
      for (int i = 0; i < 7; ++i) *parts[i] = linear_view(linears[size_t(7 * l + i)]);
    }
    decoder = std::make_unique<rt::Decoder>(c, std::move(layers));
    rt::DecoderEnds ends;
    ends.embedding = TensorView::contiguous(embedding.data(), t, {s.vocab, s.d});
    ends.final_norm = vector_view(norms.back());
    ends.head = linear_view(linears.back());
    decoder->set_ends(ends);
  }
  static TensorView vector_view(std::vector<float>& v) {
    return TensorView::contiguous(v.data(), DType::F32, {int64_t(v.size())});
  }
  rt::QuantLinear linear_view(Linear& l) const {
    rt::QuantLinear q;
    q.weight = TensorView::contiguous(l.w.data(), DType::U8, {int64_t(l.w.size())});
    q.type = type, q.n = l.n, q.k = l.k;
    return q;
  }
  // Linear i dequantized to f32 [n, k].
  std::vector<float> dequantized(size_t i) const {
    const Linear& l = linears[i];
    std::vector<float> w(size_t(l.n * l.k));
    flashlm::dequantize(TensorView::contiguous(const_cast<uint8_t*>(l.w.data()), type, {l.n * l.k}),
                        TensorView::contiguous(w.data(), DType::F32, {l.n * l.k}));
    return w;
  }
};

// The last model built: Google Benchmark calls each case several times, and the cases of a type come together.
Model& model(DType type) {
  static std::unique_ptr<Model> m;
  if (!m || m->type != type) {
    m.reset();
    m = std::make_unique<Model>(type, g_shape);
  }
  return *m;
}

// --- one step -------------------------------------------------------------------------------------------

// A step's buffers: tokens at positions [start, start + T) of one sequence, a bf16 cache per layer that holds
// start + T tokens, the rope tables, the logits of the last row.
struct Step {
  std::vector<int64_t> tokens, positions, slots, last_row{0};
  std::vector<int32_t> table, seq_lens, cu_seqlens;
  std::vector<float> cos, sin, x, logits;
  std::vector<std::vector<uint16_t>> k_caches, v_caches;
  rt::DecoderStep step;

  Step(const Shape& s, int64_t start, int64_t t) {
    const int64_t len = start + t, blocks = (len + kBlockSize - 1) / kBlockSize, hd = s.head_dim;
    for (int64_t i = 0; i < t; ++i) {
      tokens.push_back((i * 7919 + 13) % s.vocab);
      positions.push_back(start + i);
      slots.push_back(start + i);  // block b of the sequence is cache block b
    }
    last_row[0] = t - 1;
    for (int64_t b = 0; b < blocks; ++b) table.push_back(int32_t(b));
    seq_lens = {int32_t(len)};
    cu_seqlens = {0, int32_t(t)};
    cos.resize(size_t(len * hd)), sin.resize(size_t(len * hd));
    for (int64_t p = 0; p < len; ++p)
      for (int64_t j = 0; j < hd; ++j) {
        const double angle = double(p) * std::pow(kRopeTheta, -2.0 * double(j % (hd / 2)) / double(hd));
        cos[size_t(p * hd + j)] = float(std::cos(angle)), sin[size_t(p * hd + j)] = float(std::sin(angle));
      }
    x.resize(size_t(t * s.d));
    logits.resize(size_t(s.vocab));
    const int64_t cache = blocks * kBlockSize * s.kv_heads * hd;
    k_caches.assign(size_t(s.layers), std::vector<uint16_t>(size_t(cache)));
    v_caches.assign(size_t(s.layers), std::vector<uint16_t>(size_t(cache)));

    step.x = TensorView::contiguous(x.data(), DType::F32, {t, s.d});
    step.positions = TensorView::contiguous(positions.data(), DType::I64, {t});
    step.rope_cos = TensorView::contiguous(cos.data(), DType::F32, {len, hd});
    step.rope_sin = TensorView::contiguous(sin.data(), DType::F32, {len, hd});
    for (int64_t l = 0; l < s.layers; ++l) {
      step.k_caches.push_back(TensorView::contiguous(k_caches[size_t(l)].data(), DType::BF16,
                                                     {blocks, kBlockSize, s.kv_heads, hd}));
      step.v_caches.push_back(TensorView::contiguous(v_caches[size_t(l)].data(), DType::BF16,
                                                     {blocks, kBlockSize, s.kv_heads, hd}));
    }
    step.slot_mapping = TensorView::contiguous(slots.data(), DType::I64, {t});
    step.block_table = TensorView::contiguous(table.data(), DType::I32, {1, blocks});
    step.seq_lens = TensorView::contiguous(seq_lens.data(), DType::I32, {1});
    step.cu_seqlens_q = TensorView::contiguous(cu_seqlens.data(), DType::I32, {2});
    step.max_seqlen_q = t;
  }
  void run(const Model& m) {
    m.decoder->logits(TensorView::contiguous(tokens.data(), DType::I64, {int64_t(tokens.size())}),
                      TensorView::contiguous(last_row.data(), DType::I64, {1}), step,
                      TensorView::contiguous(logits.data(), DType::F32, {1, int64_t(logits.size())}));
  }
};

// --- the reference --------------------------------------------------------------------------------------

double bf16(double v) {
  uint16_t h;
  bench::store_float(&h, DType::BF16, 0, float(v));
  return bench::load_float(&h, DType::BF16, 0);
}

// rows [T, n] = x [T, k] @ W.T, W the model's linear i.
std::vector<double> matmul(const Model& m, size_t i, const std::vector<double>& x) {
  const std::vector<float> w = m.dequantized(i);
  const int64_t n = m.linears[i].n, k = m.linears[i].k, t = int64_t(x.size()) / k;
  std::vector<double> y(size_t(t * n));
  for (int64_t r = 0; r < t; ++r)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t c = 0; c < k; ++c) acc += x[size_t(r * k + c)] * w[size_t(j * k + c)];
      y[size_t(r * n + j)] = acc;
    }
  return y;
}

std::vector<double> rms_norm(const std::vector<double>& x, const std::vector<float>& w) {
  const size_t d = w.size();
  std::vector<double> y(x.size());
  for (size_t r = 0; r < x.size() / d; ++r) {
    double ss = 0;
    for (size_t c = 0; c < d; ++c) ss += x[r * d + c] * x[r * d + c];
    const double inv = 1.0 / std::sqrt(ss / double(d) + 1e-6);  // DecoderConfig's default eps
    for (size_t c = 0; c < d; ++c) y[r * d + c] = x[r * d + c] * inv * w[c];
  }
  return y;
}

// Rotate-half rope of every head of x [T, heads * hd] at positions 0..T-1, in place.
void rope(std::vector<double>& x, int64_t heads, int64_t hd) {
  const int64_t t = int64_t(x.size()) / (heads * hd), half = hd / 2;
  for (int64_t p = 0; p < t; ++p)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < half; ++j) {
        const double angle = double(p) * std::pow(kRopeTheta, -2.0 * double(j) / double(hd));
        double* v = &x[size_t((p * heads + h) * hd)];
        const double a = v[j], b = v[j + half];
        v[j] = a * std::cos(angle) - b * std::sin(angle);
        v[j + half] = b * std::cos(angle) + a * std::sin(angle);
      }
}

// The last token's logits for a prefill of `tokens` from position 0.
std::vector<double> reference_logits(const Model& m, const std::vector<int64_t>& tokens) {
  const Shape& s = m.s;
  const int64_t t = int64_t(tokens.size()), hd = s.head_dim, group = s.heads / s.kv_heads;
  std::vector<float> row(size_t(s.d));
  std::vector<double> x;
  const int64_t row_bytes = flashlm::storage_bytes(m.type, s.d);
  for (int64_t tok : tokens) {
    flashlm::dequantize(TensorView::contiguous(const_cast<uint8_t*>(m.embedding.data()) + tok * row_bytes, m.type,
                                               {s.d}),
                        TensorView::contiguous(row.data(), DType::F32, {s.d}));
    x.insert(x.end(), row.begin(), row.end());
  }
  for (int64_t l = 0; l < s.layers; ++l) {
    const size_t w = size_t(7 * l);
    std::vector<double> h = rms_norm(x, m.norms[size_t(2 * l)]);
    std::vector<double> q = matmul(m, w, h), k = matmul(m, w + 1, h), v = matmul(m, w + 2, h);
    rope(q, s.heads, hd);
    rope(k, s.kv_heads, hd);
    for (std::vector<double>* a : {&q, &k, &v})
      for (double& e : *a) e = bf16(e);  // the bf16 cache, and q rounded to match it
    std::vector<double> att(q.size());
    for (int64_t i = 0; i < t; ++i)
      for (int64_t hq = 0; hq < s.heads; ++hq) {
        const int64_t kv = hq / group;
        std::vector<double> p(size_t(i + 1));
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < hd; ++c)
            dot += q[size_t((i * s.heads + hq) * hd + c)] * k[size_t((j * s.kv_heads + kv) * hd + c)];
          p[size_t(j)] = dot / std::sqrt(double(hd));
          mx = std::max(mx, p[size_t(j)]);
        }
        for (double& e : p) sum += (e = std::exp(e - mx));
        for (int64_t c = 0; c < hd; ++c) {
          double acc = 0;
          for (int64_t j = 0; j <= i; ++j) acc += p[size_t(j)] * v[size_t((j * s.kv_heads + kv) * hd + c)];
          att[size_t((i * s.heads + hq) * hd + c)] = bf16(acc / sum);
        }
      }
    const std::vector<double> o = matmul(m, w + 3, att);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = rms_norm(x, m.norms[size_t(2 * l + 1)]);
    std::vector<double> gate = matmul(m, w + 4, h);
    const std::vector<double> up = matmul(m, w + 5, h);
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
    const std::vector<double> down = matmul(m, w + 6, gate);
    for (size_t i = 0; i < x.size(); ++i) x[i] += down[i];
  }
  const std::vector<double> last(x.end() - s.d, x.end());
  return matmul(m, m.linears.size() - 1, rms_norm(last, m.norms.back()));
}

std::string check(Model& m) {
  Step step(m.s, 0, kCheckTokens);
  step.run(m);
  return bench::compare_norm("logits", step.logits, reference_logits(m, step.tokens), 0.05);
}

// --- the benchmarks ---------------------------------------------------------------------------------------

void BM_step(benchmark::State& state, DType type, bool decode) {
  Model* m = nullptr;
  try {
    m = &model(type);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());  // what this build or type does not serve
    return;
  }
  if (!bench::check_once(state, std::string("decoder/") + flashlm::dtype_name(type), [&] { return check(*m); })) return;
  const int64_t t = decode ? 1 : g_prompt;
  Step step(m->s, decode ? g_context : 0, t);
  step.run(*m);  // warm-up
  const double seconds = bench::timed_loop(state, [&] { step.run(*m); });
  bench::set_bandwidth(state, m->weight_bytes, seconds, bench::cpu_copy_rate(int64_t(m->weight_bytes / 2)));
  state.counters["tokens"] = benchmark::Counter(double(state.iterations() * t), benchmark::Counter::kIsRate);
}

void register_all() {
  for (DType type : {DType::Q4_0, DType::Q8_0}) {
    const std::string name = flashlm::dtype_name(type);
    bench::register_case("decode/" + name + "/ctx" + std::to_string(g_context), false, benchmark::kMillisecond,
                         BM_step, type, true);
    bench::register_case("prefill/" + name + "/T" + std::to_string(g_prompt), false, benchmark::kMillisecond,
                         BM_step, type, false);
  }
  bench::register_cuda_and_context([] {});  // the context lines; the decoder runs on the CPU only
  const Shape& s = g_shape;
  benchmark::AddCustomContext("flashlm_model", "d_model " + std::to_string(s.d) + ", " + std::to_string(s.layers) +
                                                   " layers, heads " + std::to_string(s.heads) + "/" +
                                                   std::to_string(s.kv_heads) + " x " + std::to_string(s.head_dim) +
                                                   ", d_ff " + std::to_string(s.d_ff) + ", vocab " +
                                                   std::to_string(s.vocab) + ", bf16 KV cache");
}

bool parse_own_flags(int* argc, char** argv) {
  if (bench::quick()) {
    g_shape = Shape{128, 2, 4, 2, 32, 256, 512};
    g_context = 16, g_prompt = 8;
  }
  return bench::take_flags(argc, argv, "bench_decode", {{"layers", &g_shape.layers, 1, 1024},
                                                        {"context", &g_context, 0, 1 << 20},
                                                        {"prompt", &g_prompt, 1, 1 << 16}});
}

}  // namespace

int main(int argc, char** argv) { return bench::run_main(argc, argv, parse_own_flags, register_all); }
