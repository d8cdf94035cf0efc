// The hand-off between encode threads and writer threads: a bounded FIFO of encoded chunks.
//
// Its length in bytes (encoded, not yet on disk) is the pipeline's measure of how far the
// writers are behind; the `auto` policy compresses only while that backlog is high.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>

#include "pipeline.h"
#include "pool.h"

namespace shardckpt {

// One chunk ready to be written. `data` points either into `buffer` (encoded bytes) or, for a
// chunk stored raw, at the caller's source memory (zero copy; `buffer` is then empty).
struct EncodedChunk {
  uint64_t index = 0;
  const uint8_t* data = nullptr;
  uint64_t length = 0;
  Kind kind = Kind::kRaw;
  uint32_t crc = 0;
  PoolBuffer buffer;
};

class WriteQueue {
 public:
  explicit WriteQueue(size_t capacity) : capacity_(capacity ? capacity : 1) {}

  // Blocks while the queue is full. Returns false (dropping the chunk) once aborted.
  bool push(EncodedChunk&& chunk);

  // Blocks while the queue is empty and open. Returns false when closed and drained, or aborted.
  bool pop(EncodedChunk* out);

  // A writer finished writing `length` bytes it popped: they leave the backlog.
  void written(uint64_t length) { backlog_.fetch_sub(length, std::memory_order_relaxed); }

  // Bytes pushed and not yet reported written (queued or being written).
  uint64_t backlog_bytes() const { return backlog_.load(std::memory_order_relaxed); }

  void close();  // no more pushes; pop() drains what is left
  void abort();  // wake everyone; push() and pop() fail from now on

 private:
  const size_t capacity_;
  std::mutex mu_;
  std::condition_variable not_full_, not_empty_;
  std::deque<EncodedChunk> items_;
  bool closed_ = false, aborted_ = false;
  std::atomic<uint64_t> backlog_{0};
};

}  // namespace shardckpt
