// Per-thread chunk encoding for the save pipeline: crc32c only (raw, zero copy) or
// byte-shuffle + zstd into a pool buffer, falling back to raw when that does not shrink the chunk.
#pragma once

#include <cstdint>

#include "pipeline.h"
#include "pool.h"
#include "write_queue.h"

struct ZSTD_CCtx_s;

namespace shardckpt {

// Owned by one encode thread: its zstd context and its shuffle scratch are reused for every
// chunk it encodes, so steady-state encoding allocates nothing.
class ChunkEncoder {
 public:
  // scratch_bytes: the shuffle scratch to lease from `pool` on first use (largest shuffled chunk).
  ChunkEncoder(BufferPool* pool, int level, uint64_t scratch_bytes)
      : pool_(pool), level_(level), scratch_bytes_(scratch_bytes) {}
  ~ChunkEncoder();
  ChunkEncoder(const ChunkEncoder&) = delete;
  ChunkEncoder& operator=(const ChunkEncoder&) = delete;

  // Stores the chunk as is: the checksum is the only work, and `out` points at the source.
  static void store_raw(uint64_t index, const ChunkSource& src, EncodedChunk* out);

  // Shuffles (elemsize > 1) and compresses the chunk into a leased pool buffer; stores it raw
  // instead when the frame would not be smaller (FORMAT.md 2.1 requires that). May block on the
  // pool. Returns false when no buffer or zstd context could be had: the pool was aborted or the
  // system is out of memory.
  bool compress(uint64_t index, const ChunkSource& src, EncodedChunk* out);

  // Shuffles (elemsize > 1) and compresses `sample` bytes from the middle of the chunk, then
  // discards the output: how `auto` measures the compress rate and ratio without compressing a
  // whole chunk (AutoPolicy). `sample` is a multiple of elemsize, at most half the chunk. Sets
  // *stored to the frame's size (`sample` if it did not shrink). Returns false like compress().
  bool probe(const ChunkSource& src, uint64_t sample, uint64_t* stored);

  // Time spent blocked in the pool (back-pressure), so callers can measure pure encode time.
  double blocked_seconds() const { return blocked_seconds_; }

 private:
  PoolBuffer lease(uint64_t size);  // pool_->acquire, timed
  // zstd of `n` bytes at `input` into `out` (capacity n - 1); 0 when the frame would not shrink.
  size_t compress_into(const uint8_t* input, uint64_t n, uint8_t* out);

  BufferPool* pool_;
  int level_;
  uint64_t scratch_bytes_;
  PoolBuffer scratch_;           // shuffle output, leased once and kept
  ZSTD_CCtx_s* cctx_ = nullptr;  // created on first use
  double blocked_seconds_ = 0;
};

}  // namespace shardckpt
