// POSIX file helpers shared by the writer and the reader: full-length positional IO that
// survives EINTR and partial transfers, errno -> Status mapping, an owning fd, and the
// writeback pacer that keeps the page cache from hiding a slow disk.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <utility>

#include "pipeline.h"

namespace shardckpt {

// Closes the descriptor on destruction unless release()d or close()d explicitly.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int close();  // returns errno of close(2), or 0
  void reset(int fd) {
    close();
    fd_ = fd;
  }

 private:
  int fd_;
};

// A Status for a failed system call: ENOSPC/EDQUOT become kNoSpace, everything else kIoError.
// The message names the operation, the path and (when >= 0) the chunk.
Status errno_status(int err, const char* op, const std::string& path, int64_t chunk = -1);

// Writes all n bytes at off. Returns 0 or the errno of the failing call.
int pwrite_all(int fd, const uint8_t* data, uint64_t n, uint64_t off);

// Reads up to n bytes at off into data, stopping early only at end of file.
// Returns 0 or an errno; *got is the number of bytes read.
int pread_all(int fd, uint8_t* data, uint64_t n, uint64_t off, uint64_t* got);

// Starts writeback of each range as soon as it is written and, once more than `window` bytes
// are in flight, waits for the oldest ranges to reach the disk. This bounds the dirty page cache
// a save creates and makes write throughput track the device, which is the signal the `auto`
// policy uses to decide when compressing pays. A no-op where sync_file_range is unavailable or
// unsupported by the file system.
class WritebackPacer {
 public:
  WritebackPacer(int fd, uint64_t window) : fd_(fd), window_(window) {}

  // Records that [off, off+len) was just written. Returns 0 or an errno.
  int wrote(uint64_t off, uint64_t len);

 private:
  int fd_;
  uint64_t window_;
  uint64_t in_flight_ = 0;
  bool enabled_ = true;
  std::deque<std::pair<uint64_t, uint64_t>> ranges_;  // oldest first
};

}  // namespace shardckpt
