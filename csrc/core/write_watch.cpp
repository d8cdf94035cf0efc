// Write watches (write_watch.h): mprotect plus a chaining SIGSEGV handler.
//
// The handler may run on any thread at any moment, so it takes no lock and allocates nothing:
// watches live in a fixed table of atomics that it scans. A fault that is not a write to a
// watched page goes to the handler that was installed before ours, as if ours were not there.

#include "write_watch.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <utility>
#include <vector>

#ifdef __linux__
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace shardckpt {

#ifdef __linux__

namespace {

enum State : int { kFree = 0, kWatching = 1, kWritten = 2, kDone = 3 };

struct Slot {
  std::atomic<uintptr_t> lo{0}, hi{0};
  std::atomic<int> state{kFree};
};

constexpr size_t kSlots = 1 << 16;
Slot g_slots[kSlots];
std::atomic<size_t> g_used{0};  // slots [0, g_used) have been handed out at least once
std::mutex g_mutex;             // watch/unwatch (never the handler)
struct sigaction g_previous;    // the handler ours replaced

void make_writable(uintptr_t lo, uintptr_t hi) {
  if (hi > lo) mprotect(reinterpret_cast<void*>(lo), hi - lo, PROT_READ | PROT_WRITE);
}

// Marks every live watch over `addr` written and unprotects it; a watch that overlaps what was
// unprotected is marked too (its pages are no longer watched). True if `addr` is ours.
bool on_write(uintptr_t addr) {
  const size_t used = g_used.load(std::memory_order_acquire);
  bool ours = false;
  for (bool again = true; again;) {
    again = false;
    for (size_t i = 0; i < used; ++i) {
      Slot& s = g_slots[i];
      const int st = s.state.load(std::memory_order_acquire);
      const uintptr_t lo = s.lo.load(std::memory_order_relaxed);
      const uintptr_t hi = s.hi.load(std::memory_order_relaxed);
      if (addr < lo || addr >= hi || st == kFree) continue;
      ours = true;  // watched now or a moment ago: the write may go on once writable
      int expected = kWatching;
      if (s.state.compare_exchange_strong(expected, kWritten)) {
        make_writable(lo, hi);
        for (size_t j = 0; j < used; ++j) {  // overlapping watches lost pages: mark them
          Slot& o = g_slots[j];
          int w = kWatching;
          if (o.lo.load(std::memory_order_relaxed) < hi && lo < o.hi.load(std::memory_order_relaxed)
              && o.state.compare_exchange_strong(w, kWritten)) {
            make_writable(o.lo.load(std::memory_order_relaxed), o.hi.load(std::memory_order_relaxed));
            again = true;
          }
        }
      }
    }
  }
  return ours;
}

void handler(int sig, siginfo_t* info, void*) {
  const int saved_errno = errno;
  if (info != nullptr && info->si_code == SEGV_ACCERR &&
      on_write(reinterpret_cast<uintptr_t>(info->si_addr))) {
    errno = saved_errno;
    return;  // the faulting write runs again, now on writable pages
  }
  // Not ours: put the previous handler back; a fault repeats into it, a sent signal is
  // raised again (blocked until we return). Calling it from here could loop with handlers that
  // restore their own predecessor (faulthandler). The next watch installs ours again.
  sigaction(SIGSEGV, &g_previous, nullptr);
  if (info == nullptr || info->si_code <= 0) raise(sig);
  errno = saved_errno;
}

// Installs ours, again if someone (faulthandler) replaced it since; called under g_mutex.
bool install() {
  struct sigaction current;
  if (sigaction(SIGSEGV, nullptr, &current) != 0) return false;
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == handler) return true;
  struct sigaction ours = {};
  ours.sa_sigaction = handler;
  ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&ours.sa_mask);
  g_previous = current;
  if (sigaction(SIGSEGV, &ours, nullptr) != 0) return false;
  return true;
}

int64_t take_slot() {
  const size_t used = g_used.load();
  for (size_t i = 0; i < used; ++i) {
    int done = kDone;
    if (g_slots[i].state.load() == kFree) return static_cast<int64_t>(i);
    if (g_slots[i].state.compare_exchange_strong(done, kFree)) return static_cast<int64_t>(i);
  }
  if (used == kSlots) return -ENOSPC;
  g_used.store(used + 1, std::memory_order_release);
  return static_cast<int64_t>(used);
}

}  // namespace

bool write_watch_supported() { return true; }

int64_t watch_writes(uintptr_t lo, uintptr_t hi) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  if (lo % page != 0 || hi % page != 0 || hi <= lo) return -EINVAL;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!install()) return -errno;
  const int64_t id = take_slot();
  if (id < 0) return id;
  Slot& s = g_slots[id];
  s.lo.store(lo, std::memory_order_relaxed);
  s.hi.store(hi, std::memory_order_relaxed);
  s.state.store(kWatching, std::memory_order_release);  // visible before the first fault
  if (mprotect(reinterpret_cast<void*>(lo), hi - lo, PROT_READ) != 0) {
    const int err = errno;
    s.state.store(kDone);
    return -err;
  }
  return id;
}

int unwatch_writes(int64_t id) {
  if (id < 0 || static_cast<size_t>(id) >= g_used.load()) return -1;
  std::lock_guard<std::mutex> lock(g_mutex);
  Slot& s = g_slots[id];
  const int was = s.state.exchange(kDone);
  if (was != kWatching && was != kWritten) return -1;
  const uintptr_t lo = s.lo.load(), hi = s.hi.load();
  // Unprotect [lo, hi) less the pages other live watches still cover.
  std::vector<std::pair<uintptr_t, uintptr_t>> keep;
  const size_t used = g_used.load();
  for (size_t i = 0; i < used; ++i) {
    const Slot& o = g_slots[i];
    if (o.state.load() != kWatching) continue;
    const uintptr_t a = std::max(lo, o.lo.load()), b = std::min(hi, o.hi.load());
    if (a < b) keep.emplace_back(a, b);
  }
  std::sort(keep.begin(), keep.end());
  uintptr_t at = lo;
  for (const auto& [a, b] : keep) {
    make_writable(at, std::max(at, a));
    at = std::max(at, b);
  }
  make_writable(at, hi);
  return was == kWritten ? 1 : 0;
}

#else  // not Linux: no watches; the caller copies at the call instead

bool write_watch_supported() { return false; }
int64_t watch_writes(uintptr_t, uintptr_t) { return -ENOSYS; }
int unwatch_writes(int64_t) { return -1; }

#endif

}  // namespace shardckpt
