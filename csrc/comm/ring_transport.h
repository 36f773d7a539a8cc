// What the ring algorithm (ring.cpp) needs from a transport: move one slice to the right neighbour while
// taking one from the left neighbour, and combine what arrives into the local buffer; or, for a transport
// that relays, combine what arrives and pass the result straight on. Implemented by shm_transport.cpp (CPU
// processes of one host; relays) and nccl_transport.cpp (GPUs; queues work on streams).
#pragma once

#include <cstdint>
#include <string>

#include "flashlm/core/dtype.h"
#include "flashlm/core/error.h"
#include "flashlm/core/tensor.h"

namespace flashlm::comm::detail {

enum class Combine : int32_t {
  Copy,      // dst := received
  Sum,       // dst := dst + received
  SumDivide,  // dst := (dst + received) / divisor (the last reduce-scatter step of an average)
};

// Identifies one collective call, so that a receiver can tell when ranks called different ones.
struct CallTag {
  uint32_t kind;  // 1 allreduce, 2 reduce_scatter, 3 all_gather, 4 broadcast, 5 sendrecv (count: bytes)
  uint32_t dtype;
  int64_t count;
  uint64_t packed() const {
    return (uint64_t(kind) << 56) ^ (uint64_t(dtype) << 48) ^ (uint64_t(count) & 0xFFFFFFFFFFFFull);
  }
  static CallTag unpacked(uint64_t p) {
    return CallTag{uint32_t(p >> 56), uint32_t((p >> 48) & 0xFF), int64_t(p & 0xFFFFFFFFFFFFull)};
  }
};
constexpr uint32_t kSendRecvKind = 5;

class RingTransport {
 public:
  virtual ~RingTransport() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual Device device() const = 0;
  virtual int64_t slice_bytes() const = 0;

  // Brackets one collective on `dtype` elements (U8 for broadcast's bytes). `stream`: cudaStream_t or null.
  virtual void begin(const CallTag& tag, DType dtype, void* stream) = 0;
  // After begin: the tag the left neighbour's slices carry when it differs from ours (sendrecv, where each
  // side names the message it sends). A transport that checks tags compares what arrives with this one.
  virtual void expect(const CallTag& tag) { (void)tag; }
  // A new ring step starts: data received in earlier steps may now be sent on.
  virtual void step() = 0;
  // One slice: send `send_count` elements from `send` to the right neighbour (none if send is null) and
  // receive `recv_count` elements from the left neighbour into `recv` as `combine` says (none if recv is
  // null). The shm transport is done with both pointers when it returns; NCCL only queues the work.
  virtual void exchange(const void* send, int64_t send_count, void* recv, int64_t recv_count, Combine combine,
                        float divisor) = 0;
  // How many slice columns ring.cpp may run step by step between relays (see there), which needs one more
  // slot than that on each edge; 0: the transport does not relay.
  virtual int64_t relay_window() const { return 0; }
  // Takes the next slice (`count` elements) from the left neighbour and computes result := received (Copy)
  // or local + received (Sum; SumDivide: / divisor), written to `out` (if not null; it may be `local`) and,
  // when `forward`, also sent on to the right neighbour as the next slice. A relaying transport writes the
  // result once, into what the right neighbour reads, and only copies it to `out` from there.
  virtual void relay(const void* local, void* out, int64_t count, Combine combine, float divisor, bool forward) {
    (void)local, (void)out, (void)count, (void)combine, (void)divisor, (void)forward;
    throw NotImplementedError("ring: this transport does not relay");
  }
  virtual void end() = 0;
  // The collective failed on this rank: make the peers fail promptly too. The transport is unusable after.
  virtual void abort() noexcept = 0;
};

// "2.5 s": a timeout in error messages, as the caller gave it.
inline std::string seconds(double s) {
  std::string out = std::to_string(s);
  while (out.size() > 1 && out.back() == '0') out.pop_back();
  if (!out.empty() && out.back() == '.') out.pop_back();
  return out + " s";
}

// The CPU reduction kernels: dst[i] := (a[i] + b[i]) / divisor in f32, correctly rounded (no division
// when divisor == 1), then rounded once to the dtype. dst may be a (in place); otherwise none overlap.
void reduce_add_scalar(DType dtype, void* dst, const void* a, const void* b, int64_t n, float divisor);
void reduce_add_avx2(DType dtype, void* dst, const void* a, const void* b, int64_t n, float divisor);
void reduce_add_cpu(DType dtype, void* dst, const void* a, const void* b, int64_t n, float divisor);  // AVX2 or scalar
// The CUDA kernel, in place: dst := (dst + src) / divisor, queued on `stream`.
void reduce_add_cuda(DType dtype, void* dst, const void* src, int64_t n, float divisor, int device, void* stream);

}  // namespace flashlm::comm::detail
