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

AttentionOptions options(float softmax_scale, bool causal, int64_t window_left, int64_t window_right, float softcap,
                         int version, float dropout_p, uint64_t philox_seed, uint64_t philox_offset) {
  AttentionOptions o;
  o.softmax_scale = softmax_scale;
  o.causal = causal;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  o.version = version;
  o.dropout_p = dropout_p;
  o.philox_seed = philox_seed;
  o.philox_offset = philox_offset;
  return o;
}

void forward(Array q, Array k, Array v, Array out, Array lse,
             OptionalArray cu_seqlens_q, OptionalArray cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
             float softmax_scale, bool causal, int64_t window_left, int64_t window_right, float softcap, int version,
             uintptr_t stream, OptionalArray alibi_slopes, float dropout_p, uint64_t philox_seed,
             uint64_t philox_offset) {
  AttentionForwardParams a;
  a.q = to_view(q, "q"), a.k = to_view(k, "k"), a.v = to_view(v, "v"), a.out = to_view(out, "out");
  a.lse = to_view(lse, "lse");
  a.cu_seqlens_q = optional_view(cu_seqlens_q, "cu_seqlens_q");
  a.cu_seqlens_k = optional_view(cu_seqlens_k, "cu_seqlens_k");
  a.max_seqlen_q = max_seqlen_q, a.max_seqlen_k = max_seqlen_k;
  a.options = options(softmax_scale, causal, window_left, window_right, softcap, version, dropout_p, philox_seed,
                      philox_offset);
  a.alibi_slopes = optional_view(alibi_slopes, "alibi_slopes");
  nb::gil_scoped_release release;
  flash_attention_forward(a, reinterpret_cast<void*>(stream));
}

void backward(Array dout, Array q, Array k, Array v, Array out,
              Array lse, Array dq, Array dk, Array dv, Array delta,
              OptionalArray cu_seqlens_q, OptionalArray cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
              float softmax_scale, bool causal, int64_t window_left, int64_t window_right, float softcap,
              uintptr_t stream, OptionalArray alibi_slopes, float dropout_p, uint64_t philox_seed,
              uint64_t philox_offset) {
  AttentionBackwardParams a;
  a.dout = to_view(dout, "dout"), a.q = to_view(q, "q"), a.k = to_view(k, "k"), a.v = to_view(v, "v");
  a.out = to_view(out, "out"), a.lse = to_view(lse, "lse");
  a.dq = to_view(dq, "dq"), a.dk = to_view(dk, "dk"), a.dv = to_view(dv, "dv"), a.delta = to_view(delta, "delta");
  a.cu_seqlens_q = optional_view(cu_seqlens_q, "cu_seqlens_q");
  a.cu_seqlens_k = optional_view(cu_seqlens_k, "cu_seqlens_k");
  a.max_seqlen_q = max_seqlen_q, a.max_seqlen_k = max_seqlen_k;
  a.options = options(softmax_scale, causal, window_left, window_right, softcap, 2, dropout_p, philox_seed,
                      philox_offset);
  a.alibi_slopes = optional_view(alibi_slopes, "alibi_slopes");
  nb::gil_scoped_release release;
  flash_attention_backward(a, reinterpret_cast<void*>(stream));
}

void dropout_mask(Array mask, float dropout_p, uint64_t philox_seed, uint64_t philox_offset) {
  const TensorView m = to_view(mask, "mask");
  nb::gil_scoped_release release;
  flash_attention_dropout_mask(m, dropout_p, philox_seed, philox_offset);
}

}  // namespace

void bind_attention(nb::module_& m) {
  m.def("flash_attention_forward", &forward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"), nb::arg("lse"),
        nb::arg("cu_seqlens_q").none(), nb::arg("cu_seqlens_k").none(), nb::arg("max_seqlen_q"),
        nb::arg("max_seqlen_k"), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("softcap"), nb::arg("version"), nb::arg("stream") = 0,
        nb::arg("alibi_slopes").none() = nb::none(),
        nb::arg("dropout_p") = 0.f, nb::arg("philox_seed") = 0, nb::arg("philox_offset") = 0,
        "Attention forward into out and lse (see flash_attention.h for the layout)");
  m.def("flash_attention_backward", &backward, nb::arg("dout"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out"), nb::arg("lse"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"), nb::arg("delta"),
        nb::arg("cu_seqlens_q").none(), nb::arg("cu_seqlens_k").none(), nb::arg("max_seqlen_q"),
        nb::arg("max_seqlen_k"), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("softcap"), nb::arg("stream") = 0,
        nb::arg("alibi_slopes").none() = nb::none(),
        nb::arg("dropout_p") = 0.f, nb::arg("philox_seed") = 0, nb::arg("philox_offset") = 0,
        "Attention backward into dq, dk, dv (and delta = rowsum(dout * out))");
  m.def("flash_attention_dropout_mask", &dropout_mask, nb::arg("mask"), nb::arg("dropout_p"), nb::arg("philox_seed"),
        nb::arg("philox_offset"),
        "The keep mask (uint8 [batch, heads, seqlen_q, seqlen_k], CPU) of a forward pass's dropout");
  m.def("flash_attention_cuda_supports_head_dim", &flash_attention_cuda_supports_head_dim, nb::arg("head_dim"));
  m.def("set_attention_avx512", &set_attention_avx512, nb::arg("allowed"),
        "whether the CPU attention kernels may use their AVX-512 build (else AVX2, the same results); returns the "
        "previous setting");
}

}  // namespace flashlm::bindings
