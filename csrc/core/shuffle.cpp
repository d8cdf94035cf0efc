// Byte-plane shuffle (FORMAT.md 2.1, codec "shuffle"): output byte j*(n/k)+i = input byte i*k+j.
//
// Grouping byte j of every element together puts the slowly varying bytes of floats (sign,
// exponent) next to each other, which is what makes zstd effective on tensors.
//
// The common element sizes (2, 4, 8) get loops with a compile-time k: each iteration reads one
// element and writes one byte to each of k planes, which GCC/Clang vectorise into unpack/shuffle
// sequences with plain SSE2/NEON (no -march needed). Other sizes use a blocked generic loop.
// A trailing n % k bytes (never produced by shardckpt, which only shuffles whole elements) are
// copied unchanged so the functions are total.

#include <cstring>

#include "pipeline.h"

namespace shardckpt {
namespace {

// Elements per block in the generic path: k planes of this many bytes stay in L1 while the
// input block is read once.
constexpr size_t kGenericBlock = 1024;

template <size_t K>
void shuffle_fixed(const uint8_t* __restrict src, uint8_t* __restrict dst, size_t m) {
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < K; ++j) dst[j * m + i] = src[i * K + j];
}

template <size_t K>
void unshuffle_fixed(const uint8_t* __restrict src, uint8_t* __restrict dst, size_t m) {
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < K; ++j) dst[i * K + j] = src[j * m + i];
}

void shuffle_generic(const uint8_t* __restrict src, uint8_t* __restrict dst, size_t m, size_t k) {
  for (size_t i0 = 0; i0 < m; i0 += kGenericBlock) {
    const size_t i1 = i0 + kGenericBlock < m ? i0 + kGenericBlock : m;
    for (size_t j = 0; j < k; ++j) {
      uint8_t* plane = dst + j * m;
      for (size_t i = i0; i < i1; ++i) plane[i] = src[i * k + j];
    }
  }
}

void unshuffle_generic(const uint8_t* __restrict src, uint8_t* __restrict dst, size_t m,
                       size_t k) {
  for (size_t i0 = 0; i0 < m; i0 += kGenericBlock) {
    const size_t i1 = i0 + kGenericBlock < m ? i0 + kGenericBlock : m;
    for (size_t j = 0; j < k; ++j) {
      const uint8_t* plane = src + j * m;
      for (size_t i = i0; i < i1; ++i) dst[i * k + j] = plane[i];
    }
  }
}

}  // namespace

void shuffle(const uint8_t* src, uint8_t* dst, size_t n, size_t elemsize) {
  if (elemsize <= 1) {
    if (n) std::memcpy(dst, src, n);
    return;
  }
  const size_t m = n / elemsize;
  switch (elemsize) {
    case 2: shuffle_fixed<2>(src, dst, m); break;
    case 4: shuffle_fixed<4>(src, dst, m); break;
    case 8: shuffle_fixed<8>(src, dst, m); break;
    default: shuffle_generic(src, dst, m, elemsize); break;
  }
  const size_t body = m * elemsize;
  if (body < n) std::memcpy(dst + body, src + body, n - body);
}

void unshuffle(const uint8_t* src, uint8_t* dst, size_t n, size_t elemsize) {
  if (elemsize <= 1) {
    if (n) std::memcpy(dst, src, n);
    return;
  }
  const size_t m = n / elemsize;
  switch (elemsize) {
    case 2: unshuffle_fixed<2>(src, dst, m); break;
    case 4: unshuffle_fixed<4>(src, dst, m); break;
    case 8: unshuffle_fixed<8>(src, dst, m); break;
    default: unshuffle_generic(src, dst, m, elemsize); break;
  }
  const size_t body = m * elemsize;
  if (body < n) std::memcpy(dst + body, src + body, n - body);
}

}  // namespace shardckpt
