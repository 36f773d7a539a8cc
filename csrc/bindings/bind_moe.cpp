// Mixture-of-experts kernels: top-k routing, the expert-indexed matmul and the expert feed-forward, with the
// expert weights given as a float [E, N, K] tensor or as the uint8 bytes of GGML blocks.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>

#include "convert.h"
#include "flashlm/moe/moe.h"

namespace flashlm::bindings {

namespace {

ExpertWeights expert_weights(const Array& data, const std::string& type, int64_t num_experts, int64_t n, int64_t k,
                             const char* name) {
  std::optional<DType> t = dtype_from_name(type);
  FLASHLM_CHECK(t.has_value(), name, ": '", type, "' is not a type name (F32, BF16, F16, Q4_0, ...)");
  return {to_view(data, name), *t, num_experts, n, k};
}

MoeActivation activation_from_name(const std::string& name) {
  if (name == "silu") return MoeActivation::SiLU;
  if (name == "gelu_tanh") return MoeActivation::GeluTanh;
  throw ValueError("activation: must be 'silu' or 'gelu_tanh', got '" + name + "'");
}

void route_binding(Array logits, int64_t top_k, bool softmax_first, bool renormalize, Array weights, Array experts,
                   uintptr_t stream) {
  const TensorView lv = to_view(logits, "router_logits"), wv = to_view(weights, "weights"),
                   ev = to_view(experts, "experts");
  nb::gil_scoped_release release;
  moe_route(lv, top_k, softmax_first, renormalize, wv, ev, reinterpret_cast<void*>(stream));
}

void expert_matmul_binding(Array x, Array experts, Array data, const std::string& type, int64_t num_experts,
                           int64_t n, int64_t k, Array y, uintptr_t stream) {
  const ExpertWeights w = expert_weights(data, type, num_experts, n, k, "weight");
  const TensorView xv = to_view(x, "x"), ev = to_view(experts, "experts"), yv = to_view(y, "y");
  nb::gil_scoped_release release;
  moe_expert_matmul(xv, ev, w, yv, reinterpret_cast<void*>(stream));
}

void expert_ffn_binding(Array x, Array weights, Array experts, Array gate, const std::string& gate_type, Array up,
                        const std::string& up_type, Array down, const std::string& down_type, int64_t num_experts,
                        int64_t f, const std::string& activation, Array out) {
  const TensorView xv = to_view(x, "x");
  const int64_t d = xv.ndim == 2 ? xv.shape[1] : 0;
  const ExpertWeights g = expert_weights(gate, gate_type, num_experts, f, d, "gate");
  const ExpertWeights u = expert_weights(up, up_type, num_experts, f, d, "up");
  const ExpertWeights dn = expert_weights(down, down_type, num_experts, d, f, "down");
  const MoeActivation act = activation_from_name(activation);
  const TensorView wv = to_view(weights, "weights"), ev = to_view(experts, "experts"), ov = to_view(out, "out");
  nb::gil_scoped_release release;
  moe_expert_ffn(xv, wv, ev, g, u, dn, act, ov);
}

}  // namespace

void bind_moe(nb::module_& m) {
  m.def("moe_route", &route_binding, nb::arg("router_logits"), nb::arg("top_k"), nb::arg("softmax_first"),
        nb::arg("renormalize"), nb::arg("weights"), nb::arg("experts"), nb::arg("stream") = 0,
        "Top-k routing of logits [T, E] into weights [T, k] (float32) and experts [T, k] (int32)");
  m.def("moe_expert_matmul", &expert_matmul_binding, nb::arg("x"), nb::arg("experts"), nb::arg("weight"),
        nb::arg("weight_type"), nb::arg("num_experts"), nb::arg("n"), nb::arg("k"), nb::arg("y"),
        nb::arg("stream") = 0, "y[r] = W[experts[r]] @ x[r] (W: float [E, N, K] or uint8 GGML blocks)");
  m.def("moe_expert_ffn", &expert_ffn_binding, nb::arg("x"), nb::arg("weights"), nb::arg("experts"), nb::arg("gate"),
        nb::arg("gate_type"), nb::arg("up"), nb::arg("up_type"), nb::arg("down"), nb::arg("down_type"),
        nb::arg("num_experts"), nb::arg("f"), nb::arg("activation"), nb::arg("out"),
        "out[t] = sum_j weights[t, j] * down_e(act(gate_e x_t) * up_e x_t), e = experts[t, j] (CPU)");
}

}  // namespace flashlm::bindings
