// read_chunks: the load pipeline for one data file (FORMAT.md 2, 5).
//
// Threads pull chunk indices from an atomic counter. Each chunk is read with one pread (straight
// into the caller's memory when it is stored raw), its crc32c is verified before anything else
// looks at the bytes, and only then is it decompressed and/or unshuffled into place. Every
// range and length is checked against the file size before any buffer is sized from it, so a
// hostile manifest cannot make the reader allocate more than the shapes it declares.

#include <fcntl.h>
#include <sys/stat.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>

#include "pipeline.h"
#include "posix_io.h"

namespace shardckpt {
namespace {

Status fail(Code code, uint64_t index, std::string message) {
  Status s;
  s.code = code;
  s.chunk = static_cast<int64_t>(index);
  s.message = "chunk " + std::to_string(index) + ": " + message;
  return s;
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

bool is_shuffled(Kind k) { return k == Kind::kShuffle || k == Kind::kShuffleZstd; }
bool is_zstd(Kind k) { return k == Kind::kZstd || k == Kind::kShuffleZstd; }

// Checks one request against the codec rules and the file's size.
Status validate(uint64_t i, const ChunkRead& r, uint64_t file_size) {
  if (static_cast<uint8_t>(r.kind) > static_cast<uint8_t>(Kind::kShuffleZstd))
    return fail(Code::kInvalidArgument, i, "unknown kind " + std::to_string(int(r.kind)));
  if (is_shuffled(r.kind) && (r.elemsize == 0 || r.raw_length % r.elemsize != 0))
    return fail(Code::kInvalidArgument, i, "raw length is not a multiple of the element size");
  if (!is_zstd(r.kind) && r.length != r.raw_length)
    return fail(Code::kInvalidArgument, i, "an uncompressed chunk's length must equal its raw length");
  if (is_zstd(r.kind) && r.length == 0)
    return fail(Code::kInvalidArgument, i, "a zstd chunk cannot be empty");
  if (r.offset + r.length < r.offset)
    return fail(Code::kInvalidArgument, i, "byte range overflows");
  if (r.offset + r.length > file_size)
    return fail(Code::kTruncated, i,
                "stored range [" + std::to_string(r.offset) + ", " +
                    std::to_string(r.offset + r.length) + ") extends past the end of the file (" +
                    std::to_string(file_size) + " bytes)");
  return Status{};
}

// A reusable buffer that is never zero-filled: it is always overwritten before it is read.
class Scratch {
 public:
  uint8_t* get(uint64_t n) {
    if (n > capacity_) {
      data_.reset();  // free the old buffer before allocating the larger one
      data_.reset(new uint8_t[n]);
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<uint8_t[]> data_;
  uint64_t capacity_ = 0;
};

// Owned by one reader thread: its zstd context and scratch buffers are reused for every chunk.
class ChunkDecoder {
 public:
  // Stored bytes come from `fd`, or with `mem` set from that memory.
  ChunkDecoder(int fd, const uint8_t* mem, const std::string& path)
      : fd_(fd), mem_(mem), path_(path) {}
  ~ChunkDecoder() { ZSTD_freeDCtx(dctx_); }
  ChunkDecoder(const ChunkDecoder&) = delete;
  ChunkDecoder& operator=(const ChunkDecoder&) = delete;

  Status decode(uint64_t i, const ChunkRead& r);

 private:
  Status fetch(uint64_t i, const ChunkRead& r, uint8_t* into);
  Status inflate(uint64_t i, const ChunkRead& r, const uint8_t* frame, uint8_t* into);

  int fd_;
  const uint8_t* mem_;
  const std::string& path_;
  ZSTD_DCtx* dctx_ = nullptr;
  Scratch stored_;   // stored bytes that cannot go straight to the destination
  Scratch decoded_;  // decompressed planes awaiting unshuffle, or discarded (verify only)
};

// Reads the stored bytes into `into` and verifies their checksum.
Status ChunkDecoder::fetch(uint64_t i, const ChunkRead& r, uint8_t* into) {
  uint64_t got = r.length;  // validate() checked the range against the memory's size
  if (mem_)
    std::memcpy(into, mem_ + r.offset, r.length);
  else if (int err = pread_all(fd_, into, r.length, r.offset, &got))
    return errno_status(err, "pread", path_, static_cast<int64_t>(i));
  if (got < r.length)
    return fail(Code::kTruncated, i,
                path_ + " ends at byte " + std::to_string(r.offset + got) +
                    ", inside the stored range ending at " + std::to_string(r.offset + r.length));
  const uint32_t actual = crc32c(into, r.length);
  if (actual != r.crc)
    return fail(Code::kChecksum, i,
                "crc32c mismatch in " + path_ + " at offset " + std::to_string(r.offset) +
                    ": expected " + hex32(r.crc) + ", got " + hex32(actual));
  return Status{};
}

// Decompresses one verified zstd frame into exactly raw_length bytes at `into`.
Status ChunkDecoder::inflate(uint64_t i, const ChunkRead& r, const uint8_t* frame, uint8_t* into) {
  const unsigned long long declared = ZSTD_getFrameContentSize(frame, r.length);
  if (declared == ZSTD_CONTENTSIZE_ERROR || declared == ZSTD_CONTENTSIZE_UNKNOWN)
    return fail(Code::kDecode, i, "not a zstd frame with a declared content size");
  if (declared != r.raw_length)
    return fail(Code::kDecode, i,
                "zstd frame declares " + std::to_string(declared) + " bytes, expected " +
                    std::to_string(r.raw_length));
  if (!dctx_ && !(dctx_ = ZSTD_createDCtx()))
    return errno_status(ENOMEM, "creating a zstd context to read", path_, static_cast<int64_t>(i));
  const size_t n = ZSTD_decompressDCtx(dctx_, into, r.raw_length, frame, r.length);
  if (ZSTD_isError(n)) return fail(Code::kDecode, i, std::string("zstd: ") + ZSTD_getErrorName(n));
  if (n != r.raw_length)
    return fail(Code::kDecode, i,
                "decoded " + std::to_string(n) + " bytes, expected " + std::to_string(r.raw_length));
  return Status{};
}

Status ChunkDecoder::decode(uint64_t i, const ChunkRead& r) {
  switch (r.kind) {
    case Kind::kRaw:
      return fetch(i, r, r.dest ? r.dest : stored_.get(r.length));
    case Kind::kShuffle: {
      uint8_t* planes = stored_.get(r.length);
      Status s = fetch(i, r, planes);
      if (s.ok() && r.dest) unshuffle(planes, r.dest, r.raw_length, r.elemsize);
      return s;
    }
    case Kind::kZstd: {
      uint8_t* frame = stored_.get(r.length);
      Status s = fetch(i, r, frame);
      if (!s.ok()) return s;
      return inflate(i, r, frame, r.dest ? r.dest : decoded_.get(r.raw_length));
    }
    case Kind::kShuffleZstd: {
      uint8_t* frame = stored_.get(r.length);
      Status s = fetch(i, r, frame);
      if (!s.ok()) return s;
      uint8_t* planes = decoded_.get(r.raw_length);
      s = inflate(i, r, frame, planes);
      if (s.ok() && r.dest) unshuffle(planes, r.dest, r.raw_length, r.elemsize);
      return s;
    }
  }
  return fail(Code::kInvalidArgument, i, "unknown kind");
}

// The shared state of one read_chunks call.
class LoadJob {
 public:
  LoadJob(int fd, const uint8_t* mem, const std::string& path,
          const std::vector<ChunkRead>& reads)
      : fd_(fd), mem_(mem), path_(path), reads_(reads) {}

  void worker() {
    try {
      ChunkDecoder decoder(fd_, mem_, path_);
      while (!failed_.load(std::memory_order_relaxed)) {
        const uint64_t i = next_.fetch_add(1);
        if (i >= reads_.size()) return;
        Status s = decoder.decode(i, reads_[i]);
        if (!s.ok()) return record(std::move(s));
      }
    } catch (const std::bad_alloc&) {
      record(errno_status(ENOMEM, "allocating read buffers for", path_));
    }
  }

  void record(Status s) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!failed_.load()) error_ = std::move(s);
    failed_.store(true);
  }

  Status result() {
    std::lock_guard<std::mutex> lk(mu_);
    return error_;
  }

 private:
  const int fd_;
  const uint8_t* mem_;
  const std::string& path_;
  const std::vector<ChunkRead>& reads_;
  std::atomic<uint64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  Status error_;
};

// Runs `threads` workers (the caller is one of them) over already validated reads.
Status run_load(int fd, const uint8_t* mem, const std::string& path,
                const std::vector<ChunkRead>& reads, int threads) {
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t n_threads = std::min<size_t>(threads ? threads : hw, reads.size());
  LoadJob job(fd, mem, path, reads);
  std::vector<std::thread> pool;
  try {
    // The calling thread is one of the workers: a single-chunk read spawns nothing.
    for (size_t t = 1; t < n_threads; ++t) pool.emplace_back(&LoadJob::worker, &job);
  } catch (const std::system_error& e) {
    job.record(errno_status(e.code().value(), "starting threads to read", path));
  }
  if (n_threads > 0) job.worker();
  for (auto& t : pool) t.join();
  return job.result();
}

}  // namespace

Status read_chunks(const std::string& path, const std::vector<ChunkRead>& reads, int threads) {
  if (threads < 0) {
    Status s;
    s.code = Code::kInvalidArgument;
    s.message = "threads must be >= 0 (0 = one per core)";
    return s;
  }
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return errno_status(errno, "open", path);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return errno_status(errno, "fstat", path);
  uint64_t wanted = 0;
  for (size_t i = 0; i < reads.size(); ++i) {
    Status s = validate(i, reads[i], static_cast<uint64_t>(st.st_size));
    if (!s.ok()) return s;
    wanted += reads[i].length;
  }
#ifdef POSIX_FADV_SEQUENTIAL
  // Reading most of the file (a whole-state load): ask for aggressive readahead, so the disk
  // streams ahead of the workers' 4 MiB preads instead of waiting on each. Only advice.
  if (wanted * 2 > static_cast<uint64_t>(st.st_size))
    (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
#endif

  return run_load(fd.get(), nullptr, path, reads, threads);
}

Status decode_chunks(const uint8_t* data, uint64_t size, const std::string& name,
                     const std::vector<ChunkRead>& reads, int threads) {
  if (threads < 0) {
    Status s;
    s.code = Code::kInvalidArgument;
    s.message = "threads must be >= 0 (0 = one per core)";
    return s;
  }
  for (size_t i = 0; i < reads.size(); ++i) {
    Status s = validate(i, reads[i], size);
    if (!s.ok()) return s;
  }
  return run_load(-1, data, name, reads, threads);
}

}  // namespace shardckpt
