// Checks the semantics of the library's thread pool (csrc/core/thread_pool.cpp): every index of a
// parallel_for runs exactly once, on disjoint non-empty ranges, for any size, grain and thread count (more
// threads than cores included); nested calls and calls from a second thread while the pool is busy run
// serially on their own thread; the first exception reaches the caller and the pool works on afterwards;
// a thread stuck in one range does not keep the other threads from the rest of its share. No timings.
// Built with thread_pool.cpp and error.cpp and run by tests/test_thread_pool.py (also with FLASHLM_SPIN_US=0
// and in the contended mode, where nobody polls):
//   c++ -std=c++17 -pthread -I csrc/include tests/cpp/thread_pool_test.cpp csrc/core/thread_pool.cpp
//       csrc/core/error.cpp && ./a.out
#include <atomic>
#include <cstdlib>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "expect.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"

using flashlm::parallel_for;

// Runs parallel_for(n, grain) and checks that each index ran once and every range was well formed.
static void check_cover(int64_t n, int64_t grain, const char* what) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n > 0 ? n : 0));
  std::atomic<int> bad_ranges{0};
  parallel_for(n, grain, [&](int64_t begin, int64_t end) {
    if (!(0 <= begin && begin < end && end <= n)) {
      bad_ranges.fetch_add(1);
      return;
    }
    for (int64_t i = begin; i < end; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
  });
  EXPECT(bad_ranges.load() == 0, "%s: n %lld grain %lld: %d ranges outside [0, n) or empty", what, (long long)n,
         (long long)grain, bad_ranges.load());
  for (int64_t i = 0; i < n; ++i) {
    const int h = hits[static_cast<size_t>(i)].load();
    if (h != 1) {
      EXPECT(h == 1, "%s: n %lld grain %lld: index %lld ran %d times", what, (long long)n, (long long)grain,
             (long long)i, h);
      break;
    }
  }
}

static void check_sizes(const char* what) {
  for (int64_t n : {0, 1, 2, 3, 7, 8, 15, 16, 17, 63, 100, 1000, 4097, 100003}) {
    for (int64_t grain : {0, 1, 2, 3, 64, 1000, 1 << 20}) check_cover(n, grain, what);
  }
  for (int rep = 0; rep < 2000; ++rep) check_cover(1 + rep % 97, 1, what);  // back to back, as a decode step
}

// A parallel_for inside a range runs on that thread, as one range.
static void check_nested() {
  std::atomic<int> wrong{0}, inner_calls{0};
  std::atomic<int64_t> covered{0};
  parallel_for(64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto outer = std::this_thread::get_id();
      parallel_for(50, 1, [&](int64_t b, int64_t e) {
        inner_calls.fetch_add(1);
        if (std::this_thread::get_id() != outer || b != 0 || e != 50) wrong.fetch_add(1);
        covered.fetch_add(e - b);
      });
    }
  });
  EXPECT(wrong.load() == 0, "%d nested calls left their thread or split their range", wrong.load());
  EXPECT(inner_calls.load() == 64 && covered.load() == 64 * 50, "nested: %d calls covering %lld", inner_calls.load(),
         (long long)covered.load());
}

// Two threads calling at once: each call covers its own range exactly once (one may run serially).
static void check_concurrent_callers() {
  std::atomic<int> failures_seen{0};
  auto caller = [&](int64_t n) {
    for (int rep = 0; rep < 300; ++rep) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      parallel_for(n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
      });
      for (auto& h : hits)
        if (h.load() != 1) failures_seen.fetch_add(1);
    }
  };
  std::thread other(caller, 333);
  caller(1000);
  other.join();
  EXPECT(failures_seen.load() == 0, "concurrent callers: %d indices not run exactly once", failures_seen.load());
}

// The first exception reaches the caller; the pool runs the next job in full.
static void check_exceptions() {
  for (int64_t n : {2, 100, 100000}) {
    bool caught = false;
    try {
      parallel_for(n, 1, [&](int64_t b, int64_t e) {
        if (b <= n / 2 && n / 2 < e) throw std::runtime_error("range with the middle index");
      });
    } catch (const std::runtime_error& err) {
      caught = std::strcmp(err.what(), "range with the middle index") == 0;
    }
    EXPECT(caught, "n %lld: the exception did not reach the caller", (long long)n);
    check_cover(n, 1, "after an exception");
  }
  bool caught = false;
  try {
    parallel_for(1000, 1, [](int64_t, int64_t) { throw 7; });  // every range throws: one reaches the caller
  } catch (int v) {
    caught = v == 7;
  }
  EXPECT(caught, "an exception thrown by every range did not reach the caller");
}

// A thread stuck in its first range: the rest of the work is done by the other threads meanwhile (the stuck
// range waits for it, at most 20 s, and fails the check rather than hang).
static void check_stuck_thread() {
  const int64_t n = 1000;
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  std::atomic<int64_t> done{0};
  std::atomic<bool> stuck_taken{false}, starved{false};
  int64_t stuck_len = 0;
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    if (!stuck_taken.exchange(true)) {
      stuck_len = e - b;
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (done.load() < n - stuck_len) {
        if (std::chrono::steady_clock::now() > until) {
          starved.store(true);
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
    }
    for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
    done.fetch_add(e - b);
  });
  EXPECT(!starved.load(), "the other threads did not take the stuck thread's remaining ranges");
  for (int64_t i = 0; i < n; ++i) EXPECT(hits[static_cast<size_t>(i)].load() == 1, "stuck: index %lld", (long long)i);
}

static void check_all(const char* what) {
  check_sizes(what);
  check_nested();
  check_concurrent_callers();
  check_exceptions();
  if (flashlm::num_threads() > 1) check_stuck_thread();
}

int main(int argc, char** argv) {
  // argv[1]: thread counts to run the checks with (default "1 2 3 8 64": 64 is far more than the cores).
  std::vector<int> counts = {1, 2, 3, 8, 64};
  if (argc > 1) {
    counts.clear();
    for (int i = 1; i < argc; ++i) counts.push_back(std::atoi(argv[i]));
  }
  for (int threads : counts) {
    flashlm::set_num_threads(threads);
    EXPECT(flashlm::num_threads() == threads, "num_threads %d after set_num_threads(%d)", flashlm::num_threads(),
           threads);
    const std::string what = std::to_string(threads) + " threads";
    check_all(what.c_str());
  }
  bool refused = false;
  try {
    flashlm::set_num_threads(0);
  } catch (const flashlm::ValueError&) {
    refused = true;
  }
  EXPECT(refused, "set_num_threads(0) was accepted");
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
