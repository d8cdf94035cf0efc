// A bounded pool of page-aligned staging buffers: the save pipeline's only memory budget.
//
// Every staging allocation (encode scratch, compressed output waiting for a writer) comes from
// here. The pool counts the capacity of every buffer it owns, leased or cached, against a hard
// byte budget and never allocates past it: when the budget is exhausted, acquire() blocks until
// a writer returns a buffer. That wait is the pipeline's back-pressure from disk to encoders.
// Returned buffers are cached for reuse because fresh multi-MiB allocations are mmap'd and page-
// faulted on every use, which costs more than the encoding itself.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace shardckpt {

class BufferPool;

// A leased buffer; returns itself to its pool when destroyed. Move-only.
class PoolBuffer {
 public:
  PoolBuffer() = default;
  PoolBuffer(PoolBuffer&& other) noexcept { *this = std::move(other); }
  PoolBuffer& operator=(PoolBuffer&& other) noexcept;
  PoolBuffer(const PoolBuffer&) = delete;
  PoolBuffer& operator=(const PoolBuffer&) = delete;
  ~PoolBuffer() { reset(); }

  uint8_t* data() const { return data_; }
  size_t capacity() const { return capacity_; }
  explicit operator bool() const { return data_ != nullptr; }
  void reset();  // return the buffer to the pool now

 private:
  friend class BufferPool;
  PoolBuffer(BufferPool* pool, uint8_t* data, size_t capacity)
      : pool_(pool), data_(data), capacity_(capacity) {}

  BufferPool* pool_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
};

class BufferPool {
 public:
  static constexpr size_t kAlignment = 4096;

  explicit BufferPool(uint64_t budget_bytes) : budget_(budget_bytes) {}
  ~BufferPool();  // all leases must have been returned
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // The capacity a request of `size` bytes is charged (rounded up to the alignment).
  static uint64_t charge(uint64_t size);

  // Leases a buffer of at least `size` bytes, blocking while the budget is exhausted.
  // Returns an empty buffer if the pool was aborted, the request can never fit the budget, or
  // the system is out of memory.
  PoolBuffer acquire(size_t size);

  // Wakes every blocked acquire() and makes all later ones fail; used on the first error.
  void abort();

  uint64_t peak_bytes() const;

 private:
  friend class PoolBuffer;
  void release(uint8_t* data, size_t capacity);

  struct Cached {
    uint8_t* data;
    size_t capacity;
  };

  const uint64_t budget_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Cached> cached_;  // owned, not leased
  uint64_t owned_ = 0;          // capacity of all buffers owned (leased + cached)
  uint64_t peak_ = 0;
  bool aborted_ = false;
};

}  // namespace shardckpt
