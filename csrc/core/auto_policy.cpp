// AutoPolicy: see auto_policy.h for the rules and why.

#include "auto_policy.h"

#include <algorithm>

namespace shardckpt {

namespace {
// Weight of the newest sample: about the last ten chunks dominate the estimate.
constexpr double kDecay = 0.1;
}  // namespace

void AutoPolicy::Rate::add(double b, double s) {
  bytes = (1 - kDecay) * bytes + kDecay * b;
  seconds = (1 - kDecay) * seconds + kDecay * s;
}

uint64_t AutoPolicy::probe_bytes(uint64_t nbytes, uint32_t elemsize) {
  const uint64_t k = elemsize ? elemsize : 1;
  const uint64_t sample = std::min<uint64_t>(kProbeBytes, nbytes / 2);
  return sample - sample % k;
}

bool AutoPolicy::worth_compressing(uint64_t nbytes, uint64_t backlog_bytes) const {
  const double write = write_rate_.per_second(), compress = compress_rate_.per_second();
  if (!measured_ || write <= 0 || compress <= 0) return false;
  if (ratio_ > kPoorRatio) return false;                                      // rule 4
  if (max_compressing_ * compress < kKeepUpMargin * writers_ * write) return false;  // rule 2
  const double drain = writers_ * write * (static_cast<double>(nbytes) / compress);
  return static_cast<double>(backlog_bytes) >= drain;                         // rule 3
}

AutoChoice AutoPolicy::choose(uint64_t nbytes, uint64_t backlog_bytes) {
  if (backlog_bytes < backed_up_) return AutoChoice::kRaw;  // rule 1: the writers keep up
  std::lock_guard<std::mutex> lk(mu_);
  if (compressing_ < max_compressing_ && worth_compressing(nbytes, backlog_bytes)) {
    ++compressing_;
    return AutoChoice::kCompress;
  }
  // Stale or missing measurements: sample this chunk (raw chunks do not refresh them).
  unmeasured_ += nbytes;
  if ((!probed_once_ || unmeasured_ >= kProbeEveryBytes) && probe_bytes(nbytes, 1) > 0) {
    probed_once_ = true;
    unmeasured_ = 0;
    return AutoChoice::kProbe;
  }
  return AutoChoice::kRaw;
}

void AutoPolicy::measured(uint64_t raw_bytes, uint64_t stored_bytes, double seconds) {
  compress_rate_.add(static_cast<double>(raw_bytes), seconds);
  ratio_ = raw_bytes ? static_cast<double>(stored_bytes) / static_cast<double>(raw_bytes) : 1;
  measured_ = true;
}

void AutoPolicy::compressed(uint64_t raw_bytes, uint64_t stored_bytes, double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  --compressing_;
  measured(raw_bytes, stored_bytes, seconds);
  probed_once_ = true;
  unmeasured_ = 0;  // the measurement is fresh
}

void AutoPolicy::probed(uint64_t raw_bytes, uint64_t stored_bytes, double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  measured(raw_bytes, stored_bytes, seconds);
}

void AutoPolicy::cancel() {
  std::lock_guard<std::mutex> lk(mu_);
  --compressing_;
}

void AutoPolicy::wrote(uint64_t bytes, double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  write_rate_.add(static_cast<double>(bytes), seconds);
}

}  // namespace shardckpt
