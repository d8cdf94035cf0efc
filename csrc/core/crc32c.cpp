// CRC-32C (Castagnoli, the iSCSI CRC; FORMAT.md 2.1) with runtime dispatch.
//
// Two backends:
//   * "sse4.2": the x86 CRC32 instruction on three interleaved streams. One stream is bound by
//     the instruction's 3-cycle latency; three independent streams keep the unit busy every cycle
//     and are then merged with a precomputed "append L zero bytes" operator.
//   * "software": slicing-by-8 tables, portable to any CPU (aarch64 included).
// The backend is picked once, on first use, with __builtin_cpu_supports; the library is built
// without -march flags so one binary runs on every x86-64 machine.
//
// All helpers work on the *register* value (no pre/post inversion); only crc32c() applies the
// init/final xor, which is what lets callers chain calls by passing the previous result.

#include <array>
#include <cstring>

#include "pipeline.h"

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define SHARDCKPT_X86 1
#endif

namespace shardckpt {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// Slicing-by-8 tables, built at compile time: kTables[0] is the classic byte-at-a-time table and
// kTables[k][b] is the register after b followed by k zero bytes.
struct Tables {
  uint32_t t[8][256];
};

constexpr Tables make_tables() {
  Tables tb{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
    tb.t[0][b] = c;
  }
  for (int k = 1; k < 8; ++k)
    for (uint32_t b = 0; b < 256; ++b)
      tb.t[k][b] = (tb.t[k - 1][b] >> 8) ^ tb.t[0][tb.t[k - 1][b] & 0xFF];
  return tb;
}

constexpr Tables kTables = make_tables();

inline uint64_t load_le64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // unaligned-safe; compiles to one load
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

uint32_t software_update(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& t = kTables.t;
  while (n >= 8) {
    const uint64_t v = load_le64(p) ^ crc;
    crc = t[7][v & 0xFF] ^ t[6][(v >> 8) & 0xFF] ^ t[5][(v >> 16) & 0xFF] ^
          t[4][(v >> 24) & 0xFF] ^ t[3][(v >> 32) & 0xFF] ^ t[2][(v >> 40) & 0xFF] ^
          t[1][(v >> 48) & 0xFF] ^ t[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#ifdef SHARDCKPT_X86

// The linear map "register after feeding `len` zero bytes", as four byte-indexed tables so that
// applying it costs four lookups. Merging the three streams needs it for one fixed stream length.
struct ZeroShift {
  uint32_t t[4][256];

  explicit ZeroShift(size_t len) {
    uint32_t basis[32];  // image of each single-bit register value
    for (int bit = 0; bit < 32; ++bit) {
      uint32_t c = 1u << bit;
      for (size_t i = 0; i < len; ++i) c = (c >> 8) ^ kTables.t[0][c & 0xFF];
      basis[bit] = c;
    }
    for (int k = 0; k < 4; ++k)
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int bit = 0; bit < 8; ++bit)
          if (b & (1u << bit)) v ^= basis[k * 8 + bit];
        t[k][b] = v;
      }
  }

  uint32_t apply(uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};

// Long stream length for big buffers (merge cost negligible) and a short one so that buffers of
// a few KiB also get the 3-way speed-up.
constexpr size_t kLongStream = 8192;
constexpr size_t kShortStream = 256;

__attribute__((target("sse4.2"))) uint32_t hw_single(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc;
  for (; n >= 8; p += 8, n -= 8) c = _mm_crc32_u64(c, load_le64(p));
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n; ++p, --n) c32 = _mm_crc32_u8(c32, *p);
  return c32;
}

// Processes whole blocks of 3 * len bytes; returns the register and advances p/n past them.
__attribute__((target("sse4.2"))) uint32_t hw_triple(uint32_t crc, const uint8_t*& p, size_t& n,
                                                     size_t len, const ZeroShift& shift) {
  while (n >= 3 * len) {
    uint64_t a = crc, b = 0, c = 0;
    const uint8_t* pa = p;
    const uint8_t* pb = p + len;
    const uint8_t* pc = p + 2 * len;
    for (size_t i = 0; i < len; i += 8) {
      a = _mm_crc32_u64(a, load_le64(pa + i));
      b = _mm_crc32_u64(b, load_le64(pb + i));
      c = _mm_crc32_u64(c, load_le64(pc + i));
    }
    // crc(A||B||C) = shift(shift(crc(A)) ^ crc0(B)) ^ crc0(C), crc0 = started from register 0.
    crc = shift.apply(shift.apply(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^
          static_cast<uint32_t>(c);
    p += 3 * len;
    n -= 3 * len;
  }
  return crc;
}

uint32_t hardware_update(uint32_t crc, const uint8_t* p, size_t n) {
  // Built on first use (thread-safe static init); a few hundred microseconds, once per process.
  static const ZeroShift long_shift(kLongStream);
  static const ZeroShift short_shift(kShortStream);
  crc = hw_triple(crc, p, n, kLongStream, long_shift);
  crc = hw_triple(crc, p, n, kShortStream, short_shift);
  return hw_single(crc, p, n);
}

bool cpu_has_sse42() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}

#endif  // SHARDCKPT_X86

using UpdateFn = uint32_t (*)(uint32_t, const uint8_t*, size_t);

struct Backend {
  UpdateFn update;
  const char* name;
};

const Backend& backend() {
  static const Backend chosen = [] {
#ifdef SHARDCKPT_X86
    if (cpu_has_sse42()) return Backend{hardware_update, "sse4.2"};
#endif
    return Backend{software_update, "software"};
  }();
  return chosen;
}

}  // namespace

uint32_t crc32c(const uint8_t* data, size_t n, uint32_t crc) {
  if (n == 0) return crc;
  return ~backend().update(~crc, data, n);
}

const char* crc32c_backend() { return backend().name; }

// Exposed for the self-test so that the portable path is checked even on SSE4.2 machines.
uint32_t crc32c_software(const uint8_t* data, size_t n, uint32_t crc) {
  return ~software_update(~crc, data, n);
}

}  // namespace shardckpt
