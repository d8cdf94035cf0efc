// Write watches: page-granular detection of any user-mode write to a memory range.
//
// A guarded async save copies tensors after async_save returns and must know whether anything
// wrote them in between. Autograd version counters miss writes through aliases with their own
// counter (`p.data`, numpy views, raw pointers, other threads' fresh aliases), so the pages are
// made read-only instead: the first write faults, the SIGSEGV handler marks the range written
// and makes it writable again, and the write goes on. The caller unwatches the range after its
// copy and learns whether it was written. Nothing about the bytes is guessed.
//
// Limits: Linux only; whole pages only (the caller keeps partial edge pages by value); a write
// made by the kernel (read(2) into the range) fails with EFAULT instead of faulting; device DMA
// into the pages is not seen.

#pragma once

#include <cstddef>
#include <cstdint>

namespace shardckpt {

// Whether write watches work in this build (Linux).
bool write_watch_supported();

// Make [lo, hi) (page-aligned) read-only and watch it. Returns a watch id >= 0, or -errno when
// the pages could not be protected (the caller then copies them another way).
int64_t watch_writes(uintptr_t lo, uintptr_t hi);

// End watch `id` and make its pages writable again (except pages another live watch covers).
// Returns 1 if anything wrote the range while it was watched, 0 if not, -1 for an unknown id.
int unwatch_writes(int64_t id);

}  // namespace shardckpt
