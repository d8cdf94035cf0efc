// Content hashes of chunks for incremental saves: xxh3-128 from the system libxxhash.
//
// The hash decides whether a chunk's bytes are already stored by an earlier checkpoint, so it
// must not collide by accident: 128 bits puts the chance of any collision among 2^40 chunks near
// 2^-48. xxh3 runs at memory speed, so hashing in the encode workers costs the save no time that
// the crc32c pass does not already cost.

#include <xxhash.h>

#include <algorithm>

#include "pipeline.h"

namespace shardckpt {

Hash128 content_hash(const uint8_t* data, size_t n) {
  const XXH128_hash_t h = XXH3_128bits(data, n);
  return Hash128{h.low64, h.high64};
}

bool known_hash(const std::vector<Hash128>& sorted_known, const Hash128& h) {
  return std::binary_search(sorted_known.begin(), sorted_known.end(), h);
}

std::string xxhash_version() {
  const unsigned v = XXH_versionNumber();
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
         std::to_string(v % 100);
}

}  // namespace shardckpt
