// The CPU decoder stack (flashlm/runtime/decoder.h) as a Python object: built once from a model's layer
// weights (the tensors are kept referenced, so the views stay valid), then called once per serving step.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>
#include <vector>

#include "convert.h"
#include "flashlm/runtime/decoder.h"

namespace flashlm::bindings {
namespace {

struct Decoder {
  runtime::DecoderConfig config;
  std::vector<runtime::DecoderLayer> layers;
  std::vector<nb::object> keep;  // the arrays the layers' views point into

  TensorView array(nb::handle h, const std::string& name) {
    Array a;
    FLASHLM_CHECK(nb::try_cast(h, a), name, ": expected an array (a torch tensor), got ",
                  nb::inst_name(h).c_str());
    keep.push_back(nb::borrow(h));
    return to_view(a, name.c_str());
  }

  // spec: (raw uint8 blocks, ggml type name, n, k, bias or None)
  runtime::QuantLinear linear(nb::handle spec, const std::string& name) {
    FLASHLM_CHECK(nb::isinstance<nb::tuple>(spec), name, ": expected a tuple (raw, ggml_type, n, k, bias)");
    auto t = nb::borrow<nb::tuple>(spec);
    FLASHLM_CHECK(t.size() == 5, name, ": expected (raw, ggml_type, n, k, bias), got ", t.size(), " items");
    runtime::QuantLinear l;
    l.weight = array(t[0], name + ".raw");
    std::string type;
    FLASHLM_CHECK(nb::try_cast(t[1], type), name, ": ggml_type must be a string");
    std::optional<DType> dt = dtype_from_name(type);
    FLASHLM_CHECK(dt.has_value(), name, ": unknown ggml_type '", type, "'");
    l.type = *dt;
    FLASHLM_CHECK(nb::try_cast(t[2], l.n) && nb::try_cast(t[3], l.k), name, ": n and k must be integers");
    if (!t[4].is_none()) l.bias = array(t[4], name + ".bias");
    return l;
  }

  // layers: per layer (attn_norm, q, k, v, o, mlp_norm, gate, up, down), each linear a `linear` spec.
  Decoder(int64_t d_model, int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t d_ff, double eps,
          nb::list specs) {
    config = {d_model, n_head, n_kv_head, head_dim, d_ff, eps};
    for (size_t i = 0; i < specs.size(); ++i) {
      const std::string at = "layers[" + std::to_string(i) + "]";
      FLASHLM_CHECK(nb::isinstance<nb::tuple>(specs[i]), at, ": expected a tuple");
      auto s = nb::borrow<nb::tuple>(specs[i]);
      FLASHLM_CHECK(s.size() == 9, at, ": expected 9 items (attn_norm, q, k, v, o, mlp_norm, gate, up, down), got ",
                    s.size());
      runtime::DecoderLayer l;
      l.attn_norm = array(s[0], at + ".attn_norm");
      l.q = linear(s[1], at + ".q");
      l.k = linear(s[2], at + ".k");
      l.v = linear(s[3], at + ".v");
      l.o = linear(s[4], at + ".o");
      l.mlp_norm = array(s[5], at + ".mlp_norm");
      l.gate = linear(s[6], at + ".gate");
      l.up = linear(s[7], at + ".up");
      l.down = linear(s[8], at + ".down");
      layers.push_back(l);
    }
    runtime::check_decoder_layers(config, layers);
  }

  void forward(Array x, Array positions, Array rope_cos, Array rope_sin, nb::list k_caches, nb::list v_caches,
               Array slot_mapping, Array block_table, Array seq_lens, std::optional<Array> cu_seqlens_q,
               int64_t max_seqlen_q) {
    runtime::DecoderStep s;
    s.x = to_view(x, "x");
    s.positions = to_view(positions, "positions");
    s.rope_cos = to_view(rope_cos, "rope_cos");
    s.rope_sin = to_view(rope_sin, "rope_sin");
    for (nb::handle c : k_caches) s.k_caches.push_back(to_view(nb::cast<Array>(c), "k_caches"));
    for (nb::handle c : v_caches) s.v_caches.push_back(to_view(nb::cast<Array>(c), "v_caches"));
    s.slot_mapping = to_view(slot_mapping, "slot_mapping");
    s.block_table = to_view(block_table, "block_table");
    s.seq_lens = to_view(seq_lens, "seq_lens");
    if (cu_seqlens_q) s.cu_seqlens_q = to_view(*cu_seqlens_q, "cu_seqlens_q");
    s.max_seqlen_q = max_seqlen_q;
    nb::gil_scoped_release release;
    runtime::decoder_forward(config, layers, s);
  }
};

}  // namespace

void bind_runtime(nb::module_& m) {
  nb::class_<Decoder>(m, "Decoder", "A Llama-family model's decoder layers on the CPU; see flashlm/runtime/decoder.h")
      .def(nb::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, nb::list>(), nb::arg("d_model"),
           nb::arg("n_head"), nb::arg("n_kv_head"), nb::arg("head_dim"), nb::arg("d_ff"), nb::arg("eps"),
           nb::arg("layers"))
      .def_prop_ro("num_layers", [](const Decoder& d) { return d.layers.size(); })
      .def("forward", &Decoder::forward, nb::arg("x"), nb::arg("positions"), nb::arg("rope_cos"), nb::arg("rope_sin"),
           nb::arg("k_caches"), nb::arg("v_caches"), nb::arg("slot_mapping"), nb::arg("block_table"),
           nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(), nb::arg("max_seqlen_q"),
           "Runs every layer on x [T, d_model] (float32) in place for one step over the paged caches");
}

}  // namespace flashlm::bindings
