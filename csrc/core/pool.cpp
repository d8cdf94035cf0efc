// BufferPool: see pool.h for the contract (hard budget, blocking acquire, reuse of buffers).

#include "pool.h"

#include <algorithm>
#include <cassert>
#include <cstdlib>

namespace shardckpt {

PoolBuffer& PoolBuffer::operator=(PoolBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    pool_ = other.pool_;
    data_ = other.data_;
    capacity_ = other.capacity_;
    other.pool_ = nullptr;
    other.data_ = nullptr;
    other.capacity_ = 0;
  }
  return *this;
}

void PoolBuffer::reset() {
  if (data_) pool_->release(data_, capacity_);
  pool_ = nullptr;
  data_ = nullptr;
  capacity_ = 0;
}

BufferPool::~BufferPool() {
  std::lock_guard<std::mutex> lk(mu_);
  uint64_t freed = 0;
  for (const Cached& c : cached_) {
    std::free(c.data);
    freed += c.capacity;
  }
  assert(freed == owned_ && "a PoolBuffer outlived its pool");
  (void)freed;
}

uint64_t BufferPool::charge(uint64_t size) {
  const uint64_t pages = size == 0 ? 1 : (size + kAlignment - 1) / kAlignment;
  return pages * kAlignment;
}

PoolBuffer BufferPool::acquire(size_t size) {
  const uint64_t need = charge(size);
  if (need > budget_) return {};
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    if (aborted_) return {};
    // Reuse the smallest cached buffer that is big enough: no page faults, no budget change.
    auto best = cached_.end();
    for (auto it = cached_.begin(); it != cached_.end(); ++it)
      if (it->capacity >= need && (best == cached_.end() || it->capacity < best->capacity))
        best = it;
    if (best != cached_.end()) {
      const Cached c = *best;
      *best = cached_.back();
      cached_.pop_back();
      return PoolBuffer(this, c.data, c.capacity);
    }
    if (owned_ + need <= budget_) {
      owned_ += need;  // reserve first so the allocation itself can run unlocked
      peak_ = std::max(peak_, owned_);
      lk.unlock();
      void* p = std::aligned_alloc(kAlignment, need);
      if (p) return PoolBuffer(this, static_cast<uint8_t*>(p), need);
      lk.lock();
      owned_ -= need;
      cv_.notify_all();
      return {};
    }
    if (!cached_.empty()) {
      // Only too-small buffers are cached: free one to make room for a bigger allocation.
      std::free(cached_.back().data);
      owned_ -= cached_.back().capacity;
      cached_.pop_back();
      continue;
    }
    cv_.wait(lk);  // back-pressure: everything is leased; wait for a writer to return a buffer
  }
}

void BufferPool::release(uint8_t* data, size_t capacity) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    cached_.push_back(Cached{data, capacity});
  }
  cv_.notify_all();
}

void BufferPool::abort() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    aborted_ = true;
  }
  cv_.notify_all();
}

uint64_t BufferPool::peak_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return peak_;
}

}  // namespace shardckpt
