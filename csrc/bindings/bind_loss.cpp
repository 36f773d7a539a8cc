// Chunked loss steps (flashlm/loss/chunked_loss.h): state, gathered and dlogits are allocated by the caller
// (flashlm.ops.loss) and written in place; the CUDA stream comes as an integer.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "convert.h"
#include "flashlm/loss/chunked_loss.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

void logsumexp_chunk(Array logits, int64_t start, double scale, Array state, std::optional<Array> index,
                     std::optional<Array> gathered, uintptr_t stream) {
  const TensorView l = to_view(logits, "logits"), s = to_view(state, "state");
  const TensorView i = optional_view(index, "index"), g = optional_view(gathered, "gathered");
  nb::gil_scoped_release release;
  loss::logsumexp_chunk(l, start, scale, s, i, g, reinterpret_cast<void*>(stream));
}

void softmax_chunk_grad(Array logits, int64_t start, double scale, Array lse, Array coef,
                        std::optional<Array> index, std::optional<Array> weight, Array dlogits, bool accumulate,
                        uintptr_t stream) {
  const TensorView l = to_view(logits, "logits"), ls = to_view(lse, "lse"), c = to_view(coef, "coef");
  const TensorView i = optional_view(index, "index"), w = optional_view(weight, "weight");
  const TensorView d = to_view(dlogits, "dlogits");
  nb::gil_scoped_release release;
  loss::softmax_chunk_grad(l, start, scale, ls, c, i, w, d, accumulate, reinterpret_cast<void*>(stream));
}

void kl_chunk(Array logits, Array teacher, double scale, bool reverse, Array state, uintptr_t stream) {
  const TensorView l = to_view(logits, "logits"), t = to_view(teacher, "teacher"), s = to_view(state, "state");
  nb::gil_scoped_release release;
  loss::kl_chunk(l, t, scale, reverse, s, reinterpret_cast<void*>(stream));
}

void kl_chunk_grad(Array logits, Array teacher, double scale, bool reverse, Array stats, Array coef, Array dlogits,
                   bool accumulate, uintptr_t stream) {
  const TensorView l = to_view(logits, "logits"), t = to_view(teacher, "teacher");
  const TensorView s = to_view(stats, "stats"), c = to_view(coef, "coef"), d = to_view(dlogits, "dlogits");
  nb::gil_scoped_release release;
  loss::kl_chunk_grad(l, t, scale, reverse, s, c, d, accumulate, reinterpret_cast<void*>(stream));
}

void distill_chunk_grad(Array logits, Array teacher, int64_t start, double scale, bool reverse, Array stats,
                        Array coef, Array lse, Array hard_coef, std::optional<Array> index,
                        std::optional<Array> weight, Array dlogits, uintptr_t stream) {
  const TensorView l = to_view(logits, "logits"), t = to_view(teacher, "teacher");
  const TensorView s = to_view(stats, "stats"), c = to_view(coef, "coef"), ls = to_view(lse, "lse");
  const TensorView hc = to_view(hard_coef, "hard_coef"), d = to_view(dlogits, "dlogits");
  const TensorView i = optional_view(index, "index"), w = optional_view(weight, "weight");
  nb::gil_scoped_release release;
  loss::distill_chunk_grad(l, t, start, scale, reverse, s, c, ls, hc, i, w, d, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_loss(nb::module_& m) {
  m.def("logsumexp_chunk", &logsumexp_chunk, nb::arg("logits"), nb::arg("start"), nb::arg("scale"),
        nb::arg("state"), nb::arg("index").none(), nb::arg("gathered").none(), nb::arg("stream") = 0,
        "Folds a vocabulary chunk into a running logsumexp; see flashlm/loss/chunked_loss.h");
  m.def("softmax_chunk_grad", &softmax_chunk_grad, nb::arg("logits"), nb::arg("start"), nb::arg("scale"),
        nb::arg("lse"), nb::arg("coef"), nb::arg("index").none(), nb::arg("weight").none(), nb::arg("dlogits"),
        nb::arg("accumulate"), nb::arg("stream") = 0,
        "dlogits of a chunk for a softmax loss; see flashlm/loss/chunked_loss.h");
  m.def("kl_chunk", &kl_chunk, nb::arg("logits"), nb::arg("teacher"), nb::arg("scale"), nb::arg("reverse"),
        nb::arg("state"), nb::arg("stream") = 0, "Folds a chunk into a running KL; see flashlm/loss/chunked_loss.h");
  m.def("kl_chunk_grad", &kl_chunk_grad, nb::arg("logits"), nb::arg("teacher"), nb::arg("scale"),
        nb::arg("reverse"), nb::arg("stats"), nb::arg("coef"), nb::arg("dlogits"), nb::arg("accumulate"),
        nb::arg("stream") = 0, "dlogits of a chunk for the KL; see flashlm/loss/chunked_loss.h");
  m.def("distill_chunk_grad", &distill_chunk_grad, nb::arg("logits"), nb::arg("teacher"), nb::arg("start"),
        nb::arg("scale"), nb::arg("reverse"), nb::arg("stats"), nb::arg("coef"), nb::arg("lse"),
        nb::arg("hard_coef"), nb::arg("index").none(), nb::arg("weight").none(), nb::arg("dlogits"),
        nb::arg("stream") = 0, "dlogits of a chunk for cross-entropy plus the KL; see flashlm/loss/chunked_loss.h");
}

}  // namespace flashlm::bindings
