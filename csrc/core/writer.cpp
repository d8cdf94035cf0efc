// write_file: the save pipeline for one data file (FORMAT.md 2).
//
//   chunk index counter -> encode threads (crc32c | shuffle+zstd+crc32c) -> WriteQueue
//                       -> writer threads (reserve offset, pwrite, pace writeback) -> records
//
// Encode threads pull chunk indices from an atomic counter, so chunks are encoded roughly in
// order and finish in any order; writers place each chunk at the next free offset, so the file
// has no holes and the manifest (built by the caller from `records`) says where each chunk went.
// Memory is bounded by the BufferPool budget plus the queue's bounded length (raw chunks are
// queued as pointers into the caller's memory and cost nothing).
//
// Failure: the first error is recorded, then the pool and the queue are aborted, which wakes
// every thread blocked on either; all threads check the error flag before each chunk, so the
// call returns promptly. The partial file is left for the caller to delete with its temporary
// directory.

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>

#include "auto_policy.h"
#include "encoder.h"
#include "pipeline.h"
#include "pool.h"
#include "posix_io.h"
#include "write_queue.h"

namespace shardckpt {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Writeback in flight per writer before it waits for the disk (see WritebackPacer).
constexpr uint64_t kPacingWindow = 64ull << 20;
// `auto` takes the writers for the bottleneck (and may probe or compress) once their backlog
// is at least this many average chunks per writer (see AutoPolicy).
constexpr uint64_t kHighWaterChunksPerWriter = 2;

Status invalid(std::string message, int64_t chunk = -1) {
  Status s;
  s.code = Code::kInvalidArgument;
  s.message = std::move(message);
  s.chunk = chunk;
  return s;
}

// Thread counts and limits derived from the arguments, checked before any file is created.
struct Plan {
  int encoders = 1, writers = 1;
  uint64_t scratch_bytes = 0;  // per-encoder shuffle scratch (0: nothing is shuffled)
  uint64_t high_water = 0;     // `auto`: the backlog at which the writers are the bottleneck
  int max_compressing = 1;     // `auto`: chunks compressed at once (cores left to writers)
  uint64_t compress_limit = UINT64_MAX;  // larger chunks are never compressed (`auto` only)
  size_t queue_capacity = 4;
  uint64_t raw_bytes = 0;
};

Status make_plan(const std::vector<ChunkSource>& chunks, const WriteOptions& o, Plan* plan) {
  if (o.policy != Policy::kRaw && o.policy != Policy::kZstd && o.policy != Policy::kAuto)
    return invalid("unknown policy");
  if (o.encode_threads < 0 || o.write_threads < 0)
    return invalid("thread counts must be >= 0 (0 = default)");
  // `auto` may always store raw, so it simply never compresses a chunk whose scratch and output
  // would not both fit the pool; `zstd` was asked to compress everything and reports it instead.
  if (o.policy == Policy::kAuto) {
    const uint64_t half = o.pool_bytes / 2;
    plan->compress_limit = half - half % BufferPool::kAlignment;
  }
  uint64_t max_chunk = 0, max_shuffled = 0;  // of the chunks that may be compressed
  for (size_t i = 0; i < chunks.size(); ++i) {
    const ChunkSource& c = chunks[i];
    const auto idx = static_cast<int64_t>(i);
    if (c.elemsize == 0) return invalid("chunk elemsize must be >= 1", idx);
    if (c.nbytes % c.elemsize) return invalid("chunk nbytes is not a multiple of elemsize", idx);
    if (!c.data && c.nbytes) return invalid("chunk data is null", idx);
    plan->raw_bytes += c.nbytes;
    if (c.nbytes > plan->compress_limit) continue;
    max_chunk = std::max(max_chunk, c.nbytes);
    if (c.elemsize > 1) max_shuffled = std::max(max_shuffled, c.nbytes);
  }
  const size_t n = std::max<size_t>(chunks.size(), 1);
  const int hw = std::max(1u, std::thread::hardware_concurrency());
  plan->encoders = static_cast<int>(std::min<size_t>(o.encode_threads ? o.encode_threads : hw, n));
  plan->writers = static_cast<int>(std::min<size_t>(o.write_threads ? o.write_threads : 1, n));

  if (o.policy != Policy::kRaw && max_chunk > 0) {
    // Each encoder keeps one scratch; one more output buffer must always fit, or every encoder
    // could hold its scratch and wait for an output buffer that never comes.
    const uint64_t out = BufferPool::charge(max_chunk);
    plan->scratch_bytes = max_shuffled ? BufferPool::charge(max_shuffled) : 0;
    if (o.pool_bytes < out + plan->scratch_bytes)
      return invalid("pool_bytes " + std::to_string(o.pool_bytes) + " is too small: compressing a " +
                     std::to_string(max_chunk) + "-byte chunk needs " +
                     std::to_string(out + plan->scratch_bytes) + " bytes of staging");
    if (plan->scratch_bytes) {
      const uint64_t fit = (o.pool_bytes - out) / plan->scratch_bytes;
      plan->encoders = static_cast<int>(std::min<uint64_t>(plan->encoders, fit));
    }
  }
  plan->max_compressing = std::max(1, std::min(plan->encoders, hw - plan->writers));
  const uint64_t avg_chunk = std::max<uint64_t>(plan->raw_bytes / n, 1);
  plan->high_water = kHighWaterChunksPerWriter * plan->writers * avg_chunk;
  // Queued raw chunks are only pointers and compressed ones are bounded by the pool, so the
  // queue is sized for `auto`: the longer the backlog it can hold, the slower the compression
  // (relative to the disk) that can still be overlapped with writing.
  plan->queue_capacity = 8 * plan->writers + 2 * plan->encoders;
  return Status{};
}

// The shared state of one write_file call and its thread bodies.
class SaveJob {
 public:
  // Writes go to `fd`, or with `mem` set into that memory (sized by the caller) instead.
  SaveJob(const std::string& path, int fd, uint8_t* mem, const std::vector<ChunkSource>& chunks,
          const WriteOptions& options, const Plan& plan, uint64_t first_offset,
          std::vector<ChunkRecord>* records)
      : path_(path), fd_(fd), mem_(mem), chunks_(chunks), options_(options), plan_(plan),
        records_(records), pool_(options.pool_bytes), queue_(plan.queue_capacity),
        auto_(plan.writers, plan.high_water, plan.max_compressing), cursor_(first_offset) {}

  // Runs the encoders and writers to completion; returns the first error, if any.
  Status run(WriteStats* stats);

 private:
  void encode_loop();
  void write_loop();
  void encode_chunks(ChunkEncoder* encoder, double* busy);
  void write_chunks(double* busy);
  AutoChoice choose(uint64_t index);
  void probe(ChunkEncoder* encoder, uint64_t index);
  bool hash_or_reuse(uint64_t index);
  void fail(Status s);
  void fail_from_exception(const char* where, const std::exception& e);

  const std::string& path_;
  const int fd_;
  uint8_t* const mem_;
  const std::vector<ChunkSource>& chunks_;
  const WriteOptions& options_;
  const Plan plan_;
  std::vector<ChunkRecord>* records_;

  BufferPool pool_;   // declared before queue_: queued chunks return their buffers first
  WriteQueue queue_;
  AutoPolicy auto_;
  std::atomic<uint64_t> next_chunk_{0};
  std::atomic<uint64_t> cursor_;  // next free file offset

  std::atomic<bool> failed_{false};
  std::mutex mu_;  // guards error_ and the totals below
  Status error_;
  double encode_seconds_ = 0, write_seconds_ = 0;
  uint64_t stored_bytes_ = 0, chunks_raw_ = 0, chunks_compressed_ = 0;
  uint64_t chunks_reused_ = 0, reused_bytes_ = 0;
};

void SaveJob::fail(Status s) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (failed_.load()) return;
    error_ = std::move(s);
    failed_.store(true);
  }
  pool_.abort();
  queue_.abort();
}

void SaveJob::fail_from_exception(const char* where, const std::exception& e) {
  // In practice only allocation failures escape the loops (std containers, thread statics).
  const bool oom = dynamic_cast<const std::bad_alloc*>(&e) != nullptr;
  Status s = errno_status(oom ? ENOMEM : EIO, where, path_);
  s.message += std::string(" (") + e.what() + ")";
  fail(std::move(s));
}

AutoChoice SaveJob::choose(uint64_t index) {
  switch (options_.policy) {
    case Policy::kRaw: return AutoChoice::kRaw;
    case Policy::kZstd: return AutoChoice::kCompress;
    case Policy::kAuto:
      if (chunks_[index].nbytes > plan_.compress_limit) return AutoChoice::kRaw;
      return auto_.choose(chunks_[index].nbytes, queue_.backlog_bytes());
  }
  return AutoChoice::kRaw;
}

// Samples chunk `i` for `auto` (AutoChoice::kProbe). A probe that cannot get a buffer is simply
// dropped: the pool fails only when the save is already failing.
void SaveJob::probe(ChunkEncoder* encoder, uint64_t i) {
  const ChunkSource& src = chunks_[i];
  const uint64_t sample = AutoPolicy::probe_bytes(src.nbytes, src.elemsize);
  if (sample == 0) return;
  const auto t0 = Clock::now();
  const double blocked0 = encoder->blocked_seconds();
  uint64_t stored = 0;
  if (!encoder->probe(src, sample, &stored)) return;
  auto_.probed(sample, stored, seconds_since(t0) - (encoder->blocked_seconds() - blocked0));
}

void SaveJob::encode_chunks(ChunkEncoder* encoder, double* busy) {
  while (!failed_.load(std::memory_order_relaxed)) {
    const uint64_t i = next_chunk_.fetch_add(1);
    if (i >= chunks_.size()) return;
    const ChunkSource& src = chunks_[i];
    EncodedChunk chunk;
    const auto t0 = Clock::now();
    if (options_.hash && hash_or_reuse(i)) {
      *busy += seconds_since(t0);
      continue;
    }
    const double blocked0 = encoder->blocked_seconds();
    const AutoChoice choice = choose(i);
    const bool compress = choice == AutoChoice::kCompress;
    if (choice == AutoChoice::kProbe) probe(encoder, i);
    if (!compress) {
      ChunkEncoder::store_raw(i, src, &chunk);
    } else if (!encoder->compress(i, src, &chunk)) {
      if (options_.policy == Policy::kAuto) auto_.cancel();
      if (!failed_.load())
        fail(errno_status(ENOMEM, "allocating staging memory for", path_, static_cast<int64_t>(i)));
      return;
    }
    // Time blocked on the pool is back-pressure, not encoding.
    const double seconds = seconds_since(t0) - (encoder->blocked_seconds() - blocked0);
    *busy += seconds;
    if (compress && options_.policy == Policy::kAuto)
      auto_.compressed(src.nbytes, chunk.length, seconds);
    if (!queue_.push(std::move(chunk))) return;  // aborted
  }
}

// Hashes chunk `i` into its record; true when the hash is known (the chunk is reused, not
// written). Each record belongs to one encoder until the writer fills in where it went.
bool SaveJob::hash_or_reuse(uint64_t i) {
  ChunkRecord& rec = (*records_)[i];
  rec.hash = content_hash(chunks_[i].data, chunks_[i].nbytes);
  if (!options_.known || !known_hash(*options_.known, rec.hash)) return false;
  rec.reused = true;
  std::lock_guard<std::mutex> lk(mu_);
  ++chunks_reused_;
  reused_bytes_ += chunks_[i].nbytes;
  return true;
}

void SaveJob::encode_loop() {
  double busy = 0;
  try {
    ChunkEncoder encoder(&pool_, options_.level, plan_.scratch_bytes);
    encode_chunks(&encoder, &busy);
  } catch (const std::exception& e) {
    fail_from_exception("encoding chunks for", e);
  }
  std::lock_guard<std::mutex> lk(mu_);
  encode_seconds_ += busy;
}

void SaveJob::write_chunks(double* busy) {
  WritebackPacer pacer(fd_, kPacingWindow);
  EncodedChunk chunk;
  uint64_t stored = 0, raw = 0, compressed = 0;
  while (queue_.pop(&chunk) && !failed_.load(std::memory_order_relaxed)) {
    const auto t0 = Clock::now();
    const uint64_t off = cursor_.fetch_add(chunk.length);
    const char* op = "pwrite";
    int err = 0;
    if (mem_) {
      std::memcpy(mem_ + off, chunk.data, chunk.length);
    } else {
      err = pwrite_all(fd_, chunk.data, chunk.length, off);
      if (!err) {
        op = "sync_file_range";
        err = pacer.wrote(off, chunk.length);
      }
    }
    const double seconds = seconds_since(t0);
    *busy += seconds;
    if (err) {
      fail(errno_status(err, op, path_, static_cast<int64_t>(chunk.index)));
      break;
    }
    ChunkRecord& rec = (*records_)[chunk.index];  // its hash is already set (hash_or_reuse)
    rec.offset = off;
    rec.length = chunk.length;
    rec.kind = chunk.kind;
    rec.crc = chunk.crc;
    stored += chunk.length;
    ++(chunk.kind == Kind::kRaw ? raw : compressed);
    if (options_.policy == Policy::kAuto) auto_.wrote(chunk.length, seconds);
    queue_.written(chunk.length);
    chunk.buffer.reset();  // hand the buffer back before possibly waiting in pop()
  }
  std::lock_guard<std::mutex> lk(mu_);
  stored_bytes_ += stored;
  chunks_raw_ += raw;
  chunks_compressed_ += compressed;
}

void SaveJob::write_loop() {
  double busy = 0;
  try {
    write_chunks(&busy);
  } catch (const std::exception& e) {
    fail_from_exception("writing chunks to", e);
  }
  std::lock_guard<std::mutex> lk(mu_);
  write_seconds_ += busy;
}

Status SaveJob::run(WriteStats* stats) {
  std::vector<std::thread> encoders, writers;
  try {
    for (int i = 0; i < plan_.writers; ++i) writers.emplace_back(&SaveJob::write_loop, this);
    for (int i = 0; i < plan_.encoders; ++i) encoders.emplace_back(&SaveJob::encode_loop, this);
  } catch (const std::system_error& e) {
    fail(errno_status(e.code().value(), "starting threads for", path_));
  }
  for (auto& t : encoders) t.join();
  queue_.close();  // every chunk is queued (or the job failed): writers drain and exit
  for (auto& t : writers) t.join();

  std::lock_guard<std::mutex> lk(mu_);
  stats->encode_seconds = encode_seconds_;
  stats->write_seconds = write_seconds_;
  stats->stored_bytes = stored_bytes_;
  stats->chunks_raw = chunks_raw_;
  stats->chunks_compressed = chunks_compressed_;
  stats->chunks_reused = chunks_reused_;
  stats->reused_bytes = reused_bytes_;
  stats->file_size = cursor_.load();
  stats->pool_peak_bytes = pool_.peak_bytes();
  return error_;
}

// Creates the file and writes its header; the file cursor for chunks starts after the header.
Status create_with_header(const std::string& path, const std::string& header, UniqueFd* fd) {
  const int raw_fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
  if (raw_fd < 0) return errno_status(errno, "create", path);
  fd->reset(raw_fd);
  const auto* bytes = reinterpret_cast<const uint8_t*>(header.data());
  if (int err = pwrite_all(fd->get(), bytes, header.size(), 0))
    return errno_status(err, "write header to", path);
  return Status{};
}

}  // namespace

Status write_file(const std::string& path, const std::vector<ChunkSource>& chunks,
                  const WriteOptions& options, std::vector<ChunkRecord>* records,
                  WriteStats* stats) {
  const auto t0 = Clock::now();
  WriteStats local_stats;
  std::vector<ChunkRecord> local_records;
  if (!stats) stats = &local_stats;
  if (!records) records = &local_records;
  *stats = WriteStats{};
  records->assign(chunks.size(), ChunkRecord{});

  Plan plan;
  Status s = make_plan(chunks, options, &plan);
  if (!s.ok()) return s;
  stats->raw_bytes = plan.raw_bytes;

  UniqueFd fd;
  s = create_with_header(path, options.header, &fd);
  if (!s.ok()) return s;

  {
    SaveJob job(path, fd.get(), nullptr, chunks, options, plan, options.header.size(), records);
    s = job.run(stats);
  }
  if (!s.ok()) return s;  // fd closes on return; the partial file stays for the caller

  if (options.durable) {
    const auto t_sync = Clock::now();
    if (::fsync(fd.get()) != 0) return errno_status(errno, "fsync", path);
    stats->write_seconds += seconds_since(t_sync);
  }
  if (int err = fd.close()) return errno_status(err, "close", path);
  stats->wall_seconds = seconds_since(t0);
  return Status{};
}

Status encode_to_memory(const std::vector<ChunkSource>& chunks, const WriteOptions& options,
                        uint8_t* out, uint64_t capacity, std::vector<ChunkRecord>* records,
                        WriteStats* stats) {
  const auto t0 = Clock::now();
  *stats = WriteStats{};
  records->assign(chunks.size(), ChunkRecord{});
  Plan plan;
  Status s = make_plan(chunks, options, &plan);
  if (!s.ok()) return s;
  stats->raw_bytes = plan.raw_bytes;
  // A chunk is never stored larger than it is raw (FORMAT.md 2.1), so this bound always holds.
  if (capacity < options.header.size() + plan.raw_bytes)
    return invalid("output buffer smaller than the header plus the raw chunks");
  std::memcpy(out, options.header.data(), options.header.size());
  {
    SaveJob job("<memory>", -1, out, chunks, options, plan, options.header.size(), records);
    s = job.run(stats);
  }
  stats->wall_seconds = seconds_since(t0);
  return s;
}

}  // namespace shardckpt
