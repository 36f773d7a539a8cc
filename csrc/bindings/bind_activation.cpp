// Activation kernels: silu_mul (SwiGLU's gate). out is allocated by the caller (flashlm.ops); the CUDA stream
// comes as an integer.
#include <nanobind/nanobind.h>

#include "convert.h"
#include "flashlm/activation/silu_mul.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

void silu_mul(Array gate, Array up, Array out, uintptr_t stream) {
  const TensorView g = to_view(gate, "gate"), u = to_view(up, "up"), o = to_view(out, "out");
  nb::gil_scoped_release release;
  activation::silu_mul(g, u, o, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_activation(nb::module_& m) {
  m.def("silu_mul", &silu_mul, nb::arg("gate"), nb::arg("up"), nb::arg("out"), nb::arg("stream") = 0,
        "out = silu(gate) * up element-wise; see flashlm/activation/silu_mul.h");
}

}  // namespace flashlm::bindings
