// The library's thread pool: n - 1 workers plus the calling thread. A parallel_for splits [0, n) into at
// most 2 ranges per thread (some slack for a descheduled thread on a shared machine, few enough that each
// range stays long and contiguous: a decode step's GEMVs stream weights and each range starts cold; 4
// ranges per thread made a 12-layer Q4_0 decode's matmuls 7% slower), handed out by an atomic counter.
// Each job lives on the caller's stack; a worker joins it only under the lock and the caller returns only
// when every worker that joined has left, so no worker ever touches a finished job.
//
// Idle workers poll the job counter for a short while (spin_time()) before they sleep on a condition
// variable: a decode step is a chain of small kernels a few microseconds apart, and waking a sleeping
// thread costs 5-10 us, as much as a small GEMV itself. The caller likewise polls, then yields, until the
// workers leave.
#include "flashlm/core/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "flashlm/core/error.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLASHLM_CPU_RELAX() _mm_pause()
#else
#define FLASHLM_CPU_RELAX() ((void)0)
#endif

namespace flashlm {
namespace {

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

struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // guarded by the pool's mutex
  std::atomic<int> workers{0};  // workers inside run_chunks; joined under the pool's mutex
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

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    int threads = size();
    int64_t max_chunks = (n + grain - 1) / grain;
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::defer_lock);
    if (threads == 1 || max_chunks == 1 || tls_in_parallel || !run_lock.try_lock()) {
      fn(0, n);
      return;
    }
    Job job;
    job.fn = &fn;
    job.n = n;
    job.chunks = std::min<int64_t>(max_chunks, int64_t(threads) * 2);
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) wake_.notify_all();
    run_chunks(job);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = nullptr;  // no worker joins from now on
    }
    // The workers that joined are finishing their last ranges: poll, and give the core away if one of
    // them has been descheduled.
    for (int spins = 0; job.workers.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 4096) FLASHLM_CPU_RELAX();
      else std::this_thread::yield();
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
    stopping_ = false;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
    started_ = true;
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    started_ = false;
  }

  // Returns when generation_ differs from `seen`: first polling it for spin_time(), then asleep.
  void wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + spin_time();
    for (int i = 1;; ++i) {
      if (generation_.load(std::memory_order_acquire) != seen) return;
      FLASHLM_CPU_RELAX();
      if (i % 256 == 0 && std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    ++sleepers_;
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
    --sleepers_;
  }

  void worker_loop() {
    tls_in_parallel = true;
    uint64_t seen = 0;
    for (;;) {
      wait_for_job(seen);
      std::unique_lock<std::mutex> lock(mutex_);
      seen = generation_.load(std::memory_order_relaxed);
      if (stopping_) return;
      Job* job = current_;
      if (!job) continue;
      job->workers.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      run_chunks(*job);
      job->workers.fetch_sub(1, std::memory_order_release);  // the last touch of the job
    }
  }

  void run_chunks(Job& job) {
    bool outer = tls_in_parallel;
    tls_in_parallel = true;
    for (int64_t c; (c = job.next.fetch_add(1)) < job.chunks;) {
      if (job.failed.load(std::memory_order_relaxed)) continue;
      try {
        (*job.fn)(job.n * c / job.chunks, job.n * (c + 1) / job.chunks);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!job.error) job.error = std::current_exception();
        job.failed.store(true);
      }
    }
    tls_in_parallel = outer;
  }

  std::mutex config_mutex_;  // size_, workers_, started_
  std::mutex run_mutex_;     // one job at a time
  std::mutex mutex_;         // current_, stopping_, sleepers_, Job::error; writes of generation_
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  int size_ = 1;
  bool started_ = false, stopping_ = false;
  int sleepers_ = 0;                    // workers waiting on wake_
  std::atomic<uint64_t> generation_{0};  // bumped for every job (and to stop); idle workers poll it
  Job* current_ = nullptr;
};

}  // namespace

int num_threads() { return Pool::get().size(); }
void set_num_threads(int n) { Pool::get().resize(n); }
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  Pool::get().run(n, grain, fn);
}

}  // namespace flashlm
