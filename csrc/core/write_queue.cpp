// WriteQueue: see write_queue.h.

#include "write_queue.h"

namespace shardckpt {

bool WriteQueue::push(EncodedChunk&& chunk) {
  std::unique_lock<std::mutex> lk(mu_);
  not_full_.wait(lk, [&] { return aborted_ || items_.size() < capacity_; });
  if (aborted_) return false;
  backlog_.fetch_add(chunk.length, std::memory_order_relaxed);
  items_.push_back(std::move(chunk));
  lk.unlock();
  not_empty_.notify_one();
  return true;
}

bool WriteQueue::pop(EncodedChunk* out) {
  std::unique_lock<std::mutex> lk(mu_);
  not_empty_.wait(lk, [&] { return aborted_ || closed_ || !items_.empty(); });
  if (aborted_ || items_.empty()) return false;
  *out = std::move(items_.front());
  items_.pop_front();
  lk.unlock();
  not_full_.notify_one();
  return true;
}

void WriteQueue::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
  }
  not_empty_.notify_all();
}

void WriteQueue::abort() {
  std::deque<EncodedChunk> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    aborted_ = true;
    dropped.swap(items_);  // their buffers go back to the pool outside the lock
  }
  not_full_.notify_all();
  not_empty_.notify_all();
}

}  // namespace shardckpt
