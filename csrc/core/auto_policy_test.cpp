// auto_policy_test: the `auto` codec's decisions, fed synthetic rates (no threads, no clock, no
// files), so every rule of auto_policy.h is checked deterministically. Built with
// -DSHARDCKPT_BUILD_SELFTEST=ON (CTest) and by tests/native/test_auto_policy.py straight from
// the two source files.

#include <cstdio>
#include <string>

#include "auto_policy.h"

namespace {

using shardckpt::AutoChoice;
using shardckpt::AutoPolicy;

constexpr uint64_t kMiB = 1u << 20;
constexpr uint64_t kChunk = 4 * kMiB;
constexpr uint64_t kFull = 40 * kMiB;  // a writers' queue full of raw chunks
constexpr uint64_t kProbeEvery = AutoPolicy::kProbeEveryBytes / kChunk;  // chunks per probe
int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++g_failures;
  }
}

const char* name(AutoChoice c) {
  return c == AutoChoice::kRaw ? "raw" : c == AutoChoice::kProbe ? "probe" : "compress";
}

void expect(AutoChoice got, AutoChoice want, const std::string& what) {
  check(got == want, what + ": got " + name(got) + ", want " + name(want));
}

// Reports `n` writes of one chunk each at `gbps` GB/s.
void writes(AutoPolicy* p, double gbps, int n = 20) {
  for (int i = 0; i < n; ++i) p->wrote(kChunk, kChunk / (gbps * 1e9));
}

// Reports a probe of kProbeBytes at `gbps` that shrank to `ratio`.
void probe(AutoPolicy* p, double gbps, double ratio) {
  const uint64_t n = AutoPolicy::kProbeBytes;
  p->probed(n, static_cast<uint64_t>(ratio * n), n / (gbps * 1e9));
}

// A policy whose writers ran at `write_gbps` and whose first probe (chunk 0) measured
// `compress_gbps` and `ratio`.
void start(AutoPolicy* p, double write_gbps, double compress_gbps, double ratio) {
  writes(p, write_gbps);
  expect(p->choose(kChunk, kFull), AutoChoice::kProbe, "nothing measured yet: probe");
  probe(p, compress_gbps, ratio);
}

void test_probe_bytes() {
  check(AutoPolicy::probe_bytes(kChunk, 4) == AutoPolicy::kProbeBytes, "probe of a big chunk");
  check(AutoPolicy::probe_bytes(100, 4) == 48, "probe: half the chunk, whole elements");
  check(AutoPolicy::probe_bytes(6, 4) == 0, "no probe of a two-element chunk of 3-byte halves");
  check(AutoPolicy::probe_bytes(1, 1) == 0, "no probe of a 1-byte chunk");
}

void test_writers_keeping_up_means_raw() {
  AutoPolicy p(1, 2 * kChunk, 1);
  writes(&p, 0.05);  // a very slow disk ...
  probe(&p, 1.0, 0.5);
  for (uint64_t i = 0; i < 40; ++i)  // ... but nothing waits for it: no work spent on probes
    expect(p.choose(kChunk, kChunk), AutoChoice::kRaw, "backlog below the mark");
}

void test_fast_disk_stores_raw_and_probes_rarely() {
  AutoPolicy p(1, 2 * kChunk, 1);
  start(&p, 1.3, 0.7, 0.7);
  int probes = 0;
  for (uint64_t i = 1; i < 1 + 10 * kProbeEvery; ++i) {
    const AutoChoice c = p.choose(kChunk, kFull);
    check(c != AutoChoice::kCompress, "fast disk: chunk " + std::to_string(i) + " not compressed");
    if (c == AutoChoice::kProbe) {
      ++probes;
      probe(&p, 0.7, 0.7);
    }
  }
  check(probes == 10, "fast disk: one probe per kProbeEvery chunks, got " +
                          std::to_string(probes));
}

void test_margin() {
  // Compression barely faster than the disk gains little and risks the save: raw.
  AutoPolicy p(1, 2 * kChunk, 1);
  start(&p, 1.0, 1.1, 0.7);  // within kKeepUpMargin (1.25)
  expect(p.choose(kChunk, kFull), AutoChoice::kRaw, "within the margin");
  // Two compressing threads for one writer double the compress throughput.
  AutoPolicy two(1, 2 * kChunk, 2);
  start(&two, 1.0, 1.1, 0.7);
  expect(two.choose(kChunk, kFull), AutoChoice::kCompress, "two compressing threads");
  // Two writers need twice the compress throughput.
  AutoPolicy writers(2, 2 * kChunk, 2);
  start(&writers, 1.0, 1.1, 0.7);
  expect(writers.choose(kChunk, kFull), AutoChoice::kRaw, "two writers");
}

void test_slow_disk_compresses() {
  AutoPolicy p(1, 2 * kChunk, 1);
  start(&p, 0.2, 0.7, 0.7);
  expect(p.choose(kChunk, kFull), AutoChoice::kCompress, "slow disk compresses");
  // One slot: a second chunk while the first compresses is not compressed (nor probed: the
  // measurement is fresh).
  expect(p.choose(kChunk, kFull), AutoChoice::kRaw, "no free compression slot");
  p.compressed(kChunk, kChunk * 7 / 10, kChunk / 0.7e9);
  expect(p.choose(kChunk, kFull), AutoChoice::kCompress, "slot free again");
  p.cancel();
  expect(p.choose(kChunk, kFull), AutoChoice::kCompress, "cancel frees the slot");
  p.compressed(kChunk, kChunk * 7 / 10, kChunk / 0.7e9);
  // Compressing keeps the measurements fresh: no probes while it goes on.
  for (uint64_t i = 5; i < 5 + 3 * kProbeEvery; ++i) {
    expect(p.choose(kChunk, kFull), AutoChoice::kCompress, "chunk " + std::to_string(i));
    p.compressed(kChunk, kChunk * 7 / 10, kChunk / 0.7e9);
  }
}

void test_backlog_must_outlast_the_compression() {
  // Writer 0.5 GB/s, compression 1 GB/s: a 4 MiB chunk compresses in ~4.2 ms, while the
  // writer drains 2 MiB. A shorter backlog would leave the disk idle.
  AutoPolicy p(1, kMiB, 1);
  start(&p, 0.5, 1.0, 0.7);
  expect(p.choose(kChunk, kMiB + kMiB / 2), AutoChoice::kRaw, "backlog shorter than drain");
  expect(p.choose(kChunk, 3 * kMiB), AutoChoice::kCompress, "backlog covers the drain");
}

void test_incompressible_data_stays_raw_until_a_probe_says_otherwise() {
  AutoPolicy p(1, 2 * kChunk, 1);
  start(&p, 0.1, 0.7, 0.7);
  expect(p.choose(kChunk, kFull), AutoChoice::kCompress, "compressible");
  p.compressed(kChunk, kChunk - 1000, kChunk / 0.7e9);  // random bytes: barely shrank
  const uint64_t next = 1 + kProbeEvery;
  for (uint64_t i = 2; i < next; ++i)
    expect(p.choose(kChunk, kFull), AutoChoice::kRaw, "after a poor chunk");
  expect(p.choose(kChunk, kFull), AutoChoice::kProbe, "re-probe");
  probe(&p, 0.7, 0.6);  // the next tensor compresses again
  expect(p.choose(kChunk, kFull), AutoChoice::kCompress, "compressible again");
}

void test_a_disk_that_slows_down_is_noticed() {
  // The page cache absorbs the first writes (fast), then writeback throttles them (slow).
  AutoPolicy p(1, 2 * kChunk, 1);
  start(&p, 3.0, 0.7, 0.7);
  uint64_t i = 1;
  for (; i < 40; ++i) check(p.choose(kChunk, kFull) != AutoChoice::kCompress, "page cache");
  writes(&p, 0.15, 30);
  expect(p.choose(kChunk, kFull), AutoChoice::kCompress, "throttled writes: compress");
}

}  // namespace

int main() {
  test_probe_bytes();
  test_writers_keeping_up_means_raw();
  test_fast_disk_stores_raw_and_probes_rarely();
  test_margin();
  test_slow_disk_compresses();
  test_backlog_must_outlast_the_compression();
  test_incompressible_data_stays_raw_until_a_probe_says_otherwise();
  test_a_disk_that_slows_down_is_noticed();
  std::printf("auto_policy_test: %s\n", g_failures ? "FAILED" : "ok");
  return g_failures ? 1 : 0;
}
