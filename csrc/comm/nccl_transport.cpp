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
// caller's stream continues only after the last receive.
//
// A dead peer must not hang a rank. The communicator is non-blocking (ncclCommInitRankConfig with
// blocking = 0): NCCL calls return at once, and this file polls ncclCommGetAsyncError with a deadline
// (RingOptions::timeout_s) wherever NCCL is still in progress: after creating the communicator, after each
// grouped send/receive, and at the end of every collective, which waits until the collective has finished
// on the GPU (an event on the caller's stream). On an error or at the deadline the communicator is aborted
// (ncclCommAbort, which also ends the kernels waiting for the peer) and the call raises, naming the cause.
// The wait covers the caller's work queued on the stream before the collective too.
//
// Everything the transport allocates lives in one Resources object, released (communicator aborted unless
// it is known healthy) whether construction finished or failed part way.
//
// NCCL's declarations are written out here (the ABI of nccl.h; ncclConfig_t as NCCL 2.18-2.30 lay out its
// first fields, which later versions only extend): the build needs no NCCL headers.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

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

// NCCL_VERSION(X, Y, Z) for X.Y >= 2.9.
constexpr int nccl_version(int major, int minor, int patch) { return major * 10000 + minor * 100 + patch; }

// ncclConfig_t as nccl.h declares it from NCCL 2.18 (struct ncclConfig_v21700); later versions append
// fields. NCCL reads `size` bytes of it, checks `magic`, and takes the fields a config of `version` has,
// defaulting the rest, so this prefix with size = sizeof and version = 2.18.0 is valid for NCCL >= 2.18.
struct ncclConfig_t {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char* netName;
  int splitShare;
};
static_assert(offsetof(ncclConfig_t, magic) == 8 && offsetof(ncclConfig_t, version) == 12 &&
                  offsetof(ncclConfig_t, blocking) == 16 && offsetof(ncclConfig_t, maxCTAs) == 28 &&
                  offsetof(ncclConfig_t, netName) == 32 && offsetof(ncclConfig_t, splitShare) == 40 &&
                  sizeof(ncclConfig_t) == 48,
              "ncclConfig_t must match nccl.h's layout (LP64)");
constexpr unsigned int kNcclConfigMagic = 0xcafebeef;  // NCCL_API_MAGIC
constexpr int kNcclConfigVersion = nccl_version(2, 18, 0);
constexpr int kNcclConfigUndefInt = INT_MIN;  // NCCL_CONFIG_UNDEF_INT: NCCL's default

// NCCL_CONFIG_INITIALIZER, for this layout.
ncclConfig_t nccl_config_initializer() {
  return ncclConfig_t{sizeof(ncclConfig_t), kNcclConfigMagic, unsigned(kNcclConfigVersion), kNcclConfigUndefInt,
                      kNcclConfigUndefInt,  kNcclConfigUndefInt, kNcclConfigUndefInt,        nullptr,
                      kNcclConfigUndefInt};
}

struct NcclApi {
  ncclResult_t (*GetVersion)(int*);
  ncclResult_t (*GetUniqueId)(ncclUniqueId*);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommAbort)(ncclComm_t);
  ncclResult_t (*GroupStart)();
  ncclResult_t (*GroupEnd)();
  ncclResult_t (*Send)(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*Recv)(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  const char* (*GetErrorString)(ncclResult_t);
  // Optional (NCCL >= 2.14): a missing one makes make_nccl_ring say the library is too old.
  ncclResult_t (*CommInitRankConfig)(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*);
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*);
  std::string error;  // why loading failed; empty once loaded
  int version = 0;
};

template <class F>
bool resolve(void* lib, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) error = std::string("libnccl.so.2 has no ") + name;
  return fn != nullptr;
}

template <class F>
void resolve_optional(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
}

std::string version_string(int v) {
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

// Empty if the loaded NCCL can run the ring (non-blocking communicators with this file's ncclConfig_t);
// otherwise why not.
std::string too_old(const NcclApi& a) {
  if (a.CommInitRankConfig && a.CommGetAsyncError && a.version >= kNcclConfigVersion) return {};
  return "the loaded NCCL (" + (a.version ? version_string(a.version) : std::string("version unknown")) +
         ") is too old: the ring needs NCCL >= 2.18 (ncclCommInitRankConfig with a non-blocking config, "
         "ncclCommGetAsyncError) to time out on a dead peer; install a newer nvidia-nccl wheel or point "
         "FLASHLM_NCCL_LIBRARY at a newer libnccl.so.2";
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
              resolve(lib, "ncclCommDestroy", a.CommDestroy, a.error) &&
              resolve(lib, "ncclCommAbort", a.CommAbort, a.error) &&
              resolve(lib, "ncclGroupStart", a.GroupStart, a.error) && resolve(lib, "ncclGroupEnd", a.GroupEnd, a.error) &&
              resolve(lib, "ncclSend", a.Send, a.error) && resolve(lib, "ncclRecv", a.Recv, a.error) &&
              resolve(lib, "ncclGetErrorString", a.GetErrorString, a.error);
    resolve_optional(lib, "ncclCommInitRankConfig", a.CommInitRankConfig);
    resolve_optional(lib, "ncclCommGetAsyncError", a.CommGetAsyncError);
    if (ok && a.GetVersion(&a.version) != ncclSuccess) a.version = 0;
    return a;  // the library stays loaded for the life of the process
  }();
  return api;
}

// The loaded NCCL, or an Error saying why it cannot run the ring (not loaded, too old).
const NcclApi& nccl_or_throw() {
  const NcclApi& a = nccl();
  if (!a.error.empty()) throw Error("NCCL transport: " + a.error);
  if (std::string why = too_old(a); !why.empty()) throw Error("NCCL transport: " + why);
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
    default: return ncclUint8;  // broadcast and sendrecv move bytes
  }
}

// 4 MiB slices: large enough that a send/recv pair is bandwidth-bound on NVLink and PCIe, small enough
// that the double buffer costs 8 MiB. (Not yet measured: no multi-GPU machine in CI.)
constexpr int64_t kDefaultSliceBytes = 4 << 20;

using Clock = std::chrono::steady_clock;

// Everything the transport holds; released in reverse order of acquisition, also when the constructor
// throws part way (a member is destroyed if it was constructed). The communicator is destroyed only when
// it is known healthy, aborted otherwise (ncclCommDestroy would wait for a peer that may be gone).
struct Resources {
  int device = -1;  // set before the first CUDA or NCCL call
  ncclComm_t comm = nullptr;
  bool healthy = false;
  cudaStream_t comm_stream = nullptr;
  void* scratch[2] = {nullptr, nullptr};
  cudaEvent_t received[2] = {nullptr, nullptr}, reduced[2] = {nullptr, nullptr};
  cudaEvent_t handoff = nullptr, done = nullptr;

  Resources() = default;
  Resources(const Resources&) = delete;
  Resources& operator=(const Resources&) = delete;

  void abort_comm() noexcept {
    if (comm) nccl().CommAbort(comm);  // also ends NCCL kernels still waiting on a peer
    comm = nullptr;
    healthy = false;
  }

  ~Resources() {
    if (device < 0) return;
    int previous = -1;
    if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
    cudaSetDevice(device);
    if (comm) {
      // Destroy only a communicator with nothing pending and no error, which cannot wait on a peer.
      ncclResult_t state = ncclInProgress;
      if (healthy && nccl().CommGetAsyncError(comm, &state) == ncclSuccess && state == ncclSuccess) {
        nccl().CommDestroy(comm);
      } else {
        abort_comm();
      }
    }
    for (int b = 0; b < 2; ++b) {
      if (scratch[b]) cudaFree(scratch[b]);
      if (received[b]) cudaEventDestroy(received[b]);
      if (reduced[b]) cudaEventDestroy(reduced[b]);
    }
    if (handoff) cudaEventDestroy(handoff);
    if (done) cudaEventDestroy(done);
    if (comm_stream) cudaStreamDestroy(comm_stream);
    if (previous >= 0) cudaSetDevice(previous);
  }
};

class NcclTransport final : public RingTransport {
 public:
  NcclTransport(const std::string& unique_id, int rank, int world, int device, const RingOptions& options)
      : rank_(rank), world_(world), device_(device), timeout_s_(options.timeout_s) {
    slice_bytes_ = options.slice_bytes > 0 ? (options.slice_bytes + 255) / 256 * 256 : kDefaultSliceBytes;
    const NcclApi& api = nccl_or_throw();
    res_.device = device_;
    CudaDeviceGuard guard(device_);
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), kNcclUniqueIdBytes);
    ncclConfig_t config = nccl_config_initializer();
    config.blocking = 0;
    const Clock::time_point deadline = deadline_from_now();
    const ncclResult_t r = api.CommInitRankConfig(&res_.comm, world_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      res_.abort_comm();
      throw Error(std::string("NCCL transport: ncclCommInitRankConfig failed on rank ") + std::to_string(rank_) + ": " +
                  api.GetErrorString(r));
    }
    wait_comm_ready("creating the communicator (ncclCommInitRankConfig)", deadline);
    check(cudaStreamCreateWithFlags(&res_.comm_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int b = 0; b < 2; ++b) {
      check(cudaMalloc(&res_.scratch[b], size_t(slice_bytes_)), "cudaMalloc (ring scratch)");
      check(cudaEventCreateWithFlags(&res_.received[b], cudaEventDisableTiming), "cudaEventCreate");
      check(cudaEventCreateWithFlags(&res_.reduced[b], cudaEventDisableTiming), "cudaEventCreate");
    }
    check(cudaEventCreateWithFlags(&res_.handoff, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventCreateWithFlags(&res_.done, cudaEventDisableTiming), "cudaEventCreate");
    res_.healthy = true;
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  Device device() const override { return Device{DeviceType::CUDA, device_}; }
  int64_t slice_bytes() const override { return slice_bytes_; }

  void begin(const CallTag&, DType dtype, void* stream) override {
    if (!res_.comm) throw Error("NCCL transport: aborted after an earlier failure");
    guard_ = std::make_unique<CudaDeviceGuard>(device_);
    dtype_ = dtype;
    stream_ = static_cast<cudaStream_t>(stream);
    slice_ = 0;
    deadline_ = deadline_from_now();
    wait(res_.comm_stream, stream_);  // the tensor is ready once the caller's earlier work is done
  }

  void step() override {
    if (slice_ > 0) wait(res_.comm_stream, stream_);  // what we send next may be what was just reduced
  }

  void exchange(const void* send, int64_t send_count, void* recv, int64_t recv_count, Combine combine,
                float divisor) override {
    const NcclApi& api = nccl();
    const int b = int(slice_ % 2);
    // A slice of 0 elements (sendrecv's empty message) moves nothing: its peer has none to match either.
    if (send_count == 0) send = nullptr;
    if (recv_count == 0) recv = nullptr;
    const bool reduce = recv && combine != Combine::Copy;
    cudaStream_t comm_stream = res_.comm_stream;
    if (reduce && slice_ >= 2) check(cudaStreamWaitEvent(comm_stream, res_.reduced[b], 0), "cudaStreamWaitEvent");
    check_nccl(api.GroupStart(), "ncclGroupStart");
    // The group is closed whatever happens inside it (an open group would swallow this thread's later calls).
    auto queued = [](ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; };
    ncclResult_t sent = ncclSuccess, received = ncclSuccess;
    if (send) sent = api.Send(send, size_t(send_count), nccl_type(dtype_), (rank_ + 1) % world_, res_.comm, comm_stream);
    if (recv && queued(sent))
      received = api.Recv(reduce ? res_.scratch[b] : recv, size_t(recv_count), nccl_type(dtype_),
                          (rank_ + world_ - 1) % world_, res_.comm, comm_stream);
    const ncclResult_t ended = api.GroupEnd();
    check_nccl(sent, "ncclSend");
    check_nccl(received, "ncclRecv");
    check_nccl(ended, "ncclGroupEnd");
    // A non-blocking communicator may still be enqueueing the group; no other NCCL call until it is done.
    if (ended == ncclInProgress) wait_comm_ready("enqueueing a send/receive (ncclGroupEnd)", deadline_);
    if (reduce) {
      check(cudaEventRecord(res_.received[b], comm_stream), "cudaEventRecord");
      check(cudaStreamWaitEvent(stream_, res_.received[b], 0), "cudaStreamWaitEvent");
      reduce_add_cuda(dtype_, recv, res_.scratch[b], recv_count, combine == Combine::SumDivide ? divisor : 1.0f,
                      device_, stream_);
      check(cudaEventRecord(res_.reduced[b], stream_), "cudaEventRecord");
    }
    ++slice_;
  }

  void end() override {
    wait(stream_, res_.comm_stream);  // the caller's later work sees every receive
    check(cudaEventRecord(res_.done, stream_), "cudaEventRecord");
    wait_until(
        [&] {
          const cudaError_t q = cudaEventQuery(res_.done);
          if (q != cudaErrorNotReady) check(q, "cudaEventQuery");
          return q == cudaSuccess;
        },
        "finishing the collective", deadline_);
    guard_.reset();
  }

  void abort() noexcept override {
    res_.abort_comm();
    guard_.reset();
  }

 private:
  Clock::time_point deadline_from_now() const {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  }

  // Waits until NCCL has finished what the communicator has in progress (creation, a group's enqueue).
  void wait_comm_ready(const char* what, Clock::time_point deadline) {
    wait_until([] { return true; }, what, deadline);
  }

  // Polls, with growing naps, until the communicator has nothing in progress and done() holds; raises when
  // the communicator reports an error or the deadline passes, aborting the communicator first.
  template <class Done>
  void wait_until(Done done, const char* what, Clock::time_point deadline) {
    const NcclApi& api = nccl();
    auto nap = std::chrono::microseconds(20);
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = api.CommGetAsyncError(res_.comm, &state);
      if (r != ncclSuccess) state = r;
      if (state != ncclSuccess && state != ncclInProgress) {
        res_.abort_comm();
        throw Error("NCCL transport: " + std::string(what) + " failed on rank " + std::to_string(rank_) + ": " +
                    api.GetErrorString(state) + " (a peer may have failed; the communicator was aborted)");
      }
      if (state == ncclSuccess && done()) return;
      if (Clock::now() >= deadline) {
        res_.abort_comm();
        throw Error("NCCL transport: rank " + std::to_string(rank_) + " timed out after " + seconds(timeout_s_) +
                    " " + what + " (a peer died or stopped calling the same collectives); the communicator was "
                    "aborted");
      }
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  // `waiter` runs its later work only after what is queued on `waited` now.
  void wait(cudaStream_t waiter, cudaStream_t waited) {
    check(cudaEventRecord(res_.handoff, waited), "cudaEventRecord");
    check(cudaStreamWaitEvent(waiter, res_.handoff, 0), "cudaStreamWaitEvent");
  }

  int rank_, world_, device_;
  double timeout_s_;
  int64_t slice_bytes_ = 0;
  Resources res_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<CudaDeviceGuard> guard_;
  DType dtype_ = DType::U8;
  int64_t slice_ = 0;
  Clock::time_point deadline_{};
};

}  // namespace
}  // namespace detail

std::string nccl_status() {
  const detail::NcclApi& a = detail::nccl();
  if (!a.error.empty()) return a.error;
  if (std::string why = detail::too_old(a); !why.empty()) return why;
  return "NCCL " + detail::version_string(a.version);  // a.version: 22703 for 2.27.3
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
  FLASHLM_CHECK(options.timeout_s > 0, "timeout: must be > 0 seconds, got ", options.timeout_s);
  return std::make_unique<Ring>(std::make_unique<detail::NcclTransport>(unique_id, rank, world_size, device, options));
}

}  // namespace flashlm::comm
