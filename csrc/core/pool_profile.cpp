// The thread pool's job profile (pool_profile.h). Samples go into a map under a mutex: a bench-only cost of
// ~50 ns per job, nothing when FLASHLM_POOL_PROFILE is unset.
#include "pool_profile.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <x86intrin.h>
#define FLASHLM_TICKS() __rdtsc()
#else
#define FLASHLM_TICKS() static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count())
#endif

namespace flashlm::detail {

namespace {

struct Samples {
  std::vector<uint64_t> total, own, wait, join, gap;
  std::vector<int> threads;
};

double median(std::vector<uint64_t> v) {
  if (v.empty()) return 0.0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return static_cast<double>(v[v.size() / 2]);
}

std::string site_name(const void* site) {
  // The library's offset too: its internal functions have no dynamic symbol (nm -C or addr2line names them).
  Dl_info info{};
  char buf[64];
  if (!dladdr(site, &info)) {
    std::snprintf(buf, sizeof buf, "%p", site);
    return buf;
  }
  std::snprintf(buf, sizeof buf, "+0x%zx ", static_cast<size_t>(static_cast<const char*>(site) -
                                                               static_cast<const char*>(info.dli_fbase)));
  return std::string(info.dli_fname ? info.dli_fname : "?") + buf + (info.dli_sname ? info.dli_sname : "");
}

class Profile {
 public:
  Profile() {
    const char* path = std::getenv("FLASHLM_POOL_PROFILE");
    if (path && *path) path_ = path;
    wall0_ = std::chrono::steady_clock::now();
    tick0_ = FLASHLM_TICKS();
  }
  ~Profile() { write(); }
  bool on() const { return !path_.empty(); }

  void record(const void* site, const JobTimes& t) {
    std::lock_guard<std::mutex> lock(mutex_);
    Samples& s = sites_[{site, t.n}];
    s.total.push_back(t.end - t.start);
    s.own.push_back(t.own - t.start);
    s.wait.push_back(t.end - t.own);
    if (t.joined) s.join.push_back(t.joined - t.start);
    s.gap.push_back(last_end_ && t.start > last_end_ ? t.start - last_end_ : 0);
    s.threads.push_back(t.threads);
    last_end_ = t.end;
  }

 private:
  void write() {
    if (!on()) return;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0_).count();
    const double us_per_tick = secs * 1e6 / static_cast<double>(FLASHLM_TICKS() - tick0_);
    FILE* f = std::fopen(path_.c_str(), "w");
    if (!f) return;
    std::fprintf(f, "# per call site of parallel_for and job size n: jobs, medians in us (total = own + wait), "
                 "mean threads\n");
    std::fprintf(f, "%-8s %8s %8s %8s %8s %8s %8s %7s  %s\n", "jobs", "n", "total", "own", "wait", "join", "gap", "thr",
                 "site");
    for (auto& [key, s] : sites_) {
      const auto& [site, n] = key;
      double thr = 0;
      for (int t : s.threads) thr += t;
      std::fprintf(f, "%-8zu %8lld %8.2f %8.2f %8.2f %8.2f %8.2f %7.2f  %s\n", s.total.size(), static_cast<long long>(n), median(s.total) * us_per_tick,
                   median(s.own) * us_per_tick, median(s.wait) * us_per_tick, median(s.join) * us_per_tick,
                   median(s.gap) * us_per_tick, thr / s.threads.size(), site_name(site).c_str());
    }
    std::fclose(f);
  }

  std::string path_;
  std::chrono::steady_clock::time_point wall0_;
  uint64_t tick0_ = 0, last_end_ = 0;
  std::mutex mutex_;
  std::map<std::pair<const void*, int64_t>, Samples> sites_;  // (site, n): a site's jobs by size
};

Profile& profile() {
  static Profile p;
  return p;
}

}  // namespace

bool pool_profile_on() {
  static const bool on = profile().on();
  return on;
}
uint64_t pool_profile_ticks() { return FLASHLM_TICKS(); }
void pool_profile_record(const void* site, const JobTimes& t) { profile().record(site, t); }

}  // namespace flashlm::detail
