// ChunkEncoder: see encoder.h.

#include "encoder.h"

#include <zstd.h>

#include <chrono>

namespace shardckpt {

ChunkEncoder::~ChunkEncoder() { ZSTD_freeCCtx(cctx_); }

void ChunkEncoder::store_raw(uint64_t index, const ChunkSource& src, EncodedChunk* out) {
  out->index = index;
  out->data = src.data;
  out->length = src.nbytes;
  out->kind = Kind::kRaw;
  out->crc = crc32c(src.data, src.nbytes);
  out->buffer.reset();
}

PoolBuffer ChunkEncoder::lease(uint64_t size) {
  const auto t0 = std::chrono::steady_clock::now();
  PoolBuffer b = pool_->acquire(size);
  blocked_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return b;
}

bool ChunkEncoder::compress(uint64_t index, const ChunkSource& src, EncodedChunk* out) {
  const uint64_t n = src.nbytes;
  if (n == 0) {
    store_raw(index, src, out);
    return true;
  }
  const bool shuffled = src.elemsize > 1;
  const uint8_t* input = src.data;
  if (shuffled) {
    if (!scratch_) {
      scratch_ = lease(scratch_bytes_);
      if (!scratch_) return false;
    }
    shuffle(src.data, scratch_.data(), n, src.elemsize);
    input = scratch_.data();
  }
  if (!cctx_ && !(cctx_ = ZSTD_createCCtx())) return false;
  PoolBuffer frame = lease(n);
  if (!frame) return false;
  // Capacity n - 1: a frame that is not strictly smaller fails with dstSize_tooSmall instead of
  // being produced, so the output buffer never needs ZSTD_compressBound(n) > n bytes.
  const size_t r = ZSTD_compressCCtx(cctx_, frame.data(), n - 1, input, n, level_);
  if (ZSTD_isError(r)) {  // too small to shrink (or any other failure): raw is always valid
    store_raw(index, src, out);
    return true;
  }
  out->index = index;
  out->data = frame.data();
  out->length = r;
  out->kind = shuffled ? Kind::kShuffleZstd : Kind::kZstd;
  out->crc = crc32c(frame.data(), r);
  out->buffer = std::move(frame);
  return true;
}

std::string zstd_version() { return ZSTD_versionString(); }

}  // namespace shardckpt
