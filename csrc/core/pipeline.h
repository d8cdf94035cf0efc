// The native staging pipeline of shardckpt: plain C++17, no Python headers.
//
// Save: chunks (pointers to stable host memory) flow through a bounded buffer pool into encode
// workers (byte-shuffle -> zstd -> crc32c) and then to writer threads that pwrite each encoded
// chunk at the next free offset of one data file. Load: parallel ranged reads of only the
// requested chunks -> crc32c check -> zstd decompress -> unshuffle into the caller's memory.
// The byte format is FORMAT.md section 2.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace shardckpt {

// One status type for every failure the core reports; the bindings translate it.
enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,
  kIoError = 2,       // errno set
  kNoSpace = 3,       // ENOSPC / EDQUOT while writing
  kChecksum = 4,      // stored bytes do not match their crc32c
  kDecode = 5,        // zstd frame invalid, or wrong decoded length
  kTruncated = 6,     // a read ended before the requested range
};

struct Status {
  Code code = Code::kOk;
  std::string message;
  int64_t chunk = -1;  // index of the chunk at fault, -1 if none
  int err = 0;         // errno, where one applies
  bool ok() const { return code == Code::kOk; }
};

// How a chunk's stored bytes were produced (FORMAT.md 2.1 codec chains).
enum class Kind : uint8_t { kRaw = 0, kShuffle = 1, kZstd = 2, kShuffleZstd = 3 };

enum class Policy : uint8_t {
  kRaw = 0,   // never compress (checksum only)
  kZstd = 1,  // shuffle (elemsize > 1) + zstd at `level` for every chunk
  kAuto = 2,  // per chunk: compress only while the writers are the bottleneck
};

struct ChunkSource {
  const uint8_t* data;  // stays valid and unchanged until write_file returns
  uint64_t nbytes;      // a multiple of elemsize
  uint32_t elemsize;    // shuffle element size; 1 disables shuffling
};

// A chunk's content hash (xxh3-128 of its raw bytes): what incremental saves compare to decide
// whether a chunk is already stored (FORMAT.md 3.6). Not an integrity check; crc32c stays that.
struct Hash128 {
  uint64_t lo = 0, hi = 0;
  bool operator<(const Hash128& o) const { return hi != o.hi ? hi < o.hi : lo < o.lo; }
  bool operator==(const Hash128& o) const { return hi == o.hi && lo == o.lo; }
};

Hash128 content_hash(const uint8_t* data, size_t n);
// Whether `h` is in `sorted_known` (ascending by operator<).
bool known_hash(const std::vector<Hash128>& sorted_known, const Hash128& h);

struct ChunkRecord {
  uint64_t offset = 0;  // where the stored bytes start in the file
  uint64_t length = 0;  // stored length; 0 for a reused chunk (nothing written)
  Kind kind = Kind::kRaw;
  uint32_t crc = 0;     // crc32c of the stored bytes
  Hash128 hash;         // content hash, when WriteOptions::hash
  bool reused = false;  // hash found in WriteOptions::known: not written
};

struct WriteOptions {
  Policy policy = Policy::kAuto;
  int level = 1;                       // zstd level, negative = fast levels
  int encode_threads = 0;              // 0 = one per core
  int write_threads = 1;
  uint64_t pool_bytes = 256ull << 20;  // hard budget for staging buffers
  bool durable = true;                 // fsync the file before returning
  std::string header;                  // bytes written at offset 0 (FORMAT.md 2)
  bool hash = false;                   // compute each chunk's content hash (incremental saves)
  // With `hash`: chunks whose hash is in this sorted list are not written (ChunkRecord::reused).
  const std::vector<Hash128>* known = nullptr;
};

struct WriteStats {
  uint64_t raw_bytes = 0, stored_bytes = 0, file_size = 0;
  uint64_t chunks_raw = 0, chunks_compressed = 0;
  uint64_t chunks_reused = 0, reused_bytes = 0;  // raw bytes of the chunks not written
  double encode_seconds = 0, write_seconds = 0, wall_seconds = 0;
  uint64_t pool_peak_bytes = 0;
};

// Creates `path` (must not exist), writes header + all chunks, fsyncs when durable.
// records->size() == chunks.size() on success. Never grows staging memory past pool_bytes.
Status write_file(const std::string& path, const std::vector<ChunkSource>& chunks,
                  const WriteOptions& options, std::vector<ChunkRecord>* records,
                  WriteStats* stats);

// The same encoding as write_file, into memory instead of a file (for object stores): `out`
// receives the header and then every chunk exactly as write_file lays them out, and
// stats->file_size is the number of bytes used. `capacity` must be at least the header plus the
// chunks' raw bytes (a chunk is never stored larger than raw). No file, no fsync.
Status encode_to_memory(const std::vector<ChunkSource>& chunks, const WriteOptions& options,
                        uint8_t* out, uint64_t capacity, std::vector<ChunkRecord>* records,
                        WriteStats* stats);

struct ChunkRead {
  uint64_t offset, length;  // stored byte range in the file
  uint64_t raw_length;      // decoded length
  Kind kind;
  uint32_t elemsize;        // for the shuffle kinds
  uint32_t crc;
  uint8_t* dest;            // raw_length bytes; nullptr = verify only (decode, then discard)
};

// Reads, verifies and decodes `reads` from one file using `threads` threads (0 = per core).
Status read_chunks(const std::string& path, const std::vector<ChunkRead>& reads, int threads);

// The same as read_chunks over `size` bytes already in memory (a ranged GET of an object): each
// read's offset is relative to `data`. `name` labels the bytes in error messages.
Status decode_chunks(const uint8_t* data, uint64_t size, const std::string& name,
                     const std::vector<ChunkRead>& reads, int threads);

// Building blocks, exposed for tests and the Python layer.
uint32_t crc32c(const uint8_t* data, size_t n, uint32_t crc = 0);  // crc = previous result
void shuffle(const uint8_t* src, uint8_t* dst, size_t n, size_t elemsize);
void unshuffle(const uint8_t* src, uint8_t* dst, size_t n, size_t elemsize);
const char* crc32c_backend();    // "sse4.2" or "software"
std::string zstd_version();
std::string xxhash_version();
bool sync_file_range_supported();  // whether writes pace writeback with sync_file_range (Linux)

}  // namespace shardckpt
