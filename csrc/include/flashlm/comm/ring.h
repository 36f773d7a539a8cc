// Ring collectives: allreduce (reduce-scatter then all-gather, 2(N-1) steps), reduce-scatter, all-gather
// and broadcast, written once (comm/ring.cpp) and run over one of two transports:
//   - shared memory between CPU processes of one host (POSIX shm, one segment per ring edge);
//   - NCCL point-to-point (ncclSend/ncclRecv in grouped calls) between GPUs, with flashlm's own CUDA
//     reduction kernel; libnccl.so.2 is loaded at run time.
// Ring::sendrecv moves a tensor to the neighbour (pipeline stages).
// All collectives work in place on one contiguous tensor of f32, f16 or bf16 (broadcast: any dtype) of any
// element count, 0 and 1 included. f16/bf16 are accumulated in f32 and rounded once per ring step.
//
// A Ring is collective: every rank constructs it, and every rank calls the same collectives in the same
// order with the same element count and dtype (a mismatch is detected on the shm transport and raised).
// Calls on one Ring are serialized; a failed call (timeout, dead peer, mismatch) aborts the Ring on every
// rank, and later calls raise at once.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::comm {

enum class ReduceOp : int32_t { Sum = 0, Avg = 1 };

namespace detail {
class RingTransport;
}

struct RingOptions {
  // How long one wait for a peer may take before the call fails with "rank R did not ... within T s" (shm),
  // or creating the communicator or one collective before the communicator is aborted and the call fails
  // with "rank R timed out after T s ..." (NCCL).
  double timeout_s = 60.0;
  // Bytes per pipelined slice (0: the transport's default) and, for shm, slices in flight per ring edge
  // (at least 2 to relay, see comm/ring.cpp; 1 runs the step-by-step schedule).
  int64_t slice_bytes = 0;
  int slots = 0;
};

class FLASHLM_API Ring {
 public:
  explicit Ring(std::unique_ptr<detail::RingTransport> transport);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  int rank() const;
  int world_size() const;
  Device device() const;

  // t := sum (or mean) over ranks of t. `stream` is a cudaStream_t for the NCCL transport (work is queued
  // on it after the stream's earlier work, and the call returns once it has finished, waiting at most the
  // ring's timeout), ignored for shm (the call returns when t holds the result).
  void allreduce(const TensorView& t, ReduceOp op, void* stream = nullptr);
  // Splits t into world_size() chunks (chunk_begin) and leaves the sum (or mean) over ranks of chunk
  // rank() in that chunk of t; the other chunks hold partial sums afterwards.
  void reduce_scatter(const TensorView& t, ReduceOp op, void* stream = nullptr);
  // Chunk rank() of t is this rank's contribution; afterwards every chunk holds its owner's.
  void all_gather(const TensorView& t, void* stream = nullptr);
  // t := root's t (the bytes; any dtype).
  void broadcast(const TensorView& t, int root, void* stream = nullptr);
  // Point to point: sends `send`'s bytes (any plain dtype) to the right neighbour, (rank + 1) % N, while
  // receiving the left neighbour's into `recv`; either may be null (one side only; both null: nothing).
  // On a 2-rank ring both neighbours are the one peer. `send` may be read again and `recv` read once the
  // call returns (NCCL: once `stream` reaches it, as the collectives). Every call pairs with one of the
  // left neighbour that sends (and one of the right neighbour that receives), in order; the shm transport
  // raises when what arrives differs in bytes or dtype from `recv`. A 1-rank ring has no neighbour.
  void sendrecv(const TensorView* send, const TensorView* recv, void* stream = nullptr);

 private:
  std::unique_ptr<detail::RingTransport> transport_;
  std::mutex mutex_;
};

// Element offset where chunk i of an n-element buffer starts (chunk i is [chunk_begin(i), chunk_begin(i+1));
// sizes differ by at most one element).
FLASHLM_API int64_t chunk_begin(int64_t n, int world_size, int i);

// Shared-memory ring of `world_size` processes on this host. `job` names the job's segments
// (/dev/shm/flashlm-<job>-<rank>; letters, digits, '-', '_' and '.'), and must be the same on every rank
// and new for every Ring. Returns once the ring is connected; each segment is unlinked as soon as its
// reader has mapped it, so nothing is left behind even if a process is killed later.
FLASHLM_API std::unique_ptr<Ring> make_shm_ring(const std::string& job, int rank, int world_size,
                                                const RingOptions& options = {});

// NCCL: a 128-byte ncclUniqueId that rank 0 makes and sends to the others (through torch.distributed's
// store); every rank then calls make_nccl_ring with it. Both throw flashlm::Error naming the cause when
// the build has no NCCL transport, libnccl.so.2 cannot be loaded or is older than NCCL 2.18; make_nccl_ring
// also when the communicator is not up within options.timeout_s (it is then aborted).
constexpr int kNcclUniqueIdBytes = 128;
FLASHLM_API std::string nccl_unique_id();
FLASHLM_API std::unique_ptr<Ring> make_nccl_ring(const std::string& unique_id, int rank, int world_size, int device,
                                                 const RingOptions& options = {});
// "NCCL 2.27.3", or why NCCL is unavailable ("built without the NCCL transport", "libnccl.so.2: ...").
FLASHLM_API std::string nccl_status();

// dst := (dst + src) / divisor elementwise, in f32 (the division correctly rounded, so an average is the
// f32 sum divided by N as torch computes it), rounded once to the dtype (f32, f16 or bf16): the reduction
// the ring runs at each step, exposed for testing. CPU (AVX2 or scalar) or CUDA (queued on `stream`).
FLASHLM_API void reduce_add(const TensorView& dst, const TensorView& src, float divisor = 1.0f,
                            void* stream = nullptr);

}  // namespace flashlm::comm
