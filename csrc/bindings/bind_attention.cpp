// Flash attention forward and backward. Outputs are allocated by the caller (flashlm.ops) and written in place.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "convert.h"
#include "flashlm/attention/flash_attention.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

using OptionalArray = std::optional<Array>;

TensorView optional_view(const OptionalArray& a, const char* name) { return a ? to_view(*a, name) : TensorView{}; }

AttentionOptions options(float softmax_scale, bool causal, int64_t window_left, int64_t window_right, float softcap,
                         int version) {
  AttentionOptions o;
  o.softmax_scale = softmax_scale;
  o.causal = causal;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  o.version = version;
  return o;
}

void forward(Array q, Array k, Array v, Array out, Array lse,
             OptionalArray cu_seqlens_q, OptionalArray cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
             float softmax_scale, bool causal, int64_t window_left, int64_t window_right, float softcap, int version,
             uintptr_t stream, OptionalArray alibi_slopes) {
  AttentionForwardParams a;
  a.q = to_view(q, "q"), a.k = to_view(k, "k"), a.v = to_view(v, "v"), a.out = to_view(out, "out");
  a.lse = to_view(lse, "lse");
  a.cu_seqlens_q = optional_view(cu_seqlens_q, "cu_seqlens_q");
  a.cu_seqlens_k = optional_view(cu_seqlens_k, "cu_seqlens_k");
  a.max_seqlen_q = max_seqlen_q, a.max_seqlen_k = max_seqlen_k;
  a.options = options(softmax_scale, causal, window_left, window_right, softcap, version);
  a.alibi_slopes = optional_view(alibi_slopes, "alibi_slopes");
  nb::gil_scoped_release release;
  flash_attention_forward(a, reinterpret_cast<void*>(stream));
}

void backward(Array dout, Array q, Array k, Array v, Array out,
              Array lse, Array dq, Array dk, Array dv, Array delta,
              OptionalArray cu_seqlens_q, OptionalArray cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
              float softmax_scale, bool causal, int64_t window_left, int64_t window_right, float softcap,
              uintptr_t stream, OptionalArray alibi_slopes) {
  AttentionBackwardParams a;
  a.dout = to_view(dout, "dout"), a.q = to_view(q, "q"), a.k = to_view(k, "k"), a.v = to_view(v, "v");
  a.out = to_view(out, "out"), a.lse = to_view(lse, "lse");
  a.dq = to_view(dq, "dq"), a.dk = to_view(dk, "dk"), a.dv = to_view(dv, "dv"), a.delta = to_view(delta, "delta");
  a.cu_seqlens_q = optional_view(cu_seqlens_q, "cu_seqlens_q");
  a.cu_seqlens_k = optional_view(cu_seqlens_k, "cu_seqlens_k");
  a.max_seqlen_q = max_seqlen_q, a.max_seqlen_k = max_seqlen_k;
  a.options = options(softmax_scale, causal, window_left, window_right, softcap, 2);
  a.alibi_slopes = optional_view(alibi_slopes, "alibi_slopes");
  nb::gil_scoped_release release;
  flash_attention_backward(a, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_attention(nb::module_& m) {
  m.def("flash_attention_forward", &forward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"), nb::arg("lse"),
        nb::arg("cu_seqlens_q").none(), nb::arg("cu_seqlens_k").none(), nb::arg("max_seqlen_q"),
        nb::arg("max_seqlen_k"), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("softcap"), nb::arg("version"), nb::arg("stream") = 0,
        nb::arg("alibi_slopes").none() = nb::none(),
        "Attention forward into out and lse (see flash_attention.h for the layout)");
  m.def("flash_attention_backward", &backward, nb::arg("dout"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out"), nb::arg("lse"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"), nb::arg("delta"),
        nb::arg("cu_seqlens_q").none(), nb::arg("cu_seqlens_k").none(), nb::arg("max_seqlen_q"),
        nb::arg("max_seqlen_k"), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("softcap"), nb::arg("stream") = 0,
        nb::arg("alibi_slopes").none() = nb::none(),
        "Attention backward into dq, dk, dv (and delta = rowsum(dout * out))");
  m.def("flash_attention_cuda_supports_head_dim", &flash_attention_cuda_supports_head_dim, nb::arg("head_dim"));
}

}  // namespace flashlm::bindings
