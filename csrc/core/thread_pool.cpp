// The library's thread pool: n - 1 workers plus the calling thread. A parallel_for splits [0, n) into units
// (at most kUnitsPerThread per thread, each about `grain` long or more) and gives each thread a contiguous
// share of them, its slot. A thread runs its own slot's units front to back, then takes units from the other
// slots: a thread that the system deschedules (on a machine busier than its cores) holds up the job by one
// unit at most, not by its whole share, and a worker that never wakes in time leaves its slot to the others.
// Alone, each thread still streams one contiguous range (a decode step's GEMVs read weights front to back;
// 4 interleaved ranges per thread from one shared counter made a 12-layer Q4_0 decode's matmuls 7% slower).
// Each job lives on the caller's stack; a worker counts itself busy before it reads the job, and the caller
// clears the job and returns only when no worker is busy, so no worker ever touches a finished job. No mutex
// on this path: a job's hand-off is a few atomic operations when the workers are polling.
//
// Idle workers poll the job counter for a short while (spin_time()) before they sleep on a condition
// variable: a decode step is a chain of small kernels a few microseconds apart, and waking a sleeping
// thread costs 5-10 us, as much as a small GEMV itself. But polling only pays while the pool has the cores
// to itself: on a busy machine a polling thread takes a core from a thread with work (the caller, torch's
// OpenMP threads, other programs). So each thread measures how much of its time awake the system gave it
// (wall clock against its own CPU time); a worker that lost a scheduler slice marks the pool contended, and
// for kQuietTime after that no thread polls: idle workers sleep at once and the caller sleeps while it waits
// for the workers' last units.
#include "flashlm/core/thread_pool.h"

#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "flashlm/core/error.h"
#include "pool_profile.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLASHLM_CPU_RELAX() _mm_pause()
#else
#define FLASHLM_CPU_RELAX() ((void)0)
#endif

namespace flashlm {
namespace {

using Clock = std::chrono::steady_clock;

// Units per thread: enough that a descheduled thread holds back an eighth of its share at most, few enough
// that a unit stays long next to the cost of taking it (one atomic add on the slot's own cache line).
constexpr int64_t kUnitsPerThread = 8;
// After a thread lost CPU time, how long nobody polls: a few scheduler slices, so that a pool on a loaded
// machine spins for one spin_time() per kQuietTime at most (0.4% of a core at the 200 us default).
constexpr std::chrono::milliseconds kQuietTime{50};
// A stretch of polling or work counts as descheduled when the thread got less than 3/4 of its wall time and
// lost at least 100 us (one timer interrupt or page fault costs far less; a scheduler slice, far more).
constexpr std::chrono::microseconds kLostTime{100};
// How often a worker that never sleeps checks its CPU time (a system call of ~0.3 us).
constexpr std::chrono::milliseconds kCheckEvery{2};
// How long the caller polls for the workers' last units before it sleeps (when the pool is not contended).
constexpr int kCallerSpins = 4096;

// How long an idle worker keeps polling for the next job before it sleeps: FLASHLM_SPIN_US, default 200.
// Long enough to span the gap between two kernels driven from Python (~10-30 us), short enough not to steal
// a core for long from other work (torch's own threads) once the library goes quiet; 0 sleeps at once.
std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds spin = [] {
    long us = 200;
    if (const char* env = std::getenv("FLASHLM_SPIN_US"); env && *env) {
      char* end = nullptr;
      us = std::strtol(env, &end, 10);
      FLASHLM_CHECK(*end == '\0' && us >= 0 && us <= 1000000,
                    "FLASHLM_SPIN_US must be an integer in [0, 1000000], got '", env, "'");
    }
    return std::chrono::microseconds(us);
  }();
  return spin;
}

thread_local bool tls_in_parallel = false;

int default_num_threads() {
  if (const char* env = std::getenv("FLASHLM_NUM_THREADS"); env && *env) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    FLASHLM_CHECK(*end == '\0' && n >= 1 && n <= kMaxThreads, "FLASHLM_NUM_THREADS must be an integer in [1, ",
                  kMaxThreads, "], got '", env, "'");
    return static_cast<int>(n);
  }
  return static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, unsigned(kMaxThreads)));
}

std::chrono::nanoseconds thread_cpu_time() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
}

// One thread's awake time since mark(): lost() says whether the system took a slice of it from the thread.
class AwakeTimer {
 public:
  void mark() {
    wall_ = Clock::now();
    cpu_ = thread_cpu_time();
  }
  Clock::duration age() const { return Clock::now() - wall_; }
  bool lost() const {
    const auto wall = Clock::now() - wall_;
    const auto missing = wall - (thread_cpu_time() - cpu_);
    return missing > kLostTime && 4 * missing > wall;
  }

 private:
  Clock::time_point wall_;
  std::chrono::nanoseconds cpu_{0};
};

// A thread's share of a job: units [next, end), taken front first by its owner and then by the other threads.
struct alignas(64) Slot {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, units;
  Slot* slots;
  int num_slots;
  uint64_t generation = 0;       // the pool's generation_ that published this job
  std::atomic<int> joined{0};    // workers that took a slot
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // guarded by the pool's mutex
  detail::JobTimes* times = nullptr;  // FLASHLM_POOL_PROFILE only
};

std::atomic<bool> g_forked{false};

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
      return new Pool();  // never destroyed: worker threads may outlive static destructors
    }();
    // A forked child inherits the pool's memory but none of its threads, and its mutexes and condition
    // variables may record waiters that do not exist there (a broadcast would wait for them forever):
    // abandon the whole pool and start a new one. The child is single-threaded until then. (A plain load
    // first: every parallel_for comes through here, and an exchange would write a shared cache line.)
    if (g_forked.load(std::memory_order_relaxed) && g_forked.exchange(false)) pool = new Pool();
    return *pool;
  }

  int size() {
    std::lock_guard<std::mutex> lock(config_mutex_);
    ensure_started();
    return size_;
  }

  void resize(int n) {
    FLASHLM_CHECK(n >= 1, "num_threads must be >= 1, got ", n);
    FLASHLM_CHECK(n <= kMaxThreads, "num_threads must be at most ", kMaxThreads, ", got ", n);
    std::lock_guard<std::mutex> run_lock(run_mutex_);  // no job in flight
    std::lock_guard<std::mutex> lock(config_mutex_);
    const int before = started_ ? size_ : 0;
    stop_workers();
    try {
      start_workers(n);
    } catch (const std::system_error& e) {
      // The system refused a thread (a process or memory limit): go back to the size that ran before.
      stop_workers();
      if (before > 0) start_workers(before);
      throw Error(detail::concat("num_threads: could not start ", n, " threads (", e.what(), "); the pool is unchanged"));
    }
  }

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn, const void* site) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    const int64_t max_units = n / grain + (n % grain != 0);
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::defer_lock);
    if (size() == 1 || max_units == 1 || tls_in_parallel || !run_lock.try_lock()) {
      if (!detail::pool_profile_on() || tls_in_parallel) return fn(0, n);
      detail::JobTimes times;  // a serial job: its own share is all of it
      times.start = detail::pool_profile_ticks();
      times.n = n;
      fn(0, n);
      times.own = times.end = detail::pool_profile_ticks();
      detail::pool_profile_record(site, times);
      return;
    }
    const int threads = size_;  // read under run_mutex_: no resize until this job is done (slots_ has this many)
    Job job;
    detail::JobTimes times;
    if (detail::pool_profile_on()) {
      job.times = &times;
      times.start = detail::pool_profile_ticks();
      times.n = n;
    }
    job.fn = &fn;
    job.n = n;
    job.units = std::min<int64_t>(max_units, threads * kUnitsPerThread);
    job.num_slots = static_cast<int>(std::min<int64_t>(threads, job.units));
    job.slots = slots_.get();
    for (int s = 0; s < job.num_slots; ++s) {
      job.slots[s].next.store(job.units * s / job.num_slots, std::memory_order_relaxed);
      job.slots[s].end = job.units * (s + 1) / job.num_slots;
    }
    // Publish without the mutex: a polling worker sees the new generation and joins through busy_ (see
    // worker_loop); the mutex only for sleepers, which the bump must not slip past (they test generation_
    // under it after counting themselves in sleepers_; both sides sequentially consistent).
    job.generation = generation_.load(std::memory_order_relaxed) + 1;
    current_.store(&job);
    generation_.store(job.generation);
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(mutex_); }
      wake_.notify_all();
    }
    run_units(job, 0);
    if (job.times) times.own = detail::pool_profile_ticks();
    current_.store(nullptr);  // no worker joins from now on
    wait_for_workers();
    if (job.times) {
      times.end = detail::pool_profile_ticks();
      times.threads = 1 + job.joined.load();
      detail::pool_profile_record(site, times);
    }
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  Pool() = default;

  void ensure_started() {
    if (!started_) start_workers(default_num_threads());
  }

  void start_workers(int n) {
    spin_time();  // a bad FLASHLM_SPIN_US raises here, in the caller, not in a worker
    size_ = n;
    stopping_.store(false);
    slots_.reset(new Slot[n]);
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
    started_ = true;
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_.store(true);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    started_ = false;
  }

  bool contended() const { return Clock::now().time_since_epoch().count() < quiet_until_.load(std::memory_order_relaxed); }

  // Called at the end of a stretch of polling or work: if the system took CPU time from this thread, nobody
  // polls for a while.
  void note_lost_time(const AwakeTimer& timer) {
    if (timer.lost()) quiet_until_.store((Clock::now() + kQuietTime).time_since_epoch().count(), std::memory_order_relaxed);
  }

  // The caller, its own units done and current_ cleared: the workers that joined are finishing theirs. Poll
  // for a moment, unless the pool is contended (or FLASHLM_SPIN_US is 0), then sleep until the last one leaves.
  void wait_for_workers() {
    if (spin_time().count() > 0 && !contended()) {
      for (int spins = 0; spins < kCallerSpins; ++spins) {
        if (busy_.load(std::memory_order_acquire) == 0) return;
        FLASHLM_CPU_RELAX();
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    caller_sleeping_.store(true);
    done_.wait(lock, [&] { return busy_.load() == 0; });
    caller_sleeping_.store(false);
  }

  // A worker is done with current_'s job (or found none): the last touch of it. If the caller sleeps and this
  // was the last busy worker, wake it (under the mutex, so that the wake-up cannot fall between the caller's
  // check and its sleep).
  void leave() {
    if (busy_.fetch_sub(1) == 1 && caller_sleeping_.load()) {
      { std::lock_guard<std::mutex> lock(mutex_); }
      done_.notify_all();
    }
  }

  // Returns when generation_ differs from `seen`: first polling it for spin_time() (not while the pool is
  // contended), then asleep. `timer` covers the worker's time awake since it last woke, or the last
  // kCheckEvery of it for a worker that keeps finding jobs while it polls.
  void wait_for_job(uint64_t seen, AwakeTimer& timer) {
    if (timer.age() > kCheckEvery) {
      note_lost_time(timer);
      timer.mark();
    }
    if (!contended()) {
      const auto until = Clock::now() + spin_time();
      for (int i = 1;; ++i) {
        if (generation_.load(std::memory_order_acquire) != seen) return;
        FLASHLM_CPU_RELAX();
        if (i % 256 == 0 && Clock::now() > until) break;
      }
    }
    note_lost_time(timer);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      sleepers_.fetch_sub(1);
    }
    timer.mark();
  }

  void worker_loop() {
    tls_in_parallel = true;
    uint64_t seen = 0;
    AwakeTimer timer;
    timer.mark();
    for (;;) {
      wait_for_job(seen, timer);
      seen = generation_.load();
      if (stopping_.load()) return;
      // Count in busy_ before reading current_: the caller clears current_ and then waits for busy_ to drop to
      // 0, so a worker that read the job keeps it alive until it leaves (all four operations sequentially
      // consistent). A job of a later generation than `seen` waits for the next turn of the loop.
      busy_.fetch_add(1);
      Job* job = current_.load();
      if (job && job->generation == seen) {
        const int joined = job->joined.fetch_add(1);
        if (job->times && joined == 0) job->times->joined = detail::pool_profile_ticks();
        run_units(*job, (1 + joined) % job->num_slots);  // past the slots (a small job): take others' units
      }
      leave();
    }
  }

  // Units from slot `first` on, then from each other slot in turn: every unit runs exactly once, on
  // whichever thread takes it first.
  void run_units(Job& job, int first) {
    bool outer = tls_in_parallel;
    tls_in_parallel = true;
    const int64_t base = job.n / job.units, extra = job.n % job.units;  // unit u: base (+1 for u < extra)
    for (int k = 0; k < job.num_slots; ++k) {
      Slot& slot = job.slots[(first + k) % job.num_slots];
      for (int64_t u; slot.next.load(std::memory_order_relaxed) < slot.end && (u = slot.next.fetch_add(1)) < slot.end;) {
        if (job.failed.load(std::memory_order_relaxed)) continue;
        try {
          const int64_t begin = u * base + std::min(u, extra);
          (*job.fn)(begin, begin + base + (u < extra));
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex_);
          if (!job.error) job.error = std::current_exception();
          job.failed.store(true);
        }
      }
    }
    tls_in_parallel = outer;
  }

  std::mutex config_mutex_;  // size_, workers_, slots_, started_
  std::mutex run_mutex_;     // one job at a time
  std::mutex mutex_;         // Job::error; the sleepers' and the sleeping caller's condition variables
  std::condition_variable wake_;  // workers: a new job (or stop)
  std::condition_variable done_;  // the caller: the last worker left the job
  std::vector<std::thread> workers_;
  std::unique_ptr<Slot[]> slots_;  // the job's slots, one per thread (jobs run one at a time)
  int size_ = 1;
  bool started_ = false;
  std::atomic<bool> stopping_{false};
  std::atomic<int> sleepers_{0};         // workers waiting on wake_ (changed under mutex_)
  std::atomic<int> busy_{0};             // workers that may be reading current_'s job
  std::atomic<uint64_t> generation_{0};  // bumped for every job (and to stop); idle workers poll it
  std::atomic<bool> caller_sleeping_{false};  // the caller waits on done_
  std::atomic<int64_t> quiet_until_{0};  // steady_clock ticks: nobody polls before then (a thread lost CPU time)
  std::atomic<Job*> current_{nullptr};  // the job in flight, while the caller hands out its units
};

}  // namespace

int num_threads() { return Pool::get().size(); }
void set_num_threads(int n) { Pool::get().resize(n); }
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  Pool::get().run(n, grain, fn, __builtin_return_address(0));
}

}  // namespace flashlm
