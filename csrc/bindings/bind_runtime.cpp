// The CPU decoder stack (flashlm/runtime/decoder.h) as a Python object: built once from a model's layer
// weights (the tensors are kept referenced, so the library's views stay valid), then called once per step.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "convert.h"
#include "flashlm/runtime/decoder.h"
#include "flashlm/runtime/rope.h"

namespace flashlm::bindings {
namespace {

struct Decoder {
  int64_t d_model = 0;
  // The arrays the library's views point into: the layers' for the object's life, the ends' until the next
  // set_ends replaces them.
  std::vector<nb::object> keep_layers, keep_ends;
  std::unique_ptr<runtime::Decoder> impl;

  static TensorView array(nb::handle h, const std::string& name, std::vector<nb::object>& keep) {
    TensorView v = to_view(nb::cast<Array>(h), name.c_str());
    keep.push_back(nb::borrow(h));
    return v;
  }

  // A list (or tuple) of per-layer arrays, each named name[i] in errors.
  static std::vector<TensorView> arrays(nb::handle list, const char* name) {
    if (!nb::isinstance<nb::list>(list) && !nb::isinstance<nb::tuple>(list))
      throw nb::type_error((std::string(name) + ": expected a list of tensors, got " + nb::inst_name(list).c_str()).c_str());
    std::vector<TensorView> views;
    for (size_t i = 0; i < nb::len(list); ++i)
      views.push_back(to_view(nb::cast<Array>(list[i]), (std::string(name) + "[" + std::to_string(i) + "]").c_str()));
    return views;
  }

  // The type a spec's item names ("Q4_0", "F32", ...); what: the item, for errors.
  static DType type_named(nb::handle item, const std::string& what) {
    std::string type;
    FLASHLM_CHECK(nb::try_cast(item, type), what, " must be a string");
    std::optional<DType> dt = dtype_from_name(type);
    FLASHLM_CHECK(dt.has_value(), what, ": unknown type '", type, "'");
    return *dt;
  }

  // spec: (raw uint8 blocks, ggml type name, n, k, bias or None)
  static runtime::QuantLinear linear(nb::handle spec, const std::string& name, std::vector<nb::object>& keep) {
    FLASHLM_CHECK(nb::isinstance<nb::tuple>(spec), name, ": expected a tuple (raw, ggml_type, n, k, bias)");
    auto t = nb::borrow<nb::tuple>(spec);
    FLASHLM_CHECK(t.size() == 5, name, ": expected (raw, ggml_type, n, k, bias), got ", t.size(), " items");
    runtime::QuantLinear l;
    l.weight = array(t[0], name + ".raw", keep);
    l.type = type_named(t[1], name + ": ggml_type");
    FLASHLM_CHECK(nb::try_cast(t[2], l.n) && nb::try_cast(t[3], l.k), name, ": n and k must be integers");
    if (!t[4].is_none()) l.bias = array(t[4], name + ".bias", keep);
    return l;
  }

  // A linear spec, or None for an absent one (a mixture-of-experts layer's MLP without a shared expert).
  static runtime::QuantLinear optional_linear(nb::handle spec, const std::string& name, std::vector<nb::object>& keep) {
    return spec.is_none() ? runtime::QuantLinear{} : linear(spec, name, keep);
  }

  // spec: (data, type name, E, N, K): a float tensor [E, N, K] of that dtype, or uint8 GGML blocks.
  static ExpertWeights experts(nb::handle spec, const std::string& name, std::vector<nb::object>& keep) {
    FLASHLM_CHECK(nb::isinstance<nb::tuple>(spec), name, ": expected a tuple (data, type, E, N, K)");
    auto t = nb::borrow<nb::tuple>(spec);
    FLASHLM_CHECK(t.size() == 5, name, ": expected (data, type, E, N, K), got ", t.size(), " items");
    ExpertWeights w;
    w.data = array(t[0], name + ".data", keep);
    w.type = type_named(t[1], name + ": type");
    FLASHLM_CHECK(nb::try_cast(t[2], w.num_experts) && nb::try_cast(t[3], w.n) && nb::try_cast(t[4], w.k), name,
                  ": E, N and K must be integers");
    return w;
  }

  // spec: (router, top_k, renormalize, gate, up, down, shared_gate or None): the router a `linear` spec or a
  // float32 [E, d] tensor, the experts `experts` specs.
  static runtime::DecoderMoe moe(nb::handle spec, const std::string& name, std::vector<nb::object>& keep) {
    FLASHLM_CHECK(nb::isinstance<nb::tuple>(spec), name, ": expected a tuple");
    auto t = nb::borrow<nb::tuple>(spec);
    FLASHLM_CHECK(t.size() == 7, name, ": expected 7 items (router, top_k, renormalize, gate, up, down, shared_gate), got ",
                  t.size());
    runtime::DecoderMoe m;
    if (nb::isinstance<nb::tuple>(t[0])) m.router = linear(t[0], name + ".router", keep);
    else m.router_f32 = array(t[0], name + ".router", keep);
    FLASHLM_CHECK(nb::try_cast(t[1], m.top_k) && m.top_k >= 1, name, ".top_k: must be an integer >= 1");
    FLASHLM_CHECK(nb::isinstance<nb::bool_>(t[2]), name, ".renormalize: must be a bool");
    m.renormalize = nb::cast<bool>(t[2]);
    m.gate = experts(t[3], name + ".gate", keep);
    m.up = experts(t[4], name + ".up", keep);
    m.down = experts(t[5], name + ".down", keep);
    if (!t[6].is_none()) m.shared_gate = array(t[6], name + ".shared_gate", keep);
    return m;
  }

  // layers: per layer (attn_norm, q, k, v, o, mlp_norm, gate, up, down), each linear a `linear` spec, and
  // optionally four more: q_norm and k_norm (or None), the sliding window (0: none) and a `moe` spec (or None;
  // with one, gate, up and down are its shared expert or None); then optionally three more (gemma's):
  // post_attn_norm and post_mlp_norm (or None) and local_rope (a bool). The factors: as DecoderConfig's.
  Decoder(int64_t d_model, int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t d_ff, double eps,
          nb::list specs, double softmax_scale, double attn_softcap, double embedding_scale, bool gelu)
      : d_model(d_model) {
    std::vector<runtime::DecoderLayer> layers;
    for (size_t i = 0; i < specs.size(); ++i) {
      const std::string at = "layers[" + std::to_string(i) + "]";
      FLASHLM_CHECK(nb::isinstance<nb::tuple>(specs[i]), at, ": expected a tuple");
      auto s = nb::borrow<nb::tuple>(specs[i]);
      FLASHLM_CHECK(s.size() == 9 || s.size() == 13 || s.size() == 16, at,
                    ": expected 9 items (attn_norm, q, k, v, o, mlp_norm, gate, up, down), 13 (then q_norm, "
                    "k_norm, window, moe) or 16 (then post_attn_norm, post_mlp_norm, local_rope), got ", s.size());
      runtime::DecoderLayer l;
      l.attn_norm = array(s[0], at + ".attn_norm", keep_layers);
      l.q = linear(s[1], at + ".q", keep_layers);
      l.k = linear(s[2], at + ".k", keep_layers);
      l.v = linear(s[3], at + ".v", keep_layers);
      l.o = linear(s[4], at + ".o", keep_layers);
      l.mlp_norm = array(s[5], at + ".mlp_norm", keep_layers);
      l.gate = optional_linear(s[6], at + ".gate", keep_layers);
      l.up = optional_linear(s[7], at + ".up", keep_layers);
      l.down = optional_linear(s[8], at + ".down", keep_layers);
      if (s.size() >= 13) {
        if (!s[9].is_none()) l.q_norm = array(s[9], at + ".q_norm", keep_layers);
        if (!s[10].is_none()) l.k_norm = array(s[10], at + ".k_norm", keep_layers);
        FLASHLM_CHECK(nb::try_cast(s[11], l.window), at, ".window: must be an integer");
        if (!s[12].is_none()) l.moe = moe(s[12], at + ".moe", keep_layers);
      }
      if (s.size() == 16) {
        if (!s[13].is_none()) l.post_attn_norm = array(s[13], at + ".post_attn_norm", keep_layers);
        if (!s[14].is_none()) l.post_mlp_norm = array(s[14], at + ".post_mlp_norm", keep_layers);
        FLASHLM_CHECK(nb::isinstance<nb::bool_>(s[15]), at, ".local_rope: must be a bool");
        l.local_rope = nb::cast<bool>(s[15]);
      }
      layers.push_back(l);
    }
    runtime::DecoderConfig c{d_model, n_head, n_kv_head, head_dim, d_ff, eps};
    c.softmax_scale = softmax_scale;
    c.attn_softcap = attn_softcap;
    c.embedding_scale = embedding_scale;
    c.activation = gelu ? runtime::MlpActivation::GeluTanh : runtime::MlpActivation::SiLU;
    impl = std::make_unique<runtime::Decoder>(c, std::move(layers));
  }

  // (embedding table, its type name, final_norm, head spec or None). The table: uint8 GGML blocks
  // [vocab, row bytes] of the type, or a float tensor [vocab, d_model] whose dtype the type names.
  void set_ends(nb::handle table, const std::string& type_name, nb::handle final_norm, nb::handle head) {
    std::optional<DType> type = dtype_from_name(type_name);
    FLASHLM_CHECK(type.has_value(), "embedding_type: unknown type '", type_name, "'");
    std::vector<nb::object> keep;
    TensorView raw = array(table, "embedding", keep);
    FLASHLM_CHECK(raw.ndim == 2 && raw.is_contiguous(), "embedding: expected a contiguous 2-D table, got ",
                  raw.shape_string());
    const int64_t vocab = raw.shape[0], d = d_model;
    FLASHLM_CHECK(vocab > 0, "embedding: the table has no rows");
    if (raw.dtype == DType::U8) {
      FLASHLM_CHECK(d % dtype_info(*type).block_size == 0 && raw.numel() == storage_bytes(*type, vocab * d),
                    "embedding: ", vocab, " rows of ", d, " ", type_name, " values take ",
                    storage_bytes(*type, vocab * d), " bytes, the table has ", raw.numel());
    } else {
      FLASHLM_CHECK(raw.dtype == *type && raw.shape[1] == d, "embedding: expected ", type_name, " [", vocab, ", ", d,
                    "], got ", dtype_name(raw.dtype), " ", raw.shape_string());
    }
    runtime::DecoderEnds e;
    e.embedding = TensorView::contiguous(raw.data, *type, {vocab, d});
    e.final_norm = array(final_norm, "final_norm", keep);
    e.head = head.is_none() ? runtime::QuantLinear{} : linear(head, "head", keep);
    impl->set_ends(e);
    keep_ends = std::move(keep);  // the previous ends' arrays are no longer read
  }

  runtime::DecoderStep step(Array positions, Array rope_cos, Array rope_sin, nb::handle k_caches, nb::handle v_caches,
                            Array slot_mapping, Array block_table, Array seq_lens, std::optional<Array> cu_seqlens_q,
                            int64_t max_seqlen_q, std::optional<Array> rope_local_cos,
                            std::optional<Array> rope_local_sin) {
    runtime::DecoderStep s;
    s.positions = to_view(positions, "positions");
    s.rope_cos = to_view(rope_cos, "rope_cos");
    s.rope_sin = to_view(rope_sin, "rope_sin");
    s.k_caches = arrays(k_caches, "k_caches");
    s.v_caches = arrays(v_caches, "v_caches");
    s.slot_mapping = to_view(slot_mapping, "slot_mapping");
    s.block_table = to_view(block_table, "block_table");
    s.seq_lens = to_view(seq_lens, "seq_lens");
    s.cu_seqlens_q = optional_view(cu_seqlens_q, "cu_seqlens_q");
    s.max_seqlen_q = max_seqlen_q;
    if (rope_local_cos) s.rope_local_cos = to_view(*rope_local_cos, "rope_local_cos");
    if (rope_local_sin) s.rope_local_sin = to_view(*rope_local_sin, "rope_local_sin");
    return s;
  }

  void logits(Array tokens, Array positions, Array rope_cos, Array rope_sin, nb::handle k_caches, nb::handle v_caches,
              Array slot_mapping, Array block_table, Array seq_lens, std::optional<Array> cu_seqlens_q,
              int64_t max_seqlen_q, Array logits_rows, Array out, std::optional<Array> rope_local_cos,
              std::optional<Array> rope_local_sin) {
    runtime::DecoderStep s = step(positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table,
                                  seq_lens, cu_seqlens_q, max_seqlen_q, rope_local_cos, rope_local_sin);
    const TensorView tv = to_view(tokens, "tokens"), rv = to_view(logits_rows, "logits_rows"), ov = to_view(out, "out");
    nb::gil_scoped_release release;
    impl->logits(tv, rv, std::move(s), ov);
  }

  void forward(Array x, Array positions, Array rope_cos, Array rope_sin, nb::handle k_caches, nb::handle v_caches,
               Array slot_mapping, Array block_table, Array seq_lens, std::optional<Array> cu_seqlens_q,
               int64_t max_seqlen_q, std::optional<Array> rope_local_cos, std::optional<Array> rope_local_sin) {
    runtime::DecoderStep s = step(positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table,
                                  seq_lens, cu_seqlens_q, max_seqlen_q, rope_local_cos, rope_local_sin);
    s.x = to_view(x, "x");
    nb::gil_scoped_release release;
    impl->forward(s);
  }
};

// The training path's rotary embedding (flashlm/runtime/rope.h); out is allocated by the caller.
void rope_rotate(Array x, Array cos, Array sin, Array out, bool transpose, uintptr_t stream) {
  runtime::RopeParams p;
  p.x = to_view(x, "x");
  p.cos = to_view(cos, "cos");
  p.sin = to_view(sin, "sin");
  p.out = to_view(out, "out");
  p.transpose = transpose;
  nb::gil_scoped_release release;
  runtime::rope_rotate(p, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_runtime(nb::module_& m) {
  m.def("rope_rotate", &rope_rotate, nb::arg("x"), nb::arg("cos"), nb::arg("sin"), nb::arg("out"),
        nb::arg("transpose") = false, nb::arg("stream") = 0,
        "rotate-half rope of x [..., T, heads, hd] (or its transpose, the gradient); see flashlm/runtime/rope.h");
  nb::class_<Decoder>(m, "Decoder", "A Llama-family model's decoder layers on the CPU; see flashlm/runtime/decoder.h")
      .def(nb::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, nb::list, double, double, double, bool>(),
           nb::arg("d_model"), nb::arg("n_head"), nb::arg("n_kv_head"), nb::arg("head_dim"), nb::arg("d_ff"),
           nb::arg("eps"), nb::arg("layers"), nb::arg("softmax_scale") = 0.0, nb::arg("attn_softcap") = 0.0,
           nb::arg("embedding_scale") = 0.0, nb::arg("gelu") = false)
      .def_prop_ro("num_layers", [](const Decoder& d) { return d.impl->num_layers(); })
      .def_prop_ro("has_ends", [](const Decoder& d) { return d.impl->has_ends(); })
      .def_prop_ro("has_head", [](const Decoder& d) { return d.impl->has_head(); })
      .def("set_ends", &Decoder::set_ends, nb::arg("embedding"), nb::arg("embedding_type"), nb::arg("final_norm"),
           nb::arg("head").none(), "The token embedding table, the final norm and the head (None: the caller's)")
      .def("logits", &Decoder::logits, nb::arg("tokens"), nb::arg("positions"), nb::arg("rope_cos"),
           nb::arg("rope_sin"), nb::arg("k_caches"), nb::arg("v_caches"), nb::arg("slot_mapping"),
           nb::arg("block_table"), nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(), nb::arg("max_seqlen_q"),
           nb::arg("logits_rows"), nb::arg("out"), nb::arg("rope_local_cos").none() = nb::none(),
           nb::arg("rope_local_sin").none() = nb::none(),
           "One step from token ids to the logits of logits_rows (or their normed rows without a head) in out")
      .def("forward", &Decoder::forward, nb::arg("x"), nb::arg("positions"), nb::arg("rope_cos"), nb::arg("rope_sin"),
           nb::arg("k_caches"), nb::arg("v_caches"), nb::arg("slot_mapping"), nb::arg("block_table"),
           nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(), nb::arg("max_seqlen_q"),
           nb::arg("rope_local_cos").none() = nb::none(), nb::arg("rope_local_sin").none() = nb::none(),
           "Runs every layer on x [T, d_model] (float32) in place for one step over the paged caches");
}

}  // namespace flashlm::bindings
