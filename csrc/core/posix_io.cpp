// POSIX IO helpers: see posix_io.h.

#include "posix_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace shardckpt {

namespace {

// Linux transfers at most this much per read/write call; asking for less keeps every platform's
// ssize_t return value meaningful.
constexpr uint64_t kMaxIo = 1ull << 30;

}  // namespace

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

int UniqueFd::close() {
  if (fd_ < 0) return 0;
  const int rc = ::close(fd_);
  fd_ = -1;
  // close(2) must not be retried on EINTR (Linux always frees the descriptor).
  return rc == 0 || errno == EINTR ? 0 : errno;
}

Status errno_status(int err, const char* op, const std::string& path, int64_t chunk) {
  Status s;
  s.code = (err == ENOSPC || err == EDQUOT) ? Code::kNoSpace : Code::kIoError;
  s.err = err;
  s.chunk = chunk;
  s.message = std::string(op) + " " + path;
  if (chunk >= 0) s.message += " (chunk " + std::to_string(chunk) + ")";
  s.message += ": ";
  s.message += std::strerror(err);
  return s;
}

int pwrite_all(int fd, const uint8_t* data, uint64_t n, uint64_t off) {
  while (n > 0) {
    const size_t step = static_cast<size_t>(n < kMaxIo ? n : kMaxIo);
    const ssize_t w = ::pwrite(fd, data, step, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO;  // no progress and no error: never loop forever
    data += w;
    off += static_cast<uint64_t>(w);
    n -= static_cast<uint64_t>(w);
  }
  return 0;
}

int pread_all(int fd, uint8_t* data, uint64_t n, uint64_t off, uint64_t* got) {
  *got = 0;
  while (*got < n) {
    const uint64_t left = n - *got;
    const size_t step = static_cast<size_t>(left < kMaxIo ? left : kMaxIo);
    const ssize_t r = ::pread(fd, data + *got, step, static_cast<off_t>(off + *got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) break;  // end of file
    *got += static_cast<uint64_t>(r);
  }
  return 0;
}

#ifdef __linux__

int WritebackPacer::wrote(uint64_t off, uint64_t len) {
  if (!enabled_ || len == 0) return 0;
  auto sync = [this](uint64_t o, uint64_t l, unsigned flags) -> int {
    if (::sync_file_range(fd_, static_cast<off_t>(o), static_cast<off_t>(l), flags) == 0) return 0;
    const int err = errno;
    // Some file systems (and some sandboxes) refuse it; pacing is an optimisation, so drop it.
    if (err == EINVAL || err == ENOSYS || err == EOPNOTSUPP || err == ESPIPE) {
      enabled_ = false;
      return 0;
    }
    return err;
  };
  if (int err = sync(off, len, SYNC_FILE_RANGE_WRITE)) return err;
  ranges_.emplace_back(off, len);
  in_flight_ += len;
  while (enabled_ && in_flight_ > window_ && !ranges_.empty()) {
    const auto oldest = ranges_.front();
    ranges_.pop_front();
    in_flight_ -= oldest.second;
    const unsigned wait_all =
        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (int err = sync(oldest.first, oldest.second, wait_all)) return err;
  }
  return 0;
}

bool sync_file_range_supported() { return true; }

#else  // !__linux__

int WritebackPacer::wrote(uint64_t, uint64_t) { return 0; }

bool sync_file_range_supported() { return false; }

#endif

}  // namespace shardckpt
