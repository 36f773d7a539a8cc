// The shared-memory transport: CPU processes of one host, one POSIX shm segment per ring edge.
//
// Segment "/flashlm-<job>-<r>" is rank r's outbox, read by rank r+1: a header and `slots` slots of one
// slice each, used round-robin as a queue. Two 32-bit sequence counters, each on its own cache line, run
// the queue for the lifetime of the ring (they wrap; only differences are compared):
//   produced: slices rank r has written; rank r stores it with release after filling slot produced % slots.
//   consumed: slices rank r+1 has combined; rank r+1 stores it with release once it has read the slot.
// The writer waits (acquire) until produced - consumed < slots before reusing a slot, the reader until
// produced > its next sequence number before reading one, so every byte of a slot is written strictly
// before it is read and read strictly before it is rewritten (no data race, and never stale data: the
// numbers never repeat across calls). Each slot starts with a small header (sequence number, bytes, call
// tag) that the reader checks, which turns ranks calling different collectives into an error.
//
// The transport relays (ring.cpp's column schedule): a received slice is combined with the local one
// straight into the next outbox slot, which then goes on to the right neighbour as it is, so a byte in
// flight is written once per ring step. A rank copies a result into its own buffer from the slot it just
// published (reading is safe: the reader only reads a slot, and only its owner rewrites it, after the
// reader has freed it).
//
// Waiting spins briefly, then sleeps on a futex on the counter itself (shared, so across processes); the
// side that advances a counter wakes the futex only when the other side announced it sleeps (a Dekker
// pair of seq_cst operations: the waiter increments `waiters` then re-reads the counter, the waker stores
// the counter then reads `waiters`, so at least one of them sees the other). A machine with fewer cores
// than ranks (CI: 4 ranks on 2 cores) would otherwise crawl while spinners hold the cores.
//
// Failure: every wait has a deadline (RingOptions::timeout_s) and also checks that the peer process is
// alive and that no rank has aborted. A rank that fails sets `abort` in both segments it maps (its own and
// its left neighbour's) and wakes both futexes; its neighbours then fail and pass it on around the ring.
//
// Lifetime: rank r creates and initialises its segment, publishes `ready` (release); rank r+1 opens and
// maps it once it exists, is large enough and is ready, then sets `attached`; rank r unlinks its segment
// as soon as it sees `attached`, so after construction nothing is left in /dev/shm whatever happens to the
// processes (and the destructor unlinks it if construction failed before that).
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <climits>
#include <cstring>
#include <new>
#include <string>
#include <thread>

#include "flashlm/comm/ring.h"
#include "flashlm/core/error.h"
#include "ring_transport.h"

namespace flashlm::comm {
namespace detail {
namespace {

// 1 MiB slices, 2 per edge (2 MiB per segment, in the L3; a relay window of one column). Measured with
// 64 MiB allreduces of 2-4 ranks on a shared 2-core EPYC, configurations interleaved in one run: 64-128 KiB
// slices are slower (more hand-offs), so are 8 MiB per segment (the slots leave the L3); 256 KiB x 4-8,
// 512 KiB x 2-8 and 1 MiB x 2-4 were within the machine's noise of each other, 1 MiB x 2 ahead most often.
constexpr int64_t kDefaultSliceBytes = 1 << 20;
constexpr int kDefaultSlots = 2;
constexpr uint64_t kMagic = 0x676e69726d6c6873ull;  // "shlmring"
constexpr int64_t kSlotHeaderBytes = 64;
// Spin this many times (~1-2 us in all on Zen 3) before sleeping on the futex.
constexpr int kSpins = 256;
// Sleep on the futex at most this long at a time, to check the deadline, the peer and the abort flag.
constexpr auto kPollInterval = std::chrono::milliseconds(20);

struct alignas(64) Line {
  std::atomic<uint32_t> value{0};
  std::atomic<uint32_t> waiters{0};
};

struct SegmentHeader {
  uint64_t magic;
  int32_t owner_rank, world_size;
  int32_t owner_pid, reader_pid;
  int64_t slice_bytes;
  int32_t slots;
  std::atomic<uint32_t> ready;     // owner: initialised
  std::atomic<uint32_t> attached;  // reader: mapped
  std::atomic<uint32_t> abort;     // 0, or 1 + the rank that failed first
  alignas(64) Line produced;       // written by the owner
  Line consumed;                   // written by the reader
};
static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared-memory counters must be lock-free");
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex words are 32 bits");

struct SlotHeader {
  uint32_t seq;
  uint32_t pad;
  int64_t bytes;
  uint64_t tag;
};

constexpr int64_t kHeaderBytes = (sizeof(SegmentHeader) + 4095) / 4096 * 4096;

long futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, timeout, nullptr, 0);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Store a counter and wake its sleeper if there is one (see the file comment for the ordering argument).
void advance(Line& line, uint32_t value) {
  line.value.store(value, std::memory_order_seq_cst);
  if (line.waiters.load(std::memory_order_seq_cst) != 0) futex(&line.value, FUTEX_WAKE, INT_MAX, nullptr);
}

// A mapped segment; unmaps (and, if still linked and owned, unlinks) on destruction.
struct Mapping {
  std::string name;
  void* base = nullptr;
  size_t bytes = 0;
  bool owner = false, linked = false;

  SegmentHeader* header() const { return static_cast<SegmentHeader*>(base); }
  char* slot(int64_t i) const {
    return static_cast<char*>(base) + kHeaderBytes + i * (kSlotHeaderBytes + header()->slice_bytes);
  }
  void unlink() {
    if (linked) shm_unlink(name.c_str());
    linked = false;
  }
  ~Mapping() {
    if (owner) unlink();
    if (base) munmap(base, bytes);
  }
};

class ShmTransport final : public RingTransport {
 public:
  ShmTransport(const std::string& job, int rank, int world, const RingOptions& options)
      : rank_(rank), world_(world), timeout_s_(options.timeout_s) {
    slice_bytes_ = options.slice_bytes > 0 ? (options.slice_bytes + 63) / 64 * 64 : kDefaultSliceBytes;
    slots_ = options.slots > 0 ? options.slots : kDefaultSlots;
    if (world_ == 1) return;
    const size_t bytes = size_t(kHeaderBytes + slots_ * (kSlotHeaderBytes + slice_bytes_));
    create_outbox(job, bytes);
    open_inbox(job, bytes);
    // Our reader has mapped our outbox once it sets `attached`: unlink it then (see the file comment).
    wait_until([&] { return out_.header()->attached.load(std::memory_order_acquire) != 0; }, nullptr,
               [&] { return "rank " + std::to_string(right()) + " did not open its ring segment"; }, right_pid());
    out_.unlink();
  }

  ~ShmTransport() override = default;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  Device device() const override { return Device{DeviceType::CPU, 0}; }
  int64_t slice_bytes() const override { return slice_bytes_; }

  void begin(const CallTag& tag, DType dtype, void*) override {
    if (aborted_) throw Error(abort_message());
    tag_ = expected_ = tag.packed();
    esize_ = dtype_info(dtype).block_bytes;
    dtype_ = dtype;
  }
  void expect(const CallTag& tag) override { expected_ = tag.packed(); }
  void step() override {}
  void end() override {}

  void exchange(const void* send, int64_t send_count, void* recv, int64_t recv_count, Combine combine,
                float divisor) override {
    if (send) put(send, send_count * esize_);
    if (recv) take(recv, recv_count, combine, divisor);
  }

  // A window of slots - 1 columns: a rank combines into its next outbox slot while its reader still holds
  // the slices of the step before (with one slot, every rank could wait for its reader to free the slot
  // while that reader waits for the same, all around the ring: one slot runs the step-by-step schedule).
  int64_t relay_window() const override { return slots_ - 1; }

  void relay(const void* local, void* out, int64_t count, Combine combine, float divisor, bool forward) override {
    const int64_t bytes = count * esize_;
    const char* received = claim_inbox(bytes);
    if (!forward) {
      combine_into(out, local, received, count, combine, divisor);
      release();
      return;
    }
    char* slot = claim_outbox(bytes);
    combine_into(slot, local, received, count, combine, divisor);
    release();
    publish();
    if (out) std::memcpy(out, slot, size_t(bytes));  // see the file comment
  }

  void abort() noexcept override {
    if (aborted_ || world_ == 1) return;
    aborted_ = true;
    const uint32_t mark = uint32_t(rank_) + 1;
    for (SegmentHeader* h : {out_.header(), in_.header()}) {
      if (!h) continue;
      uint32_t expected = 0;
      h->abort.compare_exchange_strong(expected, mark, std::memory_order_seq_cst);
      futex(&h->produced.value, FUTEX_WAKE, INT_MAX, nullptr);
      futex(&h->consumed.value, FUTEX_WAKE, INT_MAX, nullptr);
    }
  }

 private:
  int left() const { return (rank_ + world_ - 1) % world_; }
  int right() const { return (rank_ + 1) % world_; }
  int left_pid() const { return in_.header() ? in_.header()->owner_pid : 0; }
  int right_pid() const { return out_.header() ? out_.header()->reader_pid : 0; }

  void create_outbox(const std::string& job, size_t bytes) {
    out_.name = "/flashlm-" + job + "-" + std::to_string(rank_);
    out_.owner = true;
    int fd = shm_open(out_.name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0)
      throw Error("shm ring: cannot create shared memory segment " + out_.name + ": " + std::strerror(errno) +
                  (errno == EEXIST ? " (job names must be new for every ring)" : ""));
    out_.linked = true;
    if (ftruncate(fd, off_t(bytes)) != 0) {
      int err = errno;
      close(fd);
      throw Error("shm ring: cannot size " + out_.name + " to " + std::to_string(bytes) + " bytes: " + std::strerror(err));
    }
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (base == MAP_FAILED) throw Error("shm ring: cannot map " + out_.name + ": " + std::strerror(err));
    out_.base = base;
    out_.bytes = bytes;
    auto* h = new (base) SegmentHeader{};  // the fresh segment is zero-filled; this starts the atomics' lifetime
    h->magic = kMagic;
    h->owner_rank = rank_;
    h->world_size = world_;
    h->owner_pid = int32_t(getpid());
    h->slice_bytes = slice_bytes_;
    h->slots = slots_;
    h->ready.store(1, std::memory_order_release);
  }

  void open_inbox(const std::string& job, size_t bytes) {
    in_.name = "/flashlm-" + job + "-" + std::to_string(left());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_);
    auto sleep = std::chrono::microseconds(50);
    for (;;) {
      int fd = shm_open(in_.name.c_str(), O_RDWR, 0600);
      if (fd >= 0) {
        struct stat st {};
        if (fstat(fd, &st) == 0 && size_t(st.st_size) >= bytes) {
          void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
          close(fd);
          if (base == MAP_FAILED) throw Error("shm ring: cannot map " + in_.name + ": " + std::strerror(errno));
          in_.base = base;
          in_.bytes = bytes;
          break;
        }
        close(fd);
      } else if (errno != ENOENT) {
        throw Error("shm ring: cannot open " + in_.name + ": " + std::strerror(errno));
      }
      if (std::chrono::steady_clock::now() > deadline)
        throw Error("shm ring: rank " + std::to_string(left()) + " did not create its ring segment within " +
                    seconds(timeout_s_));
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(5000));
    }
    SegmentHeader* h = in_.header();
    wait_until([&] { return h->ready.load(std::memory_order_acquire) != 0; }, nullptr,
               [&] { return "rank " + std::to_string(left()) + " did not initialise its ring segment"; }, 0);
    if (h->magic != kMagic || h->world_size != world_ || h->owner_rank != left() || h->slice_bytes != slice_bytes_ ||
        h->slots != slots_)
      throw Error("shm ring: segment " + in_.name + " does not belong to this ring (world size " +
                  std::to_string(h->world_size) + ", slice " + std::to_string(h->slice_bytes) + " bytes x " +
                  std::to_string(h->slots) + "; ranks must pass the same job, world size and options)");
    h->reader_pid = int32_t(getpid());
    h->attached.store(1, std::memory_order_release);
  }

  // The next slot of our outbox, once the reader has freed it, with its header written for `bytes` of data;
  // returns where the data goes. publish() hands it to the reader.
  char* claim_outbox(int64_t bytes) {
    SegmentHeader* h = out_.header();
    const uint32_t seq = sent_;
    wait_until([&] { return seq - h->consumed.value.load(std::memory_order_acquire) < uint32_t(slots_); },
               &h->consumed,
               [&] { return "rank " + std::to_string(right()) + " did not take the data rank " + std::to_string(rank_) + " sent"; },
               right_pid());
    char* slot = out_.slot(seq % uint32_t(slots_));
    SlotHeader sh{seq, 0, bytes, tag_};
    std::memcpy(slot, &sh, sizeof sh);
    return slot + kSlotHeaderBytes;
  }
  void publish() {
    sent_ += 1;
    advance(out_.header()->produced, sent_);
  }

  // The next slot of the left neighbour's outbox once it is there, checked to hold `bytes` of the same
  // collective; returns its data. release() gives the slot back.
  const char* claim_inbox(int64_t bytes) {
    SegmentHeader* h = in_.header();
    const uint32_t seq = received_;
    wait_until([&] { return h->produced.value.load(std::memory_order_acquire) - seq - 1 < 0x80000000u; },
               &h->produced, [&] { return "rank " + std::to_string(left()) + " did not send data to rank " + std::to_string(rank_); },
               left_pid());
    const char* slot = in_.slot(seq % uint32_t(slots_));
    SlotHeader sh;
    std::memcpy(&sh, slot, sizeof sh);
    if (sh.seq != seq || sh.bytes != bytes || sh.tag != expected_) throw Error(mismatch(sh, bytes));
    return slot + kSlotHeaderBytes;
  }
  void release() {
    received_ += 1;
    advance(in_.header()->consumed, received_);
  }

  // Why a slice from the left neighbour is not the one this rank expected.
  std::string mismatch(const SlotHeader& sh, int64_t bytes) const {
    const CallTag sent = CallTag::unpacked(sh.tag), wanted = CallTag::unpacked(expected_);
    const std::string from = "shm ring: rank " + std::to_string(left()), to = " rank " + std::to_string(rank_);
    if (sent.kind == kSendRecvKind && wanted.kind == kSendRecvKind)
      return from + " sent " + message(sent) + " where" + to + " expected " + message(wanted) +
             " (sendrecv: what a rank sends must match what its right neighbour receives)";
    return from + " sent " + std::to_string(sh.bytes) + " bytes where" + to + " expected " + std::to_string(bytes) +
           (sh.tag != expected_ ? " of another collective" : "") +
           " (every rank must call the same collectives in the same order, with the same size and dtype)";
  }
  static std::string message(const CallTag& tag) {
    const bool known = tag.dtype < uint32_t(kNumDTypes);
    return std::to_string(tag.count) + " bytes of " + (known ? dtype_name(DType(tag.dtype)) : "an unknown dtype");
  }

  // dst := received (Copy) or local + received (Sum, SumDivide).
  void combine_into(void* dst, const void* local, const char* received, int64_t count, Combine combine,
                    float divisor) const {
    if (combine == Combine::Copy) {
      std::memcpy(dst, received, size_t(count * esize_));
    } else {
      reduce_add_cpu(dtype_, dst, local, received, count, combine == Combine::SumDivide ? divisor : 1.0f);
    }
  }

  void put(const void* src, int64_t bytes) {
    std::memcpy(claim_outbox(bytes), src, size_t(bytes));
    publish();
  }

  void take(void* dst, int64_t count, Combine combine, float divisor) {
    combine_into(dst, dst, claim_inbox(count * esize_), count, combine, divisor);
    release();
  }

  std::string abort_message() const {
    for (SegmentHeader* h : {out_.header(), in_.header()}) {
      if (!h) continue;
      uint32_t mark = h->abort.load(std::memory_order_acquire);
      if (mark) return "shm ring: aborted after a failure on rank " + std::to_string(mark - 1);
    }
    return "shm ring: aborted after an earlier failure";
  }

  // Waits until ready() holds: spins, then sleeps on `line`'s futex (when given) or on a short timer. Throws
  // when the deadline passes, the peer process (pid, when known) has exited, or the ring was aborted.
  template <class Ready, class What>
  void wait_until(Ready ready, Line* line, What what, int peer_pid) {
    for (int i = 0; i < kSpins; ++i) {
      if (ready()) return;
      cpu_relax();
    }
    for (int i = 0; i < 8; ++i) {  // give the core to the peer we wait for, if it shares ours
      if (ready()) return;
      sched_yield();
    }
    struct Announce {  // counts us among the futex's sleepers for as long as we wait
      Line* line;
      explicit Announce(Line* l) : line(l) {
        if (line) line->waiters.fetch_add(1, std::memory_order_seq_cst);
      }
      ~Announce() {
        if (line) line->waiters.fetch_sub(1, std::memory_order_seq_cst);
      }
    } announce(line);
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + std::chrono::duration<double>(timeout_s_);
    auto nap = std::chrono::microseconds(20);
    for (;;) {
      const uint32_t seen = line ? line->value.load(std::memory_order_seq_cst) : 0;
      if (ready()) return;
      for (SegmentHeader* h : {out_.header(), in_.header()}) {
        if (h && h->abort.load(std::memory_order_acquire)) {
          aborted_ = true;
          throw Error(abort_message() + " (rank " + std::to_string(rank_) + " was waiting: " + what() + ")");
        }
      }
      const auto now = std::chrono::steady_clock::now();
      if (peer_pid > 0 && kill(peer_pid, 0) != 0 && errno == ESRCH)
        throw Error("shm ring: " + what() + ": its process (pid " + std::to_string(peer_pid) + ") has exited");
      if (now >= deadline) throw Error("shm ring: " + what() + " within " + seconds(timeout_s_));
      if (line) {
        const timespec ts{0, long(std::chrono::nanoseconds(kPollInterval).count())};
        futex(&line->value, FUTEX_WAIT, seen, &ts);
      } else {
        std::this_thread::sleep_for(nap);
        nap = std::min(nap * 2, std::chrono::microseconds(2000));
      }
    }
  }

  int rank_, world_;
  double timeout_s_;
  int64_t slice_bytes_ = 0;
  int slots_ = 0;
  Mapping out_, in_;
  uint32_t sent_ = 0, received_ = 0;
  uint64_t tag_ = 0, expected_ = 0;  // the tag of what we send, and of what we take from the left neighbour
  int64_t esize_ = 1;
  DType dtype_ = DType::U8;
  bool aborted_ = false;
};

bool valid_job_name(const std::string& job) {
  if (job.empty() || job.size() > 200) return false;
  for (char c : job)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

}  // namespace
}  // namespace detail

std::unique_ptr<Ring> make_shm_ring(const std::string& job, int rank, int world_size, const RingOptions& options) {
  FLASHLM_CHECK(detail::valid_job_name(job), "job: must be 1-200 letters, digits, '-', '_' or '.', got '", job, "'");
  FLASHLM_CHECK(world_size >= 1, "world_size: must be >= 1, got ", world_size);
  FLASHLM_CHECK(rank >= 0 && rank < world_size, "rank: must be in [0, ", world_size, "), got ", rank);
  FLASHLM_CHECK(options.timeout_s > 0, "timeout: must be > 0 seconds, got ", options.timeout_s);
  FLASHLM_CHECK(options.slice_bytes >= 0 && options.slice_bytes <= (int64_t(1) << 30),
                "slice_bytes: must be in [0, 2^30] (0: default), got ", options.slice_bytes);
  FLASHLM_CHECK(options.slots >= 0 && options.slots <= 64, "slots: must be in [0, 64] (0: default), got ", options.slots);
  return std::make_unique<Ring>(std::make_unique<detail::ShmTransport>(job, rank, world_size, options));
}

}  // namespace flashlm::comm
