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
  const size_t r = compress_into(input, n, frame.data());
  if (r == 0) {  // too small to shrink (or any other failure): raw is always valid
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

size_t ChunkEncoder::compress_into(const uint8_t* input, uint64_t n, uint8_t* out) {
  // Capacity n - 1: a frame that is not strictly smaller fails with dstSize_tooSmall instead of
  // being produced, so the output buffer never needs ZSTD_compressBound(n) > n bytes.
  const size_t r = ZSTD_compressCCtx(cctx_, out, n - 1, input, n, level_);
  return ZSTD_isError(r) ? 0 : r;
}

bool ChunkEncoder::probe(const ChunkSource& src, uint64_t sample, uint64_t* stored) {
  *stored = sample;
  if (sample == 0) return true;
  if (!cctx_ && !(cctx_ = ZSTD_createCCtx())) return false;
  // One lease holds the shuffled sample and the frame; 2 * sample <= the chunk, so it fits
  // wherever a frame for the chunk would (make_plan's budget rule).
  PoolBuffer buf = lease(2 * sample);
  if (!buf) return false;
  const uint64_t k = src.elemsize;
  const uint8_t* input = src.data + ((src.nbytes - sample) / 2) / k * k;
  if (k > 1) {
    shuffle(input, buf.data(), sample, k);
    input = buf.data();
  }
  const size_t r = compress_into(input, sample, buf.data() + sample);
  if (r) *stored = r;
  return true;
}

std::string zstd_version() { return ZSTD_versionString(); }

}  // namespace shardckpt
