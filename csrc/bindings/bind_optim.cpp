// Optimizer kernels: the fused AdamW step over a list of parameters (one parameter group: shared
// hyperparameters, a step count per parameter), in place, without the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "convert.h"
#include "flashlm/optim/adamw.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

void adamw_step(const std::vector<Array>& params, const std::vector<Array>& grads,
                const std::vector<Array>& exp_avgs, const std::vector<Array>& exp_avg_sqs,
                const std::vector<int64_t>& steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool maximize, uintptr_t stream) {
  const size_t n = params.size();
  FLASHLM_CHECK(grads.size() == n, "grads: ", grads.size(), " tensors for ", n, " params");
  FLASHLM_CHECK(exp_avgs.size() == n, "exp_avgs: ", exp_avgs.size(), " tensors for ", n, " params");
  FLASHLM_CHECK(exp_avg_sqs.size() == n, "exp_avg_sqs: ", exp_avg_sqs.size(), " tensors for ", n, " params");
  FLASHLM_CHECK(steps.size() == n, "steps: ", steps.size(), " values for ", n, " params");
  std::vector<optim::AdamWParams> list(n);
  for (size_t i = 0; i < n; ++i) {
    optim::AdamWParams& a = list[i];
    a.param = to_view(params[i], "param");
    a.grad = to_view(grads[i], "grad");
    a.exp_avg = to_view(exp_avgs[i], "exp_avg");
    a.exp_avg_sq = to_view(exp_avg_sqs[i], "exp_avg_sq");
    a.lr = lr;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
    a.weight_decay = weight_decay;
    a.step = steps[i];
    a.maximize = maximize;
  }
  nb::gil_scoped_release release;
  optim::adamw_step_multi(list, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_optim(nb::module_& m) {
  m.def("adamw_step", &adamw_step, nb::arg("params"), nb::arg("grads"), nb::arg("exp_avgs"), nb::arg("exp_avg_sqs"),
        nb::arg("steps"), nb::arg("lr"), nb::arg("beta1"), nb::arg("beta2"), nb::arg("eps"), nb::arg("weight_decay"),
        nb::arg("maximize"), nb::arg("stream") = 0,
        "Fused AdamW step over a parameter group, in place (flashlm/optim/adamw.h)");
}

}  // namespace flashlm::bindings
