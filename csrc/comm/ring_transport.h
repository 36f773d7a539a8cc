// What the ring algorithm (ring.cpp) needs from a transport: move one slice to the right neighbour while
// taking one from the left neighbour, and combine what arrives into the local buffer. Implemented by
// shm_transport.cpp (CPU processes of one host) and nccl_transport.cpp (GPUs).
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"
#include "flashlm/core/tensor.h"

namespace flashlm::comm::detail {

enum class Combine : int32_t {
  Copy,      // dst := received
  Sum,       // dst := dst + received
  SumDivide,  // dst := (dst + received) / divisor (the last reduce-scatter step of an average)
};

// Identifies one collective call, so that a receiver can tell when ranks called different ones.
struct CallTag {
  uint32_t kind;  // 1 allreduce, 2 reduce_scatter, 3 all_gather, 4 broadcast
  uint32_t dtype;
  int64_t count;
  uint64_t packed() const {
    return (uint64_t(kind) << 56) ^ (uint64_t(dtype) << 48) ^ (uint64_t(count) & 0xFFFFFFFFFFFFull);
  }
};

class RingTransport {
 public:
  virtual ~RingTransport() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual Device device() const = 0;
  virtual int64_t slice_bytes() const = 0;

  // Brackets one collective on `dtype` elements (U8 for broadcast's bytes). `stream`: cudaStream_t or null.
  virtual void begin(const CallTag& tag, DType dtype, void* stream) = 0;
  // A new ring step starts: data received in earlier steps may now be sent on.
  virtual void step() = 0;
  // One slice: send `send_count` elements from `send` to the right neighbour (none if send is null) and
  // receive `recv_count` elements from the left neighbour into `recv` as `combine` says (none if recv is
  // null). The shm transport is done with both pointers when it returns; NCCL only queues the work.
  virtual void exchange(const void* send, int64_t send_count, void* recv, int64_t recv_count, Combine combine,
                        float divisor) = 0;
  virtual void end() = 0;
  // The collective failed on this rank: make the peers fail promptly too. The transport is unusable after.
  virtual void abort() noexcept = 0;
};

// The reduction kernels: dst[i] := (dst[i] + src[i]) / divisor in f32, correctly rounded (no division
// when divisor == 1), then rounded once to the dtype.
void reduce_add_scalar(DType dtype, void* dst, const void* src, int64_t n, float divisor);
void reduce_add_avx2(DType dtype, void* dst, const void* src, int64_t n, float divisor);
void reduce_add_cpu(DType dtype, void* dst, const void* src, int64_t n, float divisor);  // AVX2 or scalar
void reduce_add_cuda(DType dtype, void* dst, const void* src, int64_t n, float divisor, int device, void* stream);

}  // namespace flashlm::comm::detail
