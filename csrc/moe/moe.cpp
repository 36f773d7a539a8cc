// MoE dispatcher: checks every argument, then routes on device (CUDA groups rows by expert the same way, on the
// device: moe_cuda.cu). On the CPU the rows of a call are
// counting-sorted by expert once, gathered as f32, and each expert's rows go through its weight as one GEMM:
// GGUF weights through the GGUF matmul's block dot products (gemm/shared_gguf_matmul.h: the rows are
// quantized once per call and expert), float weights through float_rows_* with all experts' output rows
// split over the thread pool as one job. Results are scattered back to the rows' own order.
#include "flashlm/moe/moe.h"

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "../core/half.h"
#include "../gemm/shared_gguf_matmul.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "flashlm/gemm/gguf_matmul.h"
#include "moe_kernels.h"

namespace flashlm {

namespace {

using moe::detail::FloatRowsArgs;

// A range of output columns handed to one thread holds about this many multiply-adds (as gguf_matmul's grain).
constexpr int64_t kGrainMacs = 1 << 16;

void check_tensor(const TensorView& t, const char* fn, const char* name, int ndim, Device device) {
  FLASHLM_CHECK(t.ndim == ndim, fn, ": ", name, " must have ", ndim, " dimensions, got ", t.shape_string());
  FLASHLM_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
  FLASHLM_CHECK(t.device == device, fn, ": ", name, " must be on x's device");
}

bool is_float_type(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

void check_activation_dtype(DType dtype, Device device, const char* fn, const char* name) {
  const bool ok = dtype == DType::F32 || dtype == DType::BF16 || (device.is_cuda() && dtype == DType::F16);
  FLASHLM_CHECK(ok, fn, ": ", name, " must be float32 or bfloat16", device.is_cuda() ? " or float16" : "",
                ", got ", dtype_name(dtype));
}

void check_weights(const ExpertWeights& w, const char* fn, const char* name, Device device) {
  FLASHLM_CHECK(w.num_experts > 0, fn, ": ", name, " must hold at least one expert, got ", w.num_experts);
  FLASHLM_CHECK(w.n >= 0 && w.k >= 0, fn, ": ", name, "'s N and K must be >= 0, got ", w.n, " and ", w.k);
  FLASHLM_CHECK(w.data.device == device, fn, ": ", name, " must be on x's device");
  FLASHLM_CHECK(w.data.is_contiguous(), fn, ": ", name, " must be contiguous");
  if (is_float_type(w.type)) {
    FLASHLM_CHECK(w.data.dtype == w.type, fn, ": ", name, " has dtype ", dtype_name(w.data.dtype), ", not ",
                  dtype_name(w.type));
    check_activation_dtype(w.type, device, fn, name);
    FLASHLM_CHECK(w.data.ndim == 3 && w.data.shape[0] == w.num_experts && w.data.shape[1] == w.n &&
                      w.data.shape[2] == w.k,
                  fn, ": ", name, " must be [", w.num_experts, ", ", w.n, ", ", w.k, "], got ", w.data.shape_string());
    return;
  }
  FLASHLM_CHECK(gguf_matmul_supported(w.type), fn, ": ", name, "'s type ", dtype_name(w.type),
                " is not supported (F32, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K are)");
  FLASHLM_CHECK(w.data.dtype == DType::U8, fn, ": ", name, " must be uint8 (the blocks' bytes), got ",
                dtype_name(w.data.dtype));
  const DTypeInfo& info = dtype_info(w.type);
  FLASHLM_CHECK(w.k % info.block_size == 0, fn, ": ", name, "'s K (", w.k, ") must be a multiple of ", info.name,
                "'s block size ", info.block_size);
  const int64_t max = std::numeric_limits<int64_t>::max();
  FLASHLM_CHECK(w.k == 0 || w.n == 0 || (w.n <= max / w.k && w.num_experts <= max / (w.n * w.k)), fn, ": ", name,
                "'s E * N * K overflows");
  const int64_t expected = storage_bytes(w.type, w.num_experts * w.n * w.k);
  FLASHLM_CHECK(w.data.numel() == expected, fn, ": ", name, " has ", w.data.numel(), " bytes, but ", w.num_experts,
                " x ", w.n, " x ", w.k, " of ", info.name, " takes ", expected);
}

// Slot i of `experts` (R values) -> its place in the expert-sorted order. offsets[e] .. offsets[e + 1] are
// expert e's places; order[p] is the slot at place p (slots of one expert in increasing order).
struct Grouping {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

Grouping group_by_expert(const int32_t* experts, int64_t r, int64_t num_experts, const char* fn) {
  Grouping g;
  g.offsets.assign(static_cast<size_t>(num_experts + 1), 0);
  for (int64_t i = 0; i < r; ++i) {
    const int32_t e = experts[i];
    FLASHLM_CHECK(e >= 0 && e < num_experts, fn, ": experts[", i, "] = ", e, " is outside [0, ", num_experts, ")");
    ++g.offsets[static_cast<size_t>(e) + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) g.offsets[e + 1] += g.offsets[e];
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  g.order.resize(static_cast<size_t>(r));
  for (int64_t i = 0; i < r; ++i) g.order[static_cast<size_t>(next[experts[i]]++)] = i;
  return g;
}

// One product of a grouped call: the rows of each expert group of xs [R, K] times that expert's weight,
// into ys [R, weight.n] (sorted order, f32).
struct GroupedPart {
  const ExpertWeights* weight;
  float* ys;
};

// Every part's products for the rows of `g` (xs sorted and gathered, f32, [R, K]).
void grouped_matmul(const float* xs, int64_t k, const Grouping& g, const GroupedPart* parts, int count) {
  const int64_t num_experts = static_cast<int64_t>(g.offsets.size()) - 1;
  if (!is_float_type(parts[0].weight->type)) {
    // GGUF: per expert, all parts in one pool job of the GGUF matmul (x quantized once for the parts).
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t p0 = g.offsets[e], m = g.offsets[e + 1] - p0;
      if (m == 0) continue;
      std::vector<gemm::detail::MatmulPart> mp;
      for (int i = 0; i < count; ++i) {
        const ExpertWeights& w = *parts[i].weight;
        const int64_t bytes = storage_bytes(w.type, w.n * k);
        mp.push_back({w.type, static_cast<const uint8_t*>(w.data.data) + e * bytes, w.n, nullptr,
                      parts[i].ys + p0 * w.n});
      }
      gemm::detail::gguf_matmul_parts_f32(xs + p0 * k, m, k, mp.data(), count);
    }
    return;
  }
  // Float: the output columns of every (part, non-empty expert) stacked, split over the pool as one job.
  struct Task {
    int part;
    int64_t expert, begin;  // begin: the first stacked column of this task
  };
  std::vector<Task> tasks;
  int64_t total = 0, rows = 0;
  for (int i = 0; i < count; ++i)
    for (int64_t e = 0; e < num_experts; ++e)
      if (g.offsets[e + 1] > g.offsets[e]) {
        tasks.push_back({i, e, total});
        total += parts[i].weight->n;
        rows = std::max(rows, g.offsets[e + 1] - g.offsets[e]);
      }
  const bool avx2 = cpu_isa() == CpuIsa::AVX2;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, rows * k));
  parallel_for(total, grain, [&](int64_t c0, int64_t c1) {
    for (const Task& t : tasks) {
      const ExpertWeights& w = *parts[t.part].weight;
      const int64_t n0 = std::max<int64_t>(c0 - t.begin, 0), n1 = std::min<int64_t>(c1 - t.begin, w.n);
      if (n0 >= n1) continue;
      const int64_t p0 = g.offsets[t.expert], m = g.offsets[t.expert + 1] - p0;
      const int64_t esize = static_cast<int64_t>(dtype_info(w.type).block_bytes) * w.n * k;
      const FloatRowsArgs a{w.type, static_cast<const char*>(w.data.data) + t.expert * esize, k, xs + p0 * k, m,
                            parts[t.part].ys + p0 * w.n, w.n};
      if (!(avx2 && moe::detail::float_rows_avx2(a, n0, n1))) moe::detail::float_rows_scalar(a, n0, n1);
    }
  });
}

// xs[p] = x[order[p] / per_row] as f32 (x [rows, k], F32 or BF16).
std::vector<float> gather_rows(const TensorView& x, const Grouping& g, int64_t per_row) {
  const int64_t k = x.shape[1], r = static_cast<int64_t>(g.order.size());
  std::vector<float> xs(static_cast<size_t>(r * k));
  parallel_for(r, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t src = g.order[p] / per_row;
      float* out = xs.data() + p * k;
      if (x.dtype == DType::BF16) {
        const uint16_t* in = static_cast<const uint16_t*>(x.data) + src * k;
        for (int64_t j = 0; j < k; ++j) out[j] = core::bf16_to_f32(in[j]);
      } else {
        std::copy_n(static_cast<const float*>(x.data) + src * k, k, out);
      }
    }
  });
  return xs;
}

void store_row(const float* v, int64_t n, DType dtype, void* out, int64_t row) {
  if (dtype == DType::BF16) {
    uint16_t* o = static_cast<uint16_t*>(out) + row * n;
    for (int64_t j = 0; j < n; ++j) o[j] = core::f32_to_bf16(v[j]);
  } else {
    std::copy_n(v, n, static_cast<float*>(out) + row * n);
  }
}

}  // namespace

void moe_route(const TensorView& logits, int64_t top_k, bool softmax_first, bool renormalize,
               const TensorView& weights, const TensorView& experts, void* stream) {
  const Device device = logits.device;
  check_tensor(logits, "moe_route", "router_logits", 2, device);
  check_activation_dtype(logits.dtype, device, "moe_route", "router_logits");
  const int64_t t = logits.shape[0], e = logits.shape[1];
  FLASHLM_CHECK(top_k >= 1 && top_k <= e, "moe_route: top_k must be in [1, ", e, "] (the number of experts), got ",
                top_k);
  FLASHLM_CHECK(e <= std::numeric_limits<int32_t>::max(), "moe_route: ", e, " experts do not fit an int32 index");
  check_tensor(weights, "moe_route", "weights", 2, device);
  check_tensor(experts, "moe_route", "experts", 2, device);
  FLASHLM_CHECK(weights.dtype == DType::F32 && weights.shape[0] == t && weights.shape[1] == top_k,
                "moe_route: weights must be float32 [", t, ", ", top_k, "]");
  FLASHLM_CHECK(experts.dtype == DType::I32 && experts.shape[0] == t && experts.shape[1] == top_k,
                "moe_route: experts must be int32 [", t, ", ", top_k, "]");
  if (t == 0) return;
  const moe::detail::RouteArgs a{logits.data, logits.dtype, t, e, top_k, softmax_first, renormalize,
                                 static_cast<float*>(weights.data), static_cast<int32_t*>(experts.data)};
  if (device.is_cuda()) {
    if (!cuda_compiled()) throw NotImplementedError("moe_route: flashlm was built without CUDA");
    FLASHLM_CHECK(device.index >= 0 && device.index < cuda_device_count(), "moe_route: no CUDA device ", device.index,
                  " (", cuda_status(), ")");
    moe::detail::route_cuda(a, device.index, stream);
    return;
  }
  parallel_for(t, std::max<int64_t>(1, 4096 / (e * top_k)), [&](int64_t t0, int64_t t1) {
    moe::detail::route_scalar(a, t0, t1);
  });
}

void moe_expert_matmul(const TensorView& x, const TensorView& experts, const ExpertWeights& weight,
                       const TensorView& y, void* stream) {
  const char* fn = "moe_expert_matmul";
  const Device device = x.device;
  check_tensor(x, fn, "x", 2, device);
  check_activation_dtype(x.dtype, device, fn, "x");
  const int64_t r = x.shape[0], k = x.shape[1];
  check_weights(weight, fn, "weight", device);
  FLASHLM_CHECK(weight.k == k, fn, ": weight's K (", weight.k, ") must equal x's last dimension (", k, ")");
  check_tensor(experts, fn, "experts", 1, device);
  FLASHLM_CHECK(experts.dtype == DType::I32 && experts.shape[0] == r, fn, ": experts must be int32 [", r, "]");
  check_tensor(y, fn, "y", 2, device);
  FLASHLM_CHECK(y.dtype == x.dtype && y.shape[0] == r && y.shape[1] == weight.n, fn, ": y must be [", r, ", ",
                weight.n, "] with x's dtype");
  if (r == 0 || weight.n == 0) return;
  if (device.is_cuda()) {
    if (!cuda_compiled()) throw NotImplementedError("moe_expert_matmul: flashlm was built without CUDA");
    FLASHLM_CHECK(device.index >= 0 && device.index < cuda_device_count(), fn, ": no CUDA device ", device.index,
                  " (", cuda_status(), ")");
    FLASHLM_CHECK(r <= std::numeric_limits<int32_t>::max(), fn, ": x's ", r,
                  " rows do not fit the CUDA grouping's int32 row indices");
    moe::detail::expert_matmul_cuda({x.data, x.dtype, static_cast<const int32_t*>(experts.data),
                                     static_cast<const uint8_t*>(weight.data.data), weight.type, r, weight.n, k,
                                     weight.num_experts, y.data, device.index, stream});
    return;
  }
  const Grouping g = group_by_expert(static_cast<const int32_t*>(experts.data), r, weight.num_experts, fn);
  const std::vector<float> xs = gather_rows(x, g, 1);
  std::vector<float> ys(static_cast<size_t>(r * weight.n));
  const GroupedPart part{&weight, ys.data()};
  grouped_matmul(xs.data(), k, g, &part, 1);
  for (int64_t p = 0; p < r; ++p) store_row(ys.data() + p * weight.n, weight.n, y.dtype, y.data, g.order[p]);
}

void moe_expert_ffn(const TensorView& x, const TensorView& route_weights, const TensorView& experts,
                    const ExpertWeights& gate, const ExpertWeights& up, const ExpertWeights& down,
                    MoeActivation activation, const TensorView& out) {
  const char* fn = "moe_expert_ffn";
  const Device device = x.device;
  check_tensor(x, fn, "x", 2, device);
  FLASHLM_CHECK(device.is_cpu(), fn, ": runs on the CPU (CUDA callers compose moe_expert_matmul)");
  check_activation_dtype(x.dtype, device, fn, "x");
  const int64_t t = x.shape[0], d = x.shape[1];
  check_tensor(experts, fn, "experts", 2, device);
  FLASHLM_CHECK(experts.dtype == DType::I32 && experts.shape[0] == t, fn, ": experts must be int32 [", t, ", k]");
  const int64_t top_k = experts.shape[1];
  check_tensor(route_weights, fn, "weights", 2, device);
  FLASHLM_CHECK(route_weights.dtype == DType::F32 && route_weights.shape[0] == t && route_weights.shape[1] == top_k,
                fn, ": weights must be float32 [", t, ", ", top_k, "] (experts' shape)");
  check_weights(gate, fn, "gate", device);
  check_weights(up, fn, "up", device);
  check_weights(down, fn, "down", device);
  const int64_t e = gate.num_experts, f = gate.n;
  FLASHLM_CHECK(gate.k == d, fn, ": gate must be [E, F, ", d, "] (D = x's last dimension), got K = ", gate.k);
  FLASHLM_CHECK(up.num_experts == e && up.n == f && up.k == d, fn, ": up must be [", e, ", ", f, ", ", d,
                "] as gate is, got [", up.num_experts, ", ", up.n, ", ", up.k, "]");
  FLASHLM_CHECK(down.num_experts == e && down.n == d && down.k == f, fn, ": down must be [", e, ", ", d, ", ", f,
                "], got [", down.num_experts, ", ", down.n, ", ", down.k, "]");
  FLASHLM_CHECK(is_float_type(gate.type) == is_float_type(up.type), fn,
                ": gate and up must both be float or both GGUF blocks");
  check_tensor(out, fn, "out", 2, device);
  FLASHLM_CHECK(out.dtype == x.dtype && out.shape[0] == t && out.shape[1] == d, fn, ": out must be [", t, ", ", d,
                "] with x's dtype");
  FLASHLM_CHECK(activation == MoeActivation::SiLU || activation == MoeActivation::GeluTanh, fn,
                ": activation must be silu or gelu_tanh");
  if (t == 0 || d == 0) return;
  const int64_t r = t * top_k;
  const Grouping g = group_by_expert(static_cast<const int32_t*>(experts.data), r, e, fn);
  const std::vector<float> xs = gather_rows(x, g, top_k);
  std::vector<float> gs(static_cast<size_t>(r * f)), us(static_cast<size_t>(r * f));
  const GroupedPart gate_up[2] = {{&gate, gs.data()}, {&up, us.data()}};
  grouped_matmul(xs.data(), d, g, gate_up, 2);
  parallel_for(r, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(f, 1)), [&](int64_t p0, int64_t p1) {
    moe::detail::activation_mul(static_cast<int>(activation), gs.data() + p0 * f, us.data() + p0 * f, (p1 - p0) * f);
  });
  std::vector<float> ys(static_cast<size_t>(r * d));
  const GroupedPart down_part{&down, ys.data()};
  grouped_matmul(gs.data(), f, g, &down_part, 1);
  // place[slot] = the slot's row in the sorted order; each token sums its k experts in the order route gave.
  std::vector<int64_t> place(static_cast<size_t>(r));
  for (int64_t p = 0; p < r; ++p) place[g.order[p]] = p;
  const float* rw = static_cast<const float*>(route_weights.data);
  parallel_for(t, std::max<int64_t>(1, (1 << 14) / d), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(d));
    for (int64_t i = t0; i < t1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < top_k; ++j) {
        const float wj = rw[i * top_k + j];
        const float* row = ys.data() + place[i * top_k + j] * d;
        for (int64_t c = 0; c < d; ++c) acc[c] += wj * row[c];
      }
      store_row(acc.data(), d, out.dtype, out.data, i);
    }
  });
}

}  // namespace flashlm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::moe::detail {
void route_cuda(const RouteArgs&, int, void*) { throw NotImplementedError("moe_route: flashlm was built without CUDA"); }
void expert_matmul_cuda(const CudaMatmulArgs&) {
  throw NotImplementedError("moe_expert_matmul: flashlm was built without CUDA");
}
}  // namespace flashlm::moe::detail
#endif
#ifndef FLASHLM_HAVE_AVX2_KERNELS
namespace flashlm::moe::detail {
bool float_rows_avx2(const FloatRowsArgs&, int64_t, int64_t) { return false; }
}  // namespace flashlm::moe::detail
#endif
