// AutoPolicy: see auto_policy.h for the rule and why.

#include "auto_policy.h"

namespace shardckpt {

namespace {
// Weight of the newest sample: about the last ten chunks dominate the estimate.
constexpr double kDecay = 0.1;
}  // namespace

void AutoPolicy::Rate::add(double b, double s) {
  bytes = (1 - kDecay) * bytes + kDecay * b;
  seconds = (1 - kDecay) * seconds + kDecay * s;
}

bool AutoPolicy::backlog_covers(uint64_t nbytes, uint64_t backlog_bytes) const {
  double high_water = static_cast<double>(bootstrap_high_water_);
  std::lock_guard<std::mutex> lk(mu_);
  const double write = write_rate_.per_second(), compress = compress_rate_.per_second();
  if (write > 0 && compress > 0) {
    // A queue full of raw chunks does not mean compression would help: raw chunks are ready
    // almost at once, so the queue is full whenever the writers are busy. Compression raises
    // throughput only if the compressing threads together outrun the writers.
    if (max_compressing_ * compress <= writers_ * write) return false;
    high_water = writers_ * write * (static_cast<double>(nbytes) / compress);
  }
  return static_cast<double>(backlog_bytes) >= high_water;
}

bool AutoPolicy::begin_compress(uint64_t index, uint64_t nbytes, uint64_t backlog_bytes) {
  if (index < skip_until_.load(std::memory_order_relaxed)) return false;
  if (!backlog_covers(nbytes, backlog_bytes)) return false;
  int busy = compressing_.load(std::memory_order_relaxed);
  do {
    if (busy >= max_compressing_) return false;
  } while (!compressing_.compare_exchange_weak(busy, busy + 1, std::memory_order_relaxed));
  return true;
}

void AutoPolicy::end_compress(uint64_t index, uint64_t raw_bytes, uint64_t stored_bytes,
                              double seconds) {
  compressing_.fetch_sub(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(mu_);
    compress_rate_.add(static_cast<double>(raw_bytes), seconds);
  }
  if (static_cast<double>(stored_bytes) <= kPoorRatio * static_cast<double>(raw_bytes)) return;
  const uint64_t until = index + 1 + kSkipChunks;
  uint64_t cur = skip_until_.load(std::memory_order_relaxed);
  while (cur < until &&
         !skip_until_.compare_exchange_weak(cur, until, std::memory_order_relaxed)) {
  }
}

void AutoPolicy::wrote(uint64_t bytes, double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  write_rate_.add(static_cast<double>(bytes), seconds);
}

}  // namespace shardckpt
