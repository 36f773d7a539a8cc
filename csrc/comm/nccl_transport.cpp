// The NCCL transport: GPUs, one rank per device. Data moves with ncclSend/ncclRecv in grouped calls;
// the reduction is flashlm's own kernel (reduce_cuda.cu). libnccl.so.2 is loaded with dlopen the first
// time it is needed (FLASHLM_NCCL_LIBRARY may name the file), so flashlm builds and imports without it.
//
// Two streams overlap moving and reducing: the caller's stream runs the reductions, the ring's own
// stream the sends and receives. A reducing step receives slice k into scratch buffer k % 2 on the comm
// stream while the caller's stream reduces slice k-1 out of the other buffer; events order the two (the
// comm stream reuses a buffer only after the reduction that read it, and the caller's stream reduces a
// slice only after it arrived). At a step boundary the comm stream waits for every reduction so far,
// since the chunk it sends next is the one just reduced. A copying step (all-gather, broadcast) receives
// straight into the tensor. The collective starts after the caller's stream's earlier work and the
// caller's stream continues only after the last receive: the call itself returns without waiting.
//
// NCCL's declarations are written out here (ABI of nccl.h, stable since NCCL 2.0): the build needs no
// NCCL headers.
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "../core/cuda_guard.h"
#include "flashlm/comm/ring.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "ring_transport.h"

namespace flashlm::comm {
namespace detail {
namespace {

// ---- The part of nccl.h this file uses ---------------------------------------------------------------
using ncclComm_t = struct ncclComm*;
struct ncclUniqueId {
  char internal[kNcclUniqueIdBytes];
};
enum ncclResult_t : int { ncclSuccess = 0, ncclInProgress = 7 };
enum ncclDataType_t : int { ncclUint8 = 1, ncclFloat16 = 6, ncclFloat32 = 7, ncclBfloat16 = 9 };

struct NcclApi {
  ncclResult_t (*GetVersion)(int*);
  ncclResult_t (*GetUniqueId)(ncclUniqueId*);
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommAbort)(ncclComm_t);
  ncclResult_t (*GroupStart)();
  ncclResult_t (*GroupEnd)();
  ncclResult_t (*Send)(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*Recv)(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  const char* (*GetErrorString)(ncclResult_t);
  std::string error;  // why loading failed; empty once loaded
  int version = 0;
};

template <class F>
bool resolve(void* lib, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) error = std::string("libnccl.so.2 has no ") + name;
  return fn != nullptr;
}

const NcclApi& nccl() {
  static const NcclApi api = [] {
    NcclApi a{};
    const char* env = std::getenv("FLASHLM_NCCL_LIBRARY");
    const char* path = env && *env ? env : "libnccl.so.2";
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      a.error = std::string("cannot load ") + path + " (" + (why ? why : "unknown error") +
                "); install NCCL (pip install nvidia-nccl-cu13, which CUDA builds of torch bring) or set "
                "FLASHLM_NCCL_LIBRARY to its path";
      return a;
    }
    bool ok = resolve(lib, "ncclGetVersion", a.GetVersion, a.error) &&
              resolve(lib, "ncclGetUniqueId", a.GetUniqueId, a.error) &&
              resolve(lib, "ncclCommInitRank", a.CommInitRank, a.error) &&
              resolve(lib, "ncclCommDestroy", a.CommDestroy, a.error) &&
              resolve(lib, "ncclCommAbort", a.CommAbort, a.error) &&
              resolve(lib, "ncclGroupStart", a.GroupStart, a.error) && resolve(lib, "ncclGroupEnd", a.GroupEnd, a.error) &&
              resolve(lib, "ncclSend", a.Send, a.error) && resolve(lib, "ncclRecv", a.Recv, a.error) &&
              resolve(lib, "ncclGetErrorString", a.GetErrorString, a.error);
    if (ok && a.GetVersion(&a.version) != ncclSuccess) a.version = 0;
    return a;  // the library stays loaded for the life of the process
  }();
  return api;
}

const NcclApi& nccl_or_throw() {
  const NcclApi& a = nccl();
  if (!a.error.empty()) throw Error("NCCL transport: " + a.error);
  return a;
}

void check(cudaError_t err, const char* what) { throw_on_cuda_error(err, std::string("NCCL transport: ") + what); }

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess && r != ncclInProgress)
    throw Error(std::string("NCCL transport: ") + what + " failed: " + nccl().GetErrorString(r));
}

ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::F32: return ncclFloat32;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    default: return ncclUint8;  // broadcast moves bytes
  }
}

// 4 MiB slices: large enough that a send/recv pair is bandwidth-bound on NVLink and PCIe, small enough
// that the double buffer costs 8 MiB. (Not yet measured: no multi-GPU machine in CI.)
constexpr int64_t kDefaultSliceBytes = 4 << 20;

class NcclTransport final : public RingTransport {
 public:
  NcclTransport(const std::string& unique_id, int rank, int world, int device, const RingOptions& options)
      : rank_(rank), world_(world), device_(device) {
    slice_bytes_ = options.slice_bytes > 0 ? (options.slice_bytes + 255) / 256 * 256 : kDefaultSliceBytes;
    const NcclApi& api = nccl_or_throw();
    CudaDeviceGuard guard(device_);
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), kNcclUniqueIdBytes);
    check_nccl(api.CommInitRank(&comm_, world_, id, rank_), "ncclCommInitRank");
    check(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int b = 0; b < 2; ++b) {
      check(cudaMalloc(&scratch_[b], size_t(slice_bytes_)), "cudaMalloc (ring scratch)");
      check(cudaEventCreateWithFlags(&received_[b], cudaEventDisableTiming), "cudaEventCreate");
      check(cudaEventCreateWithFlags(&reduced_[b], cudaEventDisableTiming), "cudaEventCreate");
    }
    check(cudaEventCreateWithFlags(&handoff_, cudaEventDisableTiming), "cudaEventCreate");
  }

  ~NcclTransport() override {
    CudaDeviceGuard guard(device_);
    if (comm_) (aborted_ ? nccl().CommAbort(comm_) : nccl().CommDestroy(comm_));
    for (int b = 0; b < 2; ++b) {
      if (scratch_[b]) cudaFree(scratch_[b]);
      if (received_[b]) cudaEventDestroy(received_[b]);
      if (reduced_[b]) cudaEventDestroy(reduced_[b]);
    }
    if (handoff_) cudaEventDestroy(handoff_);
    if (comm_stream_) cudaStreamDestroy(comm_stream_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  Device device() const override { return Device{DeviceType::CUDA, device_}; }
  int64_t slice_bytes() const override { return slice_bytes_; }

  void begin(const CallTag&, DType dtype, void* stream) override {
    if (aborted_) throw Error("NCCL transport: aborted after an earlier failure");
    guard_ = std::make_unique<CudaDeviceGuard>(device_);
    dtype_ = dtype;
    stream_ = static_cast<cudaStream_t>(stream);
    slice_ = 0;
    wait(comm_stream_, stream_);  // the tensor is ready once the caller's earlier work is done
  }

  void step() override {
    if (slice_ > 0) wait(comm_stream_, stream_);  // what we send next may be what was just reduced
  }

  void exchange(const void* send, int64_t send_count, void* recv, int64_t recv_count, Combine combine,
                float divisor) override {
    const NcclApi& api = nccl();
    const int b = int(slice_ % 2);
    const bool reduce = recv && combine != Combine::Copy;
    if (reduce && slice_ >= 2) check(cudaStreamWaitEvent(comm_stream_, reduced_[b], 0), "cudaStreamWaitEvent");
    check_nccl(api.GroupStart(), "ncclGroupStart");
    if (send) check_nccl(api.Send(send, size_t(send_count), nccl_type(dtype_), (rank_ + 1) % world_, comm_, comm_stream_), "ncclSend");
    if (recv)
      check_nccl(api.Recv(reduce ? scratch_[b] : recv, size_t(recv_count), nccl_type(dtype_), (rank_ + world_ - 1) % world_,
                          comm_, comm_stream_),
                 "ncclRecv");
    check_nccl(api.GroupEnd(), "ncclGroupEnd");
    if (reduce) {
      check(cudaEventRecord(received_[b], comm_stream_), "cudaEventRecord");
      check(cudaStreamWaitEvent(stream_, received_[b], 0), "cudaStreamWaitEvent");
      reduce_add_cuda(dtype_, recv, scratch_[b], recv_count, combine == Combine::SumDivide ? divisor : 1.0f, device_,
                      stream_);
      check(cudaEventRecord(reduced_[b], stream_), "cudaEventRecord");
    }
    ++slice_;
  }

  void end() override {
    wait(stream_, comm_stream_);  // the caller's later work sees every receive
    guard_.reset();
  }

  void abort() noexcept override {
    aborted_ = true;
    guard_.reset();
  }

 private:
  // `waiter` runs its later work only after what is queued on `waited` now.
  void wait(cudaStream_t waiter, cudaStream_t waited) {
    check(cudaEventRecord(handoff_, waited), "cudaEventRecord");
    check(cudaStreamWaitEvent(waiter, handoff_, 0), "cudaStreamWaitEvent");
  }

  int rank_, world_, device_;
  int64_t slice_bytes_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t comm_stream_ = nullptr, stream_ = nullptr;
  void* scratch_[2] = {nullptr, nullptr};
  cudaEvent_t received_[2] = {nullptr, nullptr}, reduced_[2] = {nullptr, nullptr}, handoff_ = nullptr;
  std::unique_ptr<CudaDeviceGuard> guard_;
  DType dtype_ = DType::U8;
  int64_t slice_ = 0;
  bool aborted_ = false;
};

}  // namespace
}  // namespace detail

std::string nccl_status() {
  const detail::NcclApi& a = detail::nccl();
  if (!a.error.empty()) return a.error;
  const int v = a.version;  // 22703 for 2.27.3 (NCCL_VERSION(X,Y,Z) = X*10000 + Y*100 + Z since 2.9)
  return "NCCL " + std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

std::string nccl_unique_id() {
  const detail::NcclApi& api = detail::nccl_or_throw();
  detail::ncclUniqueId id;
  detail::check_nccl(api.GetUniqueId(&id), "ncclGetUniqueId");
  return std::string(id.internal, kNcclUniqueIdBytes);
}

std::unique_ptr<Ring> make_nccl_ring(const std::string& unique_id, int rank, int world_size, int device,
                                     const RingOptions& options) {
  FLASHLM_CHECK(unique_id.size() == size_t(kNcclUniqueIdBytes), "unique_id: must be ", kNcclUniqueIdBytes,
                " bytes (from nccl_unique_id), got ", unique_id.size());
  FLASHLM_CHECK(world_size >= 1, "world_size: must be >= 1, got ", world_size);
  FLASHLM_CHECK(rank >= 0 && rank < world_size, "rank: must be in [0, ", world_size, "), got ", rank);
  FLASHLM_CHECK(device >= 0 && device < cuda_device_count(), "device: no CUDA device ", device, " (", cuda_status(), ")");
  FLASHLM_CHECK(options.slice_bytes >= 0 && options.slice_bytes <= (int64_t(1) << 30),
                "slice_bytes: must be in [0, 2^30] (0: default), got ", options.slice_bytes);
  return std::make_unique<Ring>(std::make_unique<detail::NcclTransport>(unique_id, rank, world_size, device, options));
}

}  // namespace flashlm::comm
