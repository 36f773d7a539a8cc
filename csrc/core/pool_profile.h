// A profile of the thread pool's jobs, for benchmarks: with FLASHLM_POOL_PROFILE=<file> set, every
// parallel_for records (in rdtsc ticks) its caller's own share, its wait for the workers' last units, how long
// the first worker took to join, and the serial time since the previous job ended; at exit the medians per
// call site (the function that called parallel_for) go to <file>. Off (one relaxed load per job) otherwise.
#pragma once

#include <cstdint>

namespace flashlm::detail {

struct JobTimes {
  uint64_t start = 0;   // the caller entered the pool
  uint64_t joined = 0;  // the first worker took a slot (0: none did)
  uint64_t own = 0;     // the caller ran out of units to take
  uint64_t end = 0;     // the last worker left
  int64_t n = 0;
  int threads = 1;      // 1 + the workers that joined
};

bool pool_profile_on();
uint64_t pool_profile_ticks();
// site: the return address inside the function that called parallel_for.
void pool_profile_record(const void* site, const JobTimes& t);

}  // namespace flashlm::detail
