// shardckpt._native: thin nanobind glue over the native core (csrc/core/pipeline.h).
//
// Arguments are converted while holding the GIL; all real work runs with the GIL released, so
// Python threads (training, async saves) keep running. Failures of the work itself come back as
// status tuples (code, message, chunk, errno) that shardckpt maps to its typed errors; only
// malformed arguments raise (ValueError / TypeError).

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <variant>
#include <vector>

#include "pipeline.h"
#include "write_watch.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace core = shardckpt;

// A read-only view of any C-contiguous buffer (bytes, bytearray, memoryview, numpy arrays).
// Holding the export keeps the memory alive and unresizable while the GIL is released.
class ByteView {
 public:
  explicit ByteView(nb::handle obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw nb::python_error();
  }
  ~ByteView() { PyBuffer_Release(&view_); }
  ByteView(const ByteView&) = delete;
  ByteView& operator=(const ByteView&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_;
};

nb::tuple status_tuple(const core::Status& s) {
  return nb::make_tuple(static_cast<int>(s.code), s.message, s.chunk, s.err);
}

core::Policy parse_policy(const std::string& name) {
  if (name == "raw") return core::Policy::kRaw;
  if (name == "zstd") return core::Policy::kZstd;
  if (name == "auto") return core::Policy::kAuto;
  throw nb::value_error(("unknown policy '" + name + "' (expected raw, zstd or auto)").c_str());
}

// Allocates an uninitialised bytes object of n bytes for the caller to fill.
nb::bytes new_bytes(size_t n, uint8_t** data) {
  PyObject* obj = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
  if (!obj) throw nb::python_error();
  *data = reinterpret_cast<uint8_t*>(PyBytes_AsString(obj));
  return nb::steal<nb::bytes>(obj);
}

nb::dict features() {
  nb::dict d;
  d["version"] = SHARDCKPT_VERSION;
  d["zstd"] = core::zstd_version();
  d["xxhash"] = core::xxhash_version();
  d["content_hash"] = "xxh3-128";
  d["crc32c"] = core::crc32c_backend();
  d["threads"] = std::thread::hardware_concurrency();
  d["sync_file_range"] = core::sync_file_range_supported();
  d["write_watch"] = core::write_watch_supported();
  nb::list policies;
  for (const char* p : {"raw", "zstd", "auto"}) policies.append(p);
  d["policies"] = policies;
  return d;
}

uint32_t crc32c(nb::handle data, uint32_t value) {
  ByteView view(data);
  nb::gil_scoped_release nogil;
  return core::crc32c(view.data(), view.size(), value);
}

// Shared body of shuffle()/unshuffle(): validates, then runs `fn` without the GIL.
template <typename Fn>
nb::bytes transform(nb::handle data, size_t elemsize, Fn fn) {
  ByteView view(data);
  if (elemsize < 1) throw nb::value_error("elemsize must be >= 1");
  if (view.size() % elemsize != 0)
    throw nb::value_error("data length is not a multiple of elemsize");
  uint8_t* out = nullptr;
  nb::bytes result = new_bytes(view.size(), &out);
  {
    nb::gil_scoped_release nogil;  // `result` is not visible to any other thread yet
    fn(view.data(), out, view.size(), elemsize);
  }
  return result;
}

using ChunkTuple = std::tuple<uintptr_t, uint64_t, uint32_t>;  // (ptr, nbytes, elemsize)

nb::dict stats_dict(const core::WriteStats& st) {
  nb::dict stats;
  stats["raw_bytes"] = st.raw_bytes;
  stats["stored_bytes"] = st.stored_bytes;
  stats["file_size"] = st.file_size;
  stats["chunks_raw"] = st.chunks_raw;
  stats["chunks_compressed"] = st.chunks_compressed;
  stats["chunks_reused"] = st.chunks_reused;
  stats["reused_bytes"] = st.reused_bytes;
  stats["encode_seconds"] = st.encode_seconds;
  stats["write_seconds"] = st.write_seconds;
  stats["wall_seconds"] = st.wall_seconds;
  stats["pool_peak_bytes"] = st.pool_peak_bytes;
  return stats;
}

std::vector<core::ChunkSource> chunk_sources(const std::vector<ChunkTuple>& chunk_tuples) {
  std::vector<core::ChunkSource> chunks;
  chunks.reserve(chunk_tuples.size());
  for (const auto& [ptr, nbytes, elemsize] : chunk_tuples) {
    if (elemsize < 1) throw nb::value_error("chunk elemsize must be >= 1");
    chunks.push_back({reinterpret_cast<const uint8_t*>(ptr), nbytes, elemsize});
  }
  return chunks;
}

// (offset, length, kind, crc32c), plus the 16-byte content hash (lo, hi little-endian) when
// hashing; a reused chunk has length 0.
nb::list record_list(const core::Status& status, const std::vector<core::ChunkRecord>& records,
                     bool hashed) {
  nb::list recs;
  if (!status.ok()) return recs;
  for (const auto& r : records) {
    if (!hashed) {
      recs.append(nb::make_tuple(r.offset, r.length, static_cast<int>(r.kind), r.crc));
      continue;
    }
    const uint64_t words[2] = {r.hash.lo, r.hash.hi};  // little-endian hosts (x86-64, arm64)
    recs.append(nb::make_tuple(r.offset, r.reused ? 0 : r.length, static_cast<int>(r.kind),
                               r.crc, nb::bytes(reinterpret_cast<const char*>(words), 16)));
  }
  return recs;
}

// The sorted known hashes from `known` (16-byte records as record_list writes them).
std::vector<core::Hash128> known_hashes(nb::bytes known) {
  if (known.size() % 16) throw nb::value_error("known hashes must be 16-byte records");
  std::vector<core::Hash128> out(known.size() / 16);
  std::memcpy(out.data(), known.c_str(), known.size());
  std::sort(out.begin(), out.end());
  return out;
}

nb::tuple write_file(const std::string& path, const std::vector<ChunkTuple>& chunk_tuples,
                     const std::string& policy, int level, int encode_threads, int write_threads,
                     uint64_t pool_bytes, bool durable, nb::bytes header, bool hash,
                     nb::bytes known) {
  core::WriteOptions opt;
  const std::vector<core::Hash128> known_list = known_hashes(known);
  opt.hash = hash;
  opt.known = &known_list;
  opt.policy = parse_policy(policy);
  opt.level = level;
  if (encode_threads < 0 || write_threads < 0)
    throw nb::value_error("thread counts must be >= 0 (0 = default)");
  opt.encode_threads = encode_threads;
  opt.write_threads = write_threads;
  opt.pool_bytes = pool_bytes;
  opt.durable = durable;
  opt.header.assign(header.c_str(), header.size());

  std::vector<core::ChunkSource> chunks = chunk_sources(chunk_tuples);

  std::vector<core::ChunkRecord> records;
  core::WriteStats st;
  core::Status status;
  {
    nb::gil_scoped_release nogil;
    status = core::write_file(path, chunks, opt, &records, &st);
  }

  return nb::make_tuple(status_tuple(status), record_list(status, records, hash),
                        stats_dict(st));
}

// Like write_file, into a new bytearray (for uploads to object stores): returns (status,
// bytearray holding header + chunks, records, stats). The bytearray is sized to the worst case
// (header + raw bytes) while the GIL is released, then shrunk to what was used.
nb::tuple encode_chunks(const std::vector<ChunkTuple>& chunk_tuples, const std::string& policy,
                        int level, int encode_threads, uint64_t pool_bytes, nb::bytes header,
                        bool hash, nb::bytes known) {
  core::WriteOptions opt;
  const std::vector<core::Hash128> known_list = known_hashes(known);
  opt.hash = hash;
  opt.known = &known_list;
  opt.policy = parse_policy(policy);
  opt.level = level;
  if (encode_threads < 0) throw nb::value_error("encode_threads must be >= 0 (0 = default)");
  opt.encode_threads = encode_threads;
  opt.write_threads = 1;
  opt.pool_bytes = pool_bytes;
  opt.durable = false;
  opt.header.assign(header.c_str(), header.size());
  std::vector<core::ChunkSource> chunks = chunk_sources(chunk_tuples);
  uint64_t capacity = opt.header.size();
  for (const auto& c : chunks) capacity += c.nbytes;
  PyObject* obj = PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(capacity));
  if (!obj) throw nb::python_error();
  nb::object out = nb::steal(obj);
  auto* data = reinterpret_cast<uint8_t*>(PyByteArray_AsString(obj));
  std::vector<core::ChunkRecord> records;
  core::WriteStats st;
  core::Status status;
  {
    nb::gil_scoped_release nogil;  // `out` is not visible to any other thread yet
    status = core::encode_to_memory(chunks, opt, data, capacity, &records, &st);
  }
  if (status.ok() && PyByteArray_Resize(obj, static_cast<Py_ssize_t>(st.file_size)) != 0)
    throw nb::python_error();
  return nb::make_tuple(status_tuple(status), out, record_list(status, records, hash),
                        stats_dict(st));
}

// (offset, length, raw_length, kind, elemsize, crc, dest_ptr[, dest_bytes])
using ReadTuple =
    std::tuple<uint64_t, uint64_t, uint64_t, int, uint32_t, uint32_t, uintptr_t>;
// With dest_bytes: how many bytes the caller's destination holds at dest_ptr. A chunk decodes
// to exactly raw_length bytes, so any other size means the caller planned the read wrongly
// (a destination of another dtype, say) and the decode would write past its buffer.
using SizedReadTuple =
    std::tuple<uint64_t, uint64_t, uint64_t, int, uint32_t, uint32_t, uintptr_t, uint64_t>;
using AnyReadTuple = std::variant<SizedReadTuple, ReadTuple>;

core::Status chunk_reads(const std::vector<AnyReadTuple>& read_tuples,
                         std::vector<core::ChunkRead>* reads) {
  reads->reserve(read_tuples.size());
  for (size_t i = 0; i < read_tuples.size(); ++i) {
    // A read without dest_bytes (older callers) is taken to fit: nothing to check it against.
    const SizedReadTuple t = std::visit(
        [](const auto& r) -> SizedReadTuple {
          if constexpr (std::tuple_size_v<std::decay_t<decltype(r)>> == 8) {
            return r;
          } else {
            return std::tuple_cat(r, std::make_tuple(static_cast<uint64_t>(std::get<2>(r))));
          }
        },
        read_tuples[i]);
    const auto& [offset, length, raw_length, kind, elemsize, crc, dest, dest_bytes] = t;
    if (kind < 0 || kind > static_cast<int>(core::Kind::kShuffleZstd))
      throw nb::value_error(("unknown chunk kind " + std::to_string(kind)).c_str());
    if (dest != 0 && dest_bytes != raw_length) {
      core::Status s;
      s.code = core::Code::kInvalidArgument;
      s.message = "destination holds " + std::to_string(dest_bytes) +
                  " bytes but the chunk decodes to " + std::to_string(raw_length) +
                  "; refusing to write past it";
      s.chunk = static_cast<int64_t>(i);
      return s;
    }
    reads->push_back({offset, length, raw_length, static_cast<core::Kind>(kind), elemsize, crc,
                      reinterpret_cast<uint8_t*>(dest)});
  }
  return {};
}

nb::tuple read_chunks(const std::string& path, const std::vector<AnyReadTuple>& read_tuples,
                      int threads) {
  if (threads < 0) throw nb::value_error("threads must be >= 0 (0 = one per core)");
  std::vector<core::ChunkRead> reads;
  core::Status status = chunk_reads(read_tuples, &reads);
  if (!status.ok()) return status_tuple(status);
  {
    nb::gil_scoped_release nogil;
    status = core::read_chunks(path, reads, threads);
  }
  return status_tuple(status);
}

// read_chunks over bytes already fetched (a ranged GET): offsets are relative to `data`.
nb::tuple decode_chunks(nb::handle data, const std::string& name,
                        const std::vector<AnyReadTuple>& read_tuples, int threads) {
  if (threads < 0) throw nb::value_error("threads must be >= 0 (0 = one per core)");
  std::vector<core::ChunkRead> reads;
  core::Status status = chunk_reads(read_tuples, &reads);
  if (!status.ok()) return status_tuple(status);
  ByteView view(data);
  {
    nb::gil_scoped_release nogil;
    status = core::decode_chunks(view.data(), view.size(), name, reads, threads);
  }
  return status_tuple(status);
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "shardckpt's native staging pipeline (crc32c, shuffle, zstd, parallel file IO).";
  m.attr("__version__") = SHARDCKPT_VERSION;

  m.def("features", &features,
        "Build features: version, zstd version, crc32c backend, hardware threads, whether\n"
        "sync_file_range pacing is available, and the supported save policies.");

  m.def("crc32c", &crc32c, "data"_a, "value"_a = 0,
        "CRC-32C (iSCSI) of a contiguous bytes-like object, continuing from `value`\n"
        "(the result of a previous call; 0 to start).");

  m.def(
      "shuffle",
      [](nb::handle data, size_t elemsize) { return transform(data, elemsize, core::shuffle); },
      "data"_a, "elemsize"_a,
      "Byte-plane shuffle (FORMAT.md 2.1): byte j of element i goes to j*(n/k)+i.");

  m.def(
      "unshuffle",
      [](nb::handle data, size_t elemsize) { return transform(data, elemsize, core::unshuffle); },
      "data"_a, "elemsize"_a, "Inverse of shuffle().");

  m.def("write_file", &write_file, "path"_a, "chunks"_a, "policy"_a, "level"_a,
        "encode_threads"_a, "write_threads"_a, "pool_bytes"_a, "durable"_a, "header"_a,
        "hash"_a = false, "known"_a = nb::bytes(""),
        "Create `path` (it must not exist) and write `header` then every chunk.\n\n"
        "chunks: list of (address, nbytes, elemsize) of memory that stays valid and unchanged\n"
        "until the call returns. policy: 'raw', 'zstd' or 'auto'.\n"
        "Returns ((code, message, chunk, errno), [(offset, length, kind, crc32c)], stats);\n"
        "records are empty unless code == 0. hash: each record gains the chunk's 16-byte\n"
        "xxh3-128 content hash of its raw bytes; chunks whose hash is in `known` (16-byte\n"
        "records) are not written and have length 0.");

  m.def("read_chunks", &read_chunks, "path"_a, "reads"_a, "threads"_a,
        "Read, verify and decode chunks of `path` in parallel.\n\n"
        "reads: list of (offset, length, raw_length, kind, elemsize, crc32c, dest_address[,\n"
        "dest_bytes]); dest_address 0 verifies and decodes without storing. With dest_bytes\n"
        "(the bytes the destination holds), a read whose raw_length differs is refused\n"
        "(code 1) before anything is written. Returns (code, message, chunk, errno).");

  m.def("encode_chunks", &encode_chunks, "chunks"_a, "policy"_a, "level"_a, "encode_threads"_a,
        "pool_bytes"_a, "header"_a, "hash"_a = false, "known"_a = nb::bytes(""),
        "Encode `header` then every chunk into memory, laid out as write_file lays out a file.\n\n"
        "Returns ((code, message, chunk, errno), bytearray, [(offset, length, kind, crc32c)],\n"
        "stats); the bytearray holds the whole encoded object.");

  m.def("decode_chunks", &decode_chunks, "data"_a, "name"_a, "reads"_a, "threads"_a,
        "read_chunks over a bytes-like object: reads' offsets are relative to `data`; `name`\n"
        "labels it in messages. Returns (code, message, chunk, errno).");

  m.def("watch_writes", &core::watch_writes, "lo"_a, "hi"_a,
        "Make the page-aligned range [lo, hi) read-only and watch it for writes (guard.py).\n"
        "Returns a watch id >= 0, or -errno when the pages could not be protected.");

  m.def("unwatch_writes", &core::unwatch_writes, "id"_a,
        "End a watch, making its pages writable again. Returns 1 if anything wrote them while\n"
        "watched, 0 if not, -1 for an unknown id.");
}
