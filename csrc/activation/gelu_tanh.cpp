// gelu_tanh dispatcher: checks the views (naming them) and runs the training kernels (checks.cpp routes them).
#include "flashlm/activation/gelu_tanh.h"

#include "train_kernels.h"

namespace flashlm::activation {

void gelu_tanh(const TensorView& x, const TensorView& out, void* stream) {
  detail::check_dtype(x, "x");
  detail::check_like(x, "x", x, "x");
  detail::check_like(out, "out", x, "x");
  detail::check_out(out, "out", x, "x");
  detail::TrainArgs a;
  a.op = detail::TrainOp::GeluTanh;
  a.dtype = x.dtype;
  a.in0 = x.data;
  a.out = out.data;
  a.n = x.numel();
  detail::run(a, x, "gelu_tanh", stream);
}

void gelu_tanh_backward(const TensorView& x, const TensorView& dout, const TensorView& dx, void* stream) {
  detail::check_dtype(x, "x");
  detail::check_like(x, "x", x, "x");
  detail::check_like(dout, "dout", x, "x");
  detail::check_like(dx, "dx", x, "x");
  detail::check_out(dx, "dx", x, "x");
  detail::check_out(dx, "dx", dout, "dout");
  detail::TrainArgs a;
  a.op = detail::TrainOp::GeluTanhBackward;
  a.dtype = x.dtype;
  a.in0 = x.data;
  a.in1 = dout.data;
  a.out = dx.data;
  a.n = x.numel();
  detail::run(a, x, "gelu_tanh_backward", stream);
}

}  // namespace flashlm::activation
