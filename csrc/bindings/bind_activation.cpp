// Activation kernels: silu_mul (SwiGLU's gate) and its backward, GELU(tanh) forward and backward. out is allocated by the caller (flashlm.ops); the CUDA stream
// comes as an integer.
#include <nanobind/nanobind.h>

#include "convert.h"
#include "flashlm/activation/gelu_tanh.h"
#include "flashlm/activation/silu_mul.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

void silu_mul(Array gate, Array up, Array out, uintptr_t stream) {
  const TensorView g = to_view(gate, "gate"), u = to_view(up, "up"), o = to_view(out, "out");
  nb::gil_scoped_release release;
  activation::silu_mul(g, u, o, reinterpret_cast<void*>(stream));
}

void silu_mul_backward(Array gate, Array up, Array dout, Array dgate, Array dup, uintptr_t stream) {
  const TensorView g = to_view(gate, "gate"), u = to_view(up, "up"), d = to_view(dout, "dout");
  const TensorView dg = to_view(dgate, "dgate"), du = to_view(dup, "dup");
  nb::gil_scoped_release release;
  activation::silu_mul_backward(g, u, d, dg, du, reinterpret_cast<void*>(stream));
}

void gelu_tanh(Array x, Array out, uintptr_t stream) {
  const TensorView xv = to_view(x, "x"), o = to_view(out, "out");
  nb::gil_scoped_release release;
  activation::gelu_tanh(xv, o, reinterpret_cast<void*>(stream));
}

void gelu_tanh_backward(Array x, Array dout, Array dx, uintptr_t stream) {
  const TensorView xv = to_view(x, "x"), d = to_view(dout, "dout"), o = to_view(dx, "dx");
  nb::gil_scoped_release release;
  activation::gelu_tanh_backward(xv, d, o, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_activation(nb::module_& m) {
  m.def("silu_mul", &silu_mul, nb::arg("gate"), nb::arg("up"), nb::arg("out"), nb::arg("stream") = 0,
        "out = silu(gate) * up element-wise; see flashlm/activation/silu_mul.h");
  m.def("silu_mul_backward", &silu_mul_backward, nb::arg("gate"), nb::arg("up"), nb::arg("dout"), nb::arg("dgate"),
        nb::arg("dup"), nb::arg("stream") = 0, "the gradients of silu_mul; see flashlm/activation/silu_mul.h");
  m.def("gelu_tanh", &gelu_tanh, nb::arg("x"), nb::arg("out"), nb::arg("stream") = 0,
        "out = gelu(x, approximate='tanh'); see flashlm/activation/gelu_tanh.h");
  m.def("gelu_tanh_backward", &gelu_tanh_backward, nb::arg("x"), nb::arg("dout"), nb::arg("dx"), nb::arg("stream") = 0,
        "dx = dout * gelu_tanh'(x); see flashlm/activation/gelu_tanh.h");
}

}  // namespace flashlm::bindings
