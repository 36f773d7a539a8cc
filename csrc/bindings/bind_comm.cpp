// Ring collectives: the Ring class (shared-memory or NCCL transport), NCCL's unique id, and the reduction
// kernel. Collectives work in place on the tensor and release the GIL (GradientSync runs them on a
// background thread while backward goes on).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>

#include <optional>
#include <string>

#include "convert.h"
#include "flashlm/comm/ring.h"

namespace nb = nanobind;

namespace flashlm::bindings {
namespace {

using comm::ReduceOp;
using comm::Ring;
using comm::RingOptions;

ReduceOp reduce_op(const std::string& op) {
  if (op == "sum") return ReduceOp::Sum;
  if (op == "avg") return ReduceOp::Avg;
  throw ValueError("op: must be 'sum' or 'avg', got '" + op + "'");
}

RingOptions ring_options(double timeout_s, int64_t slice_bytes, int slots) {
  RingOptions o;
  o.timeout_s = timeout_s;
  o.slice_bytes = slice_bytes;
  o.slots = slots;
  return o;
}

// allreduce / reduce_scatter: in place on `tensor`, without the GIL.
template <void (Ring::*Collective)(const TensorView&, ReduceOp, void*)>
void reduction(Ring& ring, Array tensor, const std::string& op, uintptr_t stream) {
  TensorView v = to_view(tensor, "tensor");
  ReduceOp o = reduce_op(op);
  nb::gil_scoped_release release;
  (ring.*Collective)(v, o, reinterpret_cast<void*>(stream));
}

}  // namespace

void bind_comm(nb::module_& m) {
  nb::class_<Ring>(m, "Ring", "A ring of processes running collectives in place (flashlm/comm/ring.h)")
      .def_prop_ro("rank", &Ring::rank)
      .def_prop_ro("world_size", &Ring::world_size)
      .def("allreduce", &reduction<&Ring::allreduce>, nb::arg("tensor"), nb::arg("op") = "sum", nb::arg("stream") = 0)
      .def("reduce_scatter", &reduction<&Ring::reduce_scatter>, nb::arg("tensor"), nb::arg("op") = "sum",
           nb::arg("stream") = 0)
      .def(
          "all_gather",
          [](Ring& r, Array t, uintptr_t stream) {
            TensorView v = to_view(t, "tensor");
            nb::gil_scoped_release release;
            r.all_gather(v, reinterpret_cast<void*>(stream));
          },
          nb::arg("tensor"), nb::arg("stream") = 0)
      .def(
          "broadcast",
          [](Ring& r, Array t, int root, uintptr_t stream) {
            TensorView v = to_view(t, "tensor");
            nb::gil_scoped_release release;
            r.broadcast(v, root, reinterpret_cast<void*>(stream));
          },
          nb::arg("tensor"), nb::arg("root"), nb::arg("stream") = 0)
      .def(
          "sendrecv",
          [](Ring& r, std::optional<Array> send, std::optional<Array> recv, uintptr_t stream) {
            std::optional<TensorView> s, v;
            if (send) s = to_view(*send, "send");
            if (recv) v = to_view(*recv, "recv");
            nb::gil_scoped_release release;
            r.sendrecv(s ? &*s : nullptr, v ? &*v : nullptr, reinterpret_cast<void*>(stream));
          },
          nb::arg("send").none(), nb::arg("recv").none(), nb::arg("stream") = 0);

  m.def(
      "shm_ring",
      [](const std::string& job, int rank, int world_size, double timeout_s, int64_t slice_bytes, int slots) {
        nb::gil_scoped_release release;  // waits for the other ranks
        return comm::make_shm_ring(job, rank, world_size, ring_options(timeout_s, slice_bytes, slots));
      },
      nb::arg("job"), nb::arg("rank"), nb::arg("world_size"), nb::arg("timeout") = 60.0, nb::arg("slice_bytes") = 0,
      nb::arg("slots") = 0, "Connect a shared-memory ring (collective: every rank calls it with the same job)");
  m.def(
      "nccl_ring",
      [](nb::bytes unique_id, int rank, int world_size, int device, double timeout_s, int64_t slice_bytes) {
        std::string id(unique_id.c_str(), unique_id.size());
        nb::gil_scoped_release release;
        return comm::make_nccl_ring(id, rank, world_size, device, ring_options(timeout_s, slice_bytes, 0));
      },
      nb::arg("unique_id"), nb::arg("rank"), nb::arg("world_size"), nb::arg("device"), nb::arg("timeout") = 60.0,
      nb::arg("slice_bytes") = 0,
      "Connect an NCCL ring (collective: every rank calls it with rank 0's unique id)");
  m.def("nccl_unique_id", [] {
    std::string id = comm::nccl_unique_id();
    return nb::bytes(id.data(), id.size());
  });
  m.def("nccl_status", &comm::nccl_status);
  m.def("chunk_begin", &comm::chunk_begin, nb::arg("n"), nb::arg("world_size"), nb::arg("i"));
  m.def(
      "reduce_add",
      [](Array dst, Array src, float divisor, uintptr_t stream) {
        TensorView d = to_view(dst, "dst"), s = to_view(src, "src");
        nb::gil_scoped_release release;
        comm::reduce_add(d, s, divisor, reinterpret_cast<void*>(stream));
      },
      nb::arg("dst"), nb::arg("src"), nb::arg("divisor") = 1.0f, nb::arg("stream") = 0,
      "dst := (dst + src) / divisor in f32, rounded once (the ring's reduction)");
}

}  // namespace flashlm::bindings
