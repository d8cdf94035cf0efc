// The `auto` save policy: per chunk, compress only when that cannot slow the save.
//
// Storing a chunk raw costs an encoder only a checksum; compressing it costs an encoder time and
// saves the writers time. Compression can only make a save slower, never faster, unless
//
//   1. the writers are the bottleneck: their backlog (bytes encoded, not yet written) is at
//      least `backed_up` bytes, so encoders would otherwise wait for room in the queue;
//   2. compression keeps up with the disk: the compressing threads together take in raw bytes
//      faster, by kKeepUpMargin, than the writers write raw bytes
//      (max_compressing * compress_rate >= kKeepUpMargin * writers * write_rate). On a fast
//      local disk, or while the page cache absorbs the writes, this fails and `auto` writes raw;
//      on a slow disk or a network store it holds;
//   3. the backlog outlasts the compression of this chunk: the writers drain it in no less time
//      than one chunk takes to compress (backlog >= writers * write_rate * nbytes /
//      compress_rate), so the disk never idles while an encoder compresses;
//   4. the data compresses: the latest measured chunk or sample shrank to <= kPoorRatio;
//   5. a compression slot is free: at most max_compressing chunks (the cores not needed by the
//      writers, at least one) are compressed at a time.
//
// Rates are measured during the call: write_rate (bytes/s of one writer, pwrite and writeback
// pacing included, so it reflects the disk) from every write, compress_rate (bytes/s of one
// encoder) and the ratio from every compression. Nothing is compressed before they exist. While
// chunks are stored raw, compress_rate and the ratio would go stale (and the disk may slow down
// later, when the page cache fills), so while the writers are backed up an encoder probes: it
// compresses a sample of at most kProbeBytes of a chunk once per kProbeEveryBytes stored raw
// (the first at once), discards the result and stores the chunk raw: 64 KiB of every 32 MiB,
// 0.2% of the bytes. Probes are how `auto` starts compressing on a slow store, stops on a
// fast one, and finds data that compresses so fast (zeros) that it pays even on a fast disk.
//
// The policy only decides; callers measure and report. Decisions depend only on the reported
// numbers, so tests feed it synthetic rates (csrc/core/auto_policy_test.cpp).
#pragma once

#include <cstdint>
#include <mutex>

namespace shardckpt {

enum class AutoChoice : uint8_t {
  kRaw,       // store the chunk raw
  kProbe,     // compress a sample (probe_bytes()), report it with probed(), store the chunk raw
  kCompress,  // compress the chunk; report with compressed() or cancel()
};

class AutoPolicy {
 public:
  static constexpr double kKeepUpMargin = 1.25;
  static constexpr double kPoorRatio = 0.97;
  static constexpr uint64_t kProbeEveryBytes = 32u << 20;
  static constexpr uint64_t kProbeBytes = 64u << 10;

  // backed_up: the writers' backlog, in bytes, at which they count as the bottleneck.
  // max_compressing: how many chunks may be compressed at the same time (>= 1).
  AutoPolicy(int writers, uint64_t backed_up, int max_compressing)
      : writers_(writers > 0 ? writers : 1), backed_up_(backed_up),
        max_compressing_(max_compressing > 0 ? max_compressing : 1) {}

  // What to do with a chunk of `nbytes` bytes, given the writers' current backlog.
  // kCompress claims a compression slot until compressed() or cancel().
  AutoChoice choose(uint64_t nbytes, uint64_t backlog_bytes);

  // The size of the sample a kProbe compresses from a chunk of `nbytes` bytes with elements of
  // `elemsize` bytes: whole elements, at most half the chunk (its shuffled copy and its output
  // together then fit any buffer the chunk itself could use). 0: too small to sample.
  static uint64_t probe_bytes(uint64_t nbytes, uint32_t elemsize);

  // An encoder compressed a chunk (raw_bytes -> stored_bytes) in `seconds`.
  void compressed(uint64_t raw_bytes, uint64_t stored_bytes, double seconds);

  // An encoder compressed a probe sample (raw_bytes -> stored_bytes) in `seconds`.
  void probed(uint64_t raw_bytes, uint64_t stored_bytes, double seconds);

  // The compression claimed by choose() did not happen (the save is failing).
  void cancel();

  // A writer spent `seconds` writing `bytes` (pwrite and pacing).
  void wrote(uint64_t bytes, double seconds);

 private:
  // Bytes/s as a ratio of exponentially decaying sums, so that a few slow calls (a writer waiting
  // for writeback) weigh by their duration rather than counting as one sample each.
  struct Rate {
    double bytes = 0, seconds = 0;
    void add(double b, double s);
    double per_second() const { return seconds > 0 ? bytes / seconds : 0; }
  };

  bool worth_compressing(uint64_t nbytes, uint64_t backlog_bytes) const;  // rules 2-4; mu_ held
  void measured(uint64_t raw_bytes, uint64_t stored_bytes, double seconds);  // mu_ held

  const int writers_;
  const uint64_t backed_up_;
  const int max_compressing_;
  std::mutex mu_;  // guards everything below (taken about twice per chunk)
  Rate write_rate_, compress_rate_;
  double ratio_ = 1;         // stored/raw of the latest compression or probe
  bool measured_ = false;    // compress_rate_ and ratio_ hold a measurement
  uint64_t unmeasured_ = 0;    // bytes stored raw (backed up) since the latest measurement
  bool probed_once_ = false;  // until the first probe or compression, a probe is due at once
  int compressing_ = 0;
};

}  // namespace shardckpt
