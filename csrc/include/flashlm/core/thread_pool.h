// The library's CPU thread pool. Its size follows FLASHLM_NUM_THREADS (default: the hardware threads;
// the Python package sets it to torch.get_num_threads() so flashlm and torch do not oversubscribe).
#pragma once

#include <cstdint>
#include <functional>

#include "flashlm/core/export.h"

namespace flashlm {

// The most threads the pool takes (FLASHLM_NUM_THREADS, set_num_threads): above the 768 hardware threads of
// today's largest two-socket x86 servers, below where ordinary process limits refuse threads (5000 failed
// with EAGAIN on the development machine).
constexpr int kMaxThreads = 1024;

FLASHLM_API int num_threads();
// 1 <= n <= kMaxThreads; joins the current workers and starts n - 1 new ones (the caller is the n-th). Where the system
// refuses a thread, throws flashlm::Error and keeps the threads it had.
FLASHLM_API void set_num_threads(int n);

// Calls fn(begin, end) on disjoint ranges that cover [0, n), each at least `grain` long (but the last),
// on up to num_threads() threads, and returns when all are done. The first exception thrown by fn is
// rethrown here. Nested calls, and calls made while another thread holds the pool, run serially on
// the calling thread.
FLASHLM_API void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace flashlm
