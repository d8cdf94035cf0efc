// The `auto` save policy: per chunk, compress only while the writers are the bottleneck.
//
// Compressing a chunk costs an encoder thread time and saves the writers time. That trade pays
// only while the writers have enough queued work to keep the disk busy until the compressed chunk
// is ready; otherwise the disk idles while an encoder compresses, and storing raw is faster.
// First, compression can only raise throughput when the compressing threads together are faster
// than the writers (max_compressing * compress_rate > writers * write_rate); on a fast local disk
// they are not, and `auto` then writes raw. When they are, a chunk is compressed when the writers'
// backlog (bytes encoded, not yet written) reaches
//
//     high_water = writers * write_rate * (chunk bytes / compress_rate)
//
// i.e. what the writers drain while one chunk compresses, with write_rate (bytes/s of one
// writer, pwrite + writeback pacing included, so it reflects the disk) and compress_rate (bytes/s
// of one encoder) measured during this call. Until both have been measured the mark is a fixed
// number of average chunks per writer. When the disk outruns compression the mark exceeds what
// the bounded queue can hold and nothing is compressed; on a slow disk the mark drops below one
// chunk and nearly everything is.
//
// Compression also never takes the cores the writers need: writing into the page cache is a
// memory copy done by the writer threads, so at most (cores - writers) chunks, and at least one,
// are compressed at a time.
//
// Separately, after a chunk that barely compresses (stored/raw > kPoorRatio) the next
// kSkipChunks chunk indices are stored raw without trying: indices are handed out in order and
// neighbouring chunks usually belong to the same tensor, so they would not compress either.
// (write_file also stores raw, without asking, any chunk whose buffers could not fit the pool.)
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

namespace shardckpt {

class AutoPolicy {
 public:
  static constexpr uint64_t kSkipChunks = 8;
  static constexpr double kPoorRatio = 0.97;

  // bootstrap_high_water: the backlog mark used until both rates have been measured.
  // max_compressing: how many chunks may be compressed at the same time (>= 1).
  AutoPolicy(int writers, uint64_t bootstrap_high_water, int max_compressing)
      : writers_(writers), bootstrap_high_water_(bootstrap_high_water),
        max_compressing_(max_compressing > 0 ? max_compressing : 1) {}

  // Whether to compress chunk `index` of `nbytes` bytes, given the writers' current backlog.
  // True claims a compression slot: the caller must then call end_compress() or cancel().
  bool begin_compress(uint64_t index, uint64_t nbytes, uint64_t backlog_bytes);

  // An encoder spent `seconds` compressing chunk `index` (raw_bytes -> stored_bytes).
  void end_compress(uint64_t index, uint64_t raw_bytes, uint64_t stored_bytes, double seconds);

  // The compression claimed by begin_compress() did not happen (the save is failing).
  void cancel() { compressing_.fetch_sub(1, std::memory_order_relaxed); }

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

  bool backlog_covers(uint64_t nbytes, uint64_t backlog_bytes) const;

  const int writers_;
  const uint64_t bootstrap_high_water_;
  const int max_compressing_;
  std::atomic<int> compressing_{0};
  mutable std::mutex mu_;  // guards the rates (taken about twice per chunk)
  Rate write_rate_, compress_rate_;
  std::atomic<uint64_t> skip_until_{0};
};

}  // namespace shardckpt
