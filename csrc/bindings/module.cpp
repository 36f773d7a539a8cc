#include <nanobind/nanobind.h>

#include "flashlm/core/error.h"

namespace nb = nanobind;

namespace flashlm::bindings {
void bind_activation(nb::module_& m);
void bind_attention(nb::module_& m);
void bind_comm(nb::module_& m);
void bind_core(nb::module_& m);
void bind_gguf(nb::module_& m);
void bind_quantize(nb::module_& m);
void bind_int_gemm(nb::module_& m);
void bind_gguf_matmul(nb::module_& m);
void bind_backward_input(nb::module_& m);
void bind_kvcache(nb::module_& m);
void bind_loss(nb::module_& m);
void bind_moe(nb::module_& m);
void bind_norm(nb::module_& m);
void bind_optim(nb::module_& m);
void bind_runtime(nb::module_& m);
}  // namespace flashlm::bindings

NB_MODULE(_C, m) {
  m.doc() = "flashlm native kernels (libflashlm); use flashlm.ops, not this module";
  // Translators run most-recently-registered first, so the generic one goes first.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const flashlm::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const flashlm::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    } catch (const flashlm::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
  flashlm::bindings::bind_activation(m);
  flashlm::bindings::bind_attention(m);
  flashlm::bindings::bind_comm(m);
  flashlm::bindings::bind_core(m);
  flashlm::bindings::bind_gguf(m);
  flashlm::bindings::bind_quantize(m);
  flashlm::bindings::bind_int_gemm(m);
  flashlm::bindings::bind_gguf_matmul(m);
  flashlm::bindings::bind_backward_input(m);
  flashlm::bindings::bind_kvcache(m);
  flashlm::bindings::bind_loss(m);
  flashlm::bindings::bind_moe(m);
  flashlm::bindings::bind_norm(m);
  flashlm::bindings::bind_optim(m);
  flashlm::bindings::bind_runtime(m);
}
