// The paged KV cache: write_kv_cache and paged_attention. Outputs are allocated by the caller (flashlm.ops)
// and written in place; the CUDA stream comes as an integer (0: the default stream).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "convert.h"
#include "flashlm/kvcache/paged_attention.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

using OptionalArray = std::optional<Array>;

void write(Array key, Array value, Array k_cache, Array v_cache,
           Array slot_mapping, uintptr_t stream) {
  KVCacheWriteParams a;
  a.key = to_view(key, "key"), a.value = to_view(value, "value");
  a.k_cache = to_view(k_cache, "k_cache"), a.v_cache = to_view(v_cache, "v_cache");
  a.slot_mapping = to_view(slot_mapping, "slot_mapping");
  nb::gil_scoped_release release;
  write_kv_cache(a, reinterpret_cast<void*>(stream));
}

void attend(Array q, Array k_cache, Array v_cache, Array block_table,
            Array seq_lens, OptionalArray cu_seqlens_q, int64_t max_seqlen_q, Array out,
            OptionalArray lse, float softmax_scale, bool causal, int64_t window_left, int64_t window_right,
            float softcap, int num_splits, uintptr_t stream, OptionalArray alibi_slopes) {
  PagedAttentionParams a;
  a.q = to_view(q, "q"), a.k_cache = to_view(k_cache, "k_cache"), a.v_cache = to_view(v_cache, "v_cache");
  a.block_table = to_view(block_table, "block_table"), a.seq_lens = to_view(seq_lens, "seq_lens");
  a.cu_seqlens_q = optional_view(cu_seqlens_q, "cu_seqlens_q");
  a.max_seqlen_q = max_seqlen_q;
  a.out = to_view(out, "out");
  a.lse = optional_view(lse, "lse");
  a.options.softmax_scale = softmax_scale;
  a.options.causal = causal;
  a.options.window_left = window_left;
  a.options.window_right = window_right;
  a.options.softcap = softcap;
  a.num_splits = num_splits;
  a.alibi_slopes = optional_view(alibi_slopes, "alibi_slopes");
  nb::gil_scoped_release release;
  paged_attention(a, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_kvcache(nb::module_& m) {
  m.def("write_kv_cache", &write, nb::arg("key"), nb::arg("value"), nb::arg("k_cache"), nb::arg("v_cache"),
        nb::arg("slot_mapping"), nb::arg("stream") = 0,
        "Scatter key/value [tokens, kv_heads, head_dim] into the paged caches at slot_mapping (-1 skips)");
  m.def("paged_attention", &attend, nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("block_table"),
        nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(), nb::arg("max_seqlen_q"), nb::arg("out"),
        nb::arg("lse").none(), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("softcap"), nb::arg("num_splits"), nb::arg("stream") = 0,
        nb::arg("alibi_slopes").none() = nb::none(),
        "Attention of q over the paged caches into out (and lse); see paged_attention.h for the layout");
  m.def("paged_attention_num_splits", &paged_attention_num_splits, nb::arg("device_type"), nb::arg("num_seqs"),
        nb::arg("kv_heads"), nb::arg("max_seq_len"), nb::arg("block_size"),
        "The decode split count the library picks (device_type 0: CPU, 1: CUDA)");
}

}  // namespace flashlm::bindings
