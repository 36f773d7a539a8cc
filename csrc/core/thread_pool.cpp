// The library's thread pool: n - 1 workers sleeping on a condition variable, plus the calling thread.
// A parallel_for splits [0, n) into at most 4 ranges per thread (enough to absorb a descheduled thread on
// a shared machine, few enough that each range stays long and contiguous), handed out by an atomic
// counter. Each job lives on the caller's stack; a worker joins it only under the lock and the caller
// returns only when every worker that joined has left, so no worker ever touches a finished job.
#include "flashlm/core/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "flashlm/core/error.h"

namespace flashlm {
namespace {

thread_local bool tls_in_parallel = false;

int default_num_threads() {
  if (const char* env = std::getenv("FLASHLM_NUM_THREADS"); env && *env) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    FLASHLM_CHECK(*end == '\0' && n >= 1 && n <= 4096,
                  "FLASHLM_NUM_THREADS must be an integer in [1, 4096], got '", env, "'");
    return static_cast<int>(n);
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // guarded by the pool's mutex
  int workers = 0;           // workers inside run_chunks; guarded by the pool's mutex
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
    std::lock_guard<std::mutex> run_lock(run_mutex_);  // no job in flight
    std::lock_guard<std::mutex> lock(config_mutex_);
    stop_workers();
    start_workers(n);
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
    job.chunks = std::min<int64_t>(max_chunks, int64_t(threads) * 4);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = &job;
      ++generation_;
    }
    wake_.notify_all();
    run_chunks(job);
    std::unique_lock<std::mutex> lock(mutex_);
    current_ = nullptr;  // no worker joins from now on
    done_.wait(lock, [&] { return job.workers == 0; });
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  Pool() = default;

  void ensure_started() {
    if (!started_) start_workers(default_num_threads());
  }

  void start_workers(int n) {
    size_ = n;
    stopping_ = false;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
    started_ = true;
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    started_ = false;
  }

  void worker_loop() {
    tls_in_parallel = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stopping_) return;
      Job* job = current_;
      if (!job) continue;
      ++job->workers;
      lock.unlock();
      run_chunks(*job);
      lock.lock();
      if (--job->workers == 0) done_.notify_all();
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
  std::mutex mutex_;         // current_, generation_, stopping_, Job::workers, Job::error
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  int size_ = 1;
  bool started_ = false, stopping_ = false;
  uint64_t generation_ = 0;
  Job* current_ = nullptr;
};

}  // namespace

int num_threads() { return Pool::get().size(); }
void set_num_threads(int n) { Pool::get().resize(n); }
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  Pool::get().run(n, grain, fn);
}

}  // namespace flashlm
