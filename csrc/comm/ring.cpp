// The ring algorithm, once for every transport. N ranks, rank r sends to r+1 and receives from r-1 (mod N).
// The buffer is cut into N chunks (chunk_begin) and each chunk into slices of the transport's slice size.
//   reduce-scatter, step s = 0..N-2: send chunk r-s-1, receive chunk r-s-2 and add it in; after the last
//     step chunk r holds the sum over all ranks (divided by N there for an average).
//   all-gather, step s = 0..N-2: send chunk r-s, receive chunk r-s-1 and copy it in.
//   allreduce: reduce-scatter, then all-gather: 2(N-1) steps, each rank sending 2(N-1)/N of the buffer.
//   broadcast: a pipelined chain from the root around the ring; each rank forwards slice k-1 while it
//     receives slice k.
//   sendrecv: one message to the right neighbour and one from the left, slice k of each in one exchange
//     (point to point: no relay, on every transport).
// Two schedules run these steps:
//   - step by step (transports that queue work: NCCL): a step moves one chunk per rank, slice by slice, so
//     that while a rank reduces slice k its left neighbour is already sending slice k+1; what a rank sends
//     at step s+1 is read back from the buffer it reduced into at step s.
//   - window by window (transports that relay: shm): a window of W slice columns (slice k of every chunk)
//     goes through all 2(N-1) steps before the next window, and what a rank receives at step s is combined
//     straight into the slot it sends at step s+1 (relay). Each byte is then written once per step instead
//     of being reduced into the buffer and copied out again, and the buffer itself is read once and written
//     once per allreduce. The ranks work at the same time, each on its own chunks; a slice waits only for
//     the left neighbour's previous step of its column, and the W columns of a step let a rank run up to W
//     slices ahead (which matters when ranks share cores). The right neighbour takes a slice sent at step s
//     while it runs step s+1, W slices later, so the transport needs W + 1 slots (relay_window()).
// Reference: exact integer sums (tests/test_dist.py) and torch.distributed's gloo allreduce.
#include "flashlm/comm/ring.h"

#include <algorithm>
#include <string>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "ring_transport.h"

namespace flashlm::comm {

using detail::CallTag;
using detail::Combine;
using detail::RingTransport;

int64_t chunk_begin(int64_t n, int world_size, int i) {
  // i * n / N without overflow for any n < 2^62 and N < 2^31.
  return (n / world_size) * i + (n % world_size) * i / world_size;
}

namespace {

int mod(int a, int n) { return ((a % n) + n) % n; }

int64_t element_bytes(DType dtype) { return dtype_info(dtype).block_bytes; }

// One ring step: send chunk `send_chunk` (-1: none) and receive chunk `recv_chunk` (-1: none), slice by
// slice. The two chunks may differ in size by one element, hence in their number of slices by one.
void run_step(RingTransport& tr, char* base, int64_t n, int64_t esize, int send_chunk, int recv_chunk,
              Combine combine, float divisor) {
  const int world = tr.world_size();
  const int64_t slice = std::max<int64_t>(1, tr.slice_bytes() / esize);
  int64_t sb = 0, se = 0, rb = 0, re = 0;
  if (send_chunk >= 0) sb = chunk_begin(n, world, send_chunk), se = chunk_begin(n, world, send_chunk + 1);
  if (recv_chunk >= 0) rb = chunk_begin(n, world, recv_chunk), re = chunk_begin(n, world, recv_chunk + 1);
  tr.step();
  for (int64_t off = 0; off < std::max(se - sb, re - rb); off += slice) {
    const bool send = off < se - sb, recv = off < re - rb;
    tr.exchange(send ? base + (sb + off) * esize : nullptr, send ? std::min(slice, se - sb - off) : 0,
                recv ? base + (rb + off) * esize : nullptr, recv ? std::min(slice, re - rb - off) : 0, combine,
                divisor);
  }
}

void reduce_scatter_steps(RingTransport& tr, char* base, int64_t n, int64_t esize, ReduceOp op) {
  const int r = tr.rank(), world = tr.world_size();
  for (int s = 0; s < world - 1; ++s) {
    const bool last = s == world - 2;
    const Combine c = last && op == ReduceOp::Avg ? Combine::SumDivide : Combine::Sum;
    run_step(tr, base, n, esize, mod(r - s - 1, world), mod(r - s - 2, world), c, float(world));
  }
}

void all_gather_steps(RingTransport& tr, char* base, int64_t n, int64_t esize) {
  const int r = tr.rank(), world = tr.world_size();
  for (int s = 0; s < world - 1; ++s) run_step(tr, base, n, esize, mod(r - s, world), mod(r - s - 1, world), Combine::Copy, 1.0f);
}

void broadcast_steps(RingTransport& tr, char* base, int64_t nbytes, int root) {
  const int world = tr.world_size(), pos = mod(tr.rank() - root, world);
  const int64_t slice = std::max<int64_t>(1, tr.slice_bytes());
  const int64_t slices = (nbytes + slice - 1) / slice;
  auto at = [&](int64_t k) { return base + k * slice; };
  auto len = [&](int64_t k) { return std::min(slice, nbytes - k * slice); };
  tr.step();
  if (pos == 0) {
    for (int64_t k = 0; k < slices; ++k) tr.exchange(at(k), len(k), nullptr, 0, Combine::Copy, 1.0f);
    return;
  }
  const bool forward = pos < world - 1;
  for (int64_t k = 0; k <= slices; ++k) {
    const bool send = forward && k >= 1, recv = k < slices;
    if (!send && !recv) continue;
    tr.exchange(send ? at(k - 1) : nullptr, send ? len(k - 1) : 0, recv ? at(k) : nullptr, recv ? len(k) : 0,
                Combine::Copy, 1.0f);
  }
}

// ---- Window by window (relaying transports) ------------------------------------------------------------

// Slice k of chunk c of an n-element buffer: where it starts and how many elements it has (0: chunk c is
// too short to have a slice k; only the last column can be partial, as chunk sizes differ by one at most).
struct Columns {
  char* base;
  int64_t n, esize, slice;
  int world;

  int64_t count(int c, int64_t k) const {
    const int64_t size = chunk_begin(n, world, c + 1) - chunk_begin(n, world, c);
    return std::clamp<int64_t>(size - k * slice, 0, slice);
  }
  char* at(int c, int64_t k) const { return base + (chunk_begin(n, world, c) + k * slice) * esize; }
  int64_t columns() const { return ((n + world - 1) / world + slice - 1) / slice; }  // the largest chunk's slices
};

Columns columns_of(const RingTransport& tr, char* base, int64_t n, int64_t esize) {
  return Columns{base, n, esize, std::max<int64_t>(1, tr.slice_bytes() / esize), tr.world_size()};
}

// Reduce-scatter of columns [k0, k1), step by step across the window: rank r sends slice k of chunk r-1,
// then each received partial sum plus its own slice goes straight on, until chunk r's sum arrives.
// `then_gather`: that sum is also the all-gather's first send (allreduce).
void reduce_scatter_window(RingTransport& tr, const Columns& cols, int64_t k0, int64_t k1, ReduceOp op,
                           bool then_gather) {
  const int r = tr.rank(), world = tr.world_size();
  const int first = mod(r - 1, world);
  for (int64_t k = k0; k < k1; ++k)
    if (int64_t m = cols.count(first, k)) tr.exchange(cols.at(first, k), m, nullptr, 0, Combine::Sum, 1.0f);
  for (int s = 0; s < world - 1; ++s) {
    const int c = mod(r - s - 2, world);
    const bool last = s == world - 2;
    const Combine combine = last && op == ReduceOp::Avg ? Combine::SumDivide : Combine::Sum;
    for (int64_t k = k0; k < k1; ++k)
      if (int64_t m = cols.count(c, k))
        tr.relay(cols.at(c, k), last ? cols.at(c, k) : nullptr, m, combine, float(world), !last || then_gather);
  }
}

// All-gather of columns [k0, k1): chunk r's slices have been sent (`sent`) or are sent now; each received
// slice is copied into the buffer and, but at the last step, passed on.
void all_gather_window(RingTransport& tr, const Columns& cols, int64_t k0, int64_t k1, bool sent) {
  const int r = tr.rank(), world = tr.world_size();
  for (int64_t k = k0; k < k1 && !sent; ++k)
    if (int64_t m = cols.count(r, k)) tr.exchange(cols.at(r, k), m, nullptr, 0, Combine::Copy, 1.0f);
  for (int s = 0; s < world - 1; ++s) {
    const int c = mod(r - s - 1, world);
    for (int64_t k = k0; k < k1; ++k)
      if (int64_t m = cols.count(c, k)) tr.relay(nullptr, cols.at(c, k), m, Combine::Copy, 1.0f, s < world - 2);
  }
}

// Runs `window(k0, k1)` over every window of the transport's relay_window() columns.
template <class Window>
void by_windows(const RingTransport& tr, const Columns& cols, Window window) {
  const int64_t w = tr.relay_window(), columns = cols.columns();
  for (int64_t k0 = 0; k0 < columns; k0 += w) window(k0, std::min(columns, k0 + w));
}

void broadcast_relayed(RingTransport& tr, char* base, int64_t nbytes, int root) {
  const int world = tr.world_size(), pos = mod(tr.rank() - root, world);
  const int64_t slice = std::max<int64_t>(1, tr.slice_bytes());
  for (int64_t off = 0; off < nbytes; off += slice) {
    const int64_t len = std::min(slice, nbytes - off);
    if (pos == 0) {
      tr.exchange(base + off, len, nullptr, 0, Combine::Copy, 1.0f);
    } else {
      tr.relay(nullptr, base + off, len, Combine::Copy, 1.0f, pos < world - 1);
    }
  }
}

bool reducible(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

}  // namespace

Ring::Ring(std::unique_ptr<RingTransport> transport) : transport_(std::move(transport)) {}
Ring::~Ring() = default;

int Ring::rank() const { return transport_->rank(); }
int Ring::world_size() const { return transport_->world_size(); }
Device Ring::device() const { return transport_->device(); }

namespace {

// Checks `t` for a collective named `what` and returns its base pointer.
char* checked_base(const RingTransport& tr, const TensorView& t, const char* what, bool reduction) {
  FLASHLM_CHECK(t.device == tr.device(), what, ": tensor is on ", t.device.is_cuda() ? "cuda" : "cpu",
                t.device.is_cuda() ? std::string(":") + std::to_string(t.device.index) : std::string(),
                " but this ring's transport moves ", tr.device().is_cuda() ? "cuda" : "cpu", " memory");
  FLASHLM_CHECK(t.is_contiguous(), what, ": tensor must be contiguous");
  if (reduction) {
    FLASHLM_CHECK(reducible(t.dtype), what, ": tensor dtype must be F32, F16 or BF16, got ", dtype_name(t.dtype));
  } else {
    FLASHLM_CHECK(!is_block_type(t.dtype), what, ": tensor dtype must be a plain type, got ", dtype_name(t.dtype));
  }
  FLASHLM_CHECK(t.data || t.numel() == 0, what, ": tensor has no data");
  return static_cast<char*>(t.data);
}

}  // namespace

// Runs `body` as one collective: serialized, and aborting the transport (here and, through it, on the
// peers) when it fails, since a half-done collective leaves the ring's counters out of step.
template <class Body>
static void run_collective(RingTransport& tr, std::mutex& mutex, const CallTag& tag, DType dtype, void* stream,
                           Body body) {
  std::lock_guard<std::mutex> lock(mutex);
  try {
    tr.begin(tag, dtype, stream);
    body();
    tr.end();
  } catch (...) {
    tr.abort();
    throw;
  }
}

void Ring::allreduce(const TensorView& t, ReduceOp op, void* stream) {
  char* base = checked_base(*transport_, t, "allreduce", true);
  const int64_t n = t.numel(), esize = element_bytes(t.dtype);
  if (world_size() == 1 || n == 0) return;
  run_collective(*transport_, mutex_, CallTag{1, uint32_t(t.dtype), n}, t.dtype, stream, [&] {
    if (transport_->relay_window() > 0) {
      const Columns cols = columns_of(*transport_, base, n, esize);
      return by_windows(*transport_, cols, [&](int64_t k0, int64_t k1) {
        reduce_scatter_window(*transport_, cols, k0, k1, op, true);
        all_gather_window(*transport_, cols, k0, k1, true);
      });
    }
    reduce_scatter_steps(*transport_, base, n, esize, op);
    all_gather_steps(*transport_, base, n, esize);
  });
}

void Ring::reduce_scatter(const TensorView& t, ReduceOp op, void* stream) {
  char* base = checked_base(*transport_, t, "reduce_scatter", true);
  const int64_t n = t.numel(), esize = element_bytes(t.dtype);
  if (world_size() == 1 || n == 0) return;
  run_collective(*transport_, mutex_, CallTag{2, uint32_t(t.dtype), n}, t.dtype, stream, [&] {
    if (transport_->relay_window() == 0) return reduce_scatter_steps(*transport_, base, n, esize, op);
    const Columns cols = columns_of(*transport_, base, n, esize);
    by_windows(*transport_, cols,
               [&](int64_t k0, int64_t k1) { reduce_scatter_window(*transport_, cols, k0, k1, op, false); });
  });
}

void Ring::all_gather(const TensorView& t, void* stream) {
  char* base = checked_base(*transport_, t, "all_gather", false);
  const int64_t n = t.numel(), esize = element_bytes(t.dtype);
  if (world_size() == 1 || n == 0) return;
  run_collective(*transport_, mutex_, CallTag{3, uint32_t(t.dtype), n}, t.dtype, stream, [&] {
    if (transport_->relay_window() == 0) return all_gather_steps(*transport_, base, n, esize);
    const Columns cols = columns_of(*transport_, base, n, esize);
    by_windows(*transport_, cols, [&](int64_t k0, int64_t k1) { all_gather_window(*transport_, cols, k0, k1, false); });
  });
}

void Ring::broadcast(const TensorView& t, int root, void* stream) {
  char* base = checked_base(*transport_, t, "broadcast", false);
  FLASHLM_CHECK(root >= 0 && root < world_size(), "broadcast: root must be in [0, ", world_size(), "), got ", root);
  const int64_t nbytes = t.numel() * element_bytes(t.dtype);
  if (world_size() == 1 || nbytes == 0) return;
  run_collective(*transport_, mutex_, CallTag{4, uint32_t(DType::U8), nbytes}, DType::U8, stream, [&] {
    if (transport_->relay_window() > 0) return broadcast_relayed(*transport_, base, nbytes, root);
    broadcast_steps(*transport_, base, nbytes, root);
  });
}

void Ring::sendrecv(const TensorView* send, const TensorView* recv, void* stream) {
  char* out = send ? checked_base(*transport_, *send, "sendrecv: send", false) : nullptr;
  char* in = recv ? checked_base(*transport_, *recv, "sendrecv: recv", false) : nullptr;
  FLASHLM_CHECK(world_size() > 1, "sendrecv: a ring of 1 rank has no neighbour to send to");
  if (!send && !recv) return;
  const int64_t out_bytes = send ? send->numel() * element_bytes(send->dtype) : 0;
  const int64_t in_bytes = recv ? recv->numel() * element_bytes(recv->dtype) : 0;
  // The tag names the message (kind, dtype, bytes): the receiver checks it against `recv`.
  const CallTag tag{detail::kSendRecvKind, uint32_t(send ? send->dtype : DType::U8), out_bytes};
  run_collective(*transport_, mutex_, tag, DType::U8, stream, [&] {
    if (recv) transport_->expect(CallTag{detail::kSendRecvKind, uint32_t(recv->dtype), in_bytes});
    // Every message is at least one slice, an empty one for 0 bytes, so that a size mismatch is seen on the
    // first slice instead of as a receiver waiting for data that never comes.
    static char empty;
    const int64_t slice = std::max<int64_t>(1, transport_->slice_bytes());
    auto slices = [&](int64_t bytes) { return std::max<int64_t>(1, (bytes + slice - 1) / slice); };
    const int64_t sends = send ? slices(out_bytes) : 0, recvs = recv ? slices(in_bytes) : 0;
    transport_->step();
    for (int64_t k = 0; k < std::max(sends, recvs); ++k) {
      const bool s = k < sends, r = k < recvs;
      const int64_t s_len = s ? std::min(slice, out_bytes - k * slice) : 0;
      const int64_t r_len = r ? std::min(slice, in_bytes - k * slice) : 0;
      transport_->exchange(s ? (out_bytes ? out + k * slice : &empty) : nullptr, s_len,
                           r ? (in_bytes ? in + k * slice : &empty) : nullptr, r_len, Combine::Copy, 1.0f);
    }
  });
}

// ---- The reduction ----------------------------------------------------------------------------------

namespace detail {
void reduce_add_cpu(DType dtype, void* dst, const void* a, const void* b, int64_t n, float divisor) {
#ifdef FLASHLM_HAVE_AVX2_KERNELS
  if (cpu_isa() == CpuIsa::AVX2) {
    reduce_add_avx2(dtype, dst, a, b, n, divisor);
    return;
  }
#endif
  reduce_add_scalar(dtype, dst, a, b, n, divisor);
}
}  // namespace detail

void reduce_add(const TensorView& dst, const TensorView& src, float divisor, void* stream) {
  FLASHLM_CHECK(reducible(dst.dtype), "reduce_add: dst dtype must be F32, F16 or BF16, got ", dtype_name(dst.dtype));
  FLASHLM_CHECK(src.dtype == dst.dtype, "reduce_add: src dtype ", dtype_name(src.dtype), " differs from dst's ",
                dtype_name(dst.dtype));
  FLASHLM_CHECK(src.device == dst.device, "reduce_add: src and dst must be on the same device");
  FLASHLM_CHECK(dst.is_contiguous() && src.is_contiguous(), "reduce_add: src and dst must be contiguous");
  FLASHLM_CHECK(src.numel() == dst.numel(), "reduce_add: src has ", src.numel(), " elements, dst ", dst.numel());
  FLASHLM_CHECK(divisor > 0.0f, "reduce_add: divisor must be > 0, got ", divisor);
  const int64_t n = dst.numel();
  if (n == 0) return;
  if (dst.device.is_cuda()) {
    if (!cuda_compiled()) throw NotImplementedError("reduce_add: flashlm was built without CUDA");
    FLASHLM_CHECK(dst.device.index >= 0 && dst.device.index < cuda_device_count(), "reduce_add: no CUDA device ",
                  dst.device.index, " (", cuda_status(), ")");
    detail::reduce_add_cuda(dst.dtype, dst.data, src.data, n, divisor, dst.device.index, stream);
    return;
  }
  detail::reduce_add_cpu(dst.dtype, dst.data, dst.data, src.data, n, divisor);
}

}  // namespace flashlm::comm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::comm::detail {
void reduce_add_cuda(DType, void*, const void*, int64_t, float, int, void*) {
  throw NotImplementedError("reduce_add: flashlm was built without CUDA");
}
}  // namespace flashlm::comm::detail
#endif

#ifndef FLASHLM_WITH_NCCL
namespace flashlm::comm {
std::string nccl_status() { return "built without the NCCL transport"; }
std::string nccl_unique_id() {
  throw NotImplementedError("NCCL: flashlm was built without the NCCL transport (FLASHLM_NCCL, needs the CUDA build)");
}
std::unique_ptr<Ring> make_nccl_ring(const std::string&, int, int, int, const RingOptions&) {
  throw NotImplementedError("NCCL: flashlm was built without the NCCL transport (FLASHLM_NCCL, needs the CUDA build)");
}
}  // namespace flashlm::comm
#endif
