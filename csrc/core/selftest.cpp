// core_selftest: a dependency-free check of the native core, built with
// -DSHARDCKPT_BUILD_SELFTEST=ON and run by CTest. It exercises what the Python tests cannot
// reach directly (the portable crc32c path on SSE4.2 machines) and round-trips every policy.

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "pipeline.h"

namespace shardckpt {
uint32_t crc32c_software(const uint8_t* data, size_t n, uint32_t crc);  // crc32c.cpp
}

namespace {

using namespace shardckpt;

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++g_failures;
  }
}

void test_crc32c() {
  const auto* v = reinterpret_cast<const uint8_t*>("123456789");
  check(crc32c(v, 9) == 0xE3069283u, "crc32c check value");
  check(crc32c_software(v, 9, 0) == 0xE3069283u, "software crc32c check value");
  std::vector<uint8_t> data(70000);
  std::mt19937 rng(1);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (size_t n : {0, 1, 7, 8, 255, 768, 769, 24575, 24576, 24577, 70000}) {
    for (size_t off : {0, 1, 3}) {
      if (off + n > data.size()) continue;
      const uint8_t* p = data.data() + off;
      const uint32_t whole = crc32c(p, n);
      check(whole == crc32c_software(p, n, 0), "crc32c backends agree, n=" + std::to_string(n));
      const size_t half = n / 2;
      check(crc32c(p + half, n - half, crc32c(p, half)) == whole, "crc32c chains");
    }
  }
}

void test_shuffle() {
  std::vector<uint8_t> src(8 * 1001 + 5), planes(src.size()), back(src.size());
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 31 + 7);
  for (size_t k : {1, 2, 3, 4, 8, 16}) {
    const size_t n = src.size() - src.size() % k;
    shuffle(src.data(), planes.data(), n, k);
    bool ok = true;
    for (size_t i = 0; i < n / k; ++i)
      for (size_t j = 0; j < k; ++j) ok &= planes[j * (n / k) + i] == src[i * k + j];
    check(ok, "shuffle layout k=" + std::to_string(k));
    unshuffle(planes.data(), back.data(), n, k);
    check(std::memcmp(back.data(), src.data(), n) == 0, "unshuffle k=" + std::to_string(k));
  }
}

// Writes chunks of compressible floats, random bytes and odd sizes, then reads them back.
void test_round_trip(Policy policy, const char* name) {
  std::mt19937 rng(2);
  std::vector<float> smooth(300000);
  for (size_t i = 0; i < smooth.size(); ++i) smooth[i] = static_cast<float>(i % 1000) * 0.5f;
  std::vector<uint8_t> noise(1 << 20);
  for (auto& b : noise) b = static_cast<uint8_t>(rng());
  const auto* sm = reinterpret_cast<const uint8_t*>(smooth.data());
  const std::vector<ChunkSource> chunks = {
      {sm, 400000, 4}, {sm + 400000, 800000, 4}, {noise.data(), noise.size(), 1},
      {noise.data(), 4096, 2}, {sm, 3, 1}, {sm, 400000, 8}};

  const std::string path = "/tmp/shardckpt-selftest-" + std::to_string(::getpid()) + "-" + name;
  ::unlink(path.c_str());
  WriteOptions opt;
  opt.policy = policy;
  opt.pool_bytes = 8 << 20;
  opt.header = std::string("SHRDCKPT\x01\0\0\0\0\0\0\0", 16);
  std::vector<ChunkRecord> records;
  WriteStats stats;
  Status s = write_file(path, chunks, opt, &records, &stats);
  check(s.ok(), std::string(name) + " write: " + s.message);
  check(stats.pool_peak_bytes <= opt.pool_bytes, std::string(name) + " pool budget");
  check(stats.file_size == 16 + stats.stored_bytes, std::string(name) + " file size");
  if (policy == Policy::kZstd) check(stats.chunks_compressed >= 2, "zstd compresses floats");
  if (policy == Policy::kRaw) check(stats.chunks_compressed == 0, "raw never compresses");

  std::vector<std::vector<uint8_t>> out(chunks.size());
  std::vector<ChunkRead> reads;
  for (size_t i = 0; s.ok() && i < chunks.size(); ++i) {
    out[i].resize(chunks[i].nbytes);
    const ChunkRecord& r = records[i];
    reads.push_back({r.offset, r.length, chunks[i].nbytes, r.kind, chunks[i].elemsize, r.crc,
                     out[i].data()});
  }
  s = read_chunks(path, reads, 3);
  check(s.ok(), std::string(name) + " read: " + s.message);
  for (size_t i = 0; s.ok() && i < chunks.size(); ++i)
    check(std::memcmp(out[i].data(), chunks[i].data, chunks[i].nbytes) == 0,
          std::string(name) + " data of chunk " + std::to_string(i));
  if (!reads.empty()) {
    reads[1].crc ^= 1;
    s = read_chunks(path, reads, 2);
    check(s.code == Code::kChecksum && s.chunk == 1, std::string(name) + " detects bad crc");
  }
  ::unlink(path.c_str());
}

}  // namespace

int main() {
  test_crc32c();
  test_shuffle();
  test_round_trip(Policy::kRaw, "raw");
  test_round_trip(Policy::kZstd, "zstd");
  test_round_trip(Policy::kAuto, "auto");
  std::printf("core_selftest: crc32c=%s zstd=%s: %s\n", crc32c_backend(), zstd_version().c_str(),
              g_failures ? "FAILED" : "ok");
  return g_failures ? 1 : 0;
}
