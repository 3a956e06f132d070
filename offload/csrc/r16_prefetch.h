// Software prefetch for the row-interleaved kernels (dot_r16_vnni.cpp, dot_r16_amx.cpp), which stream
// each 16-row group from memory once: kAhead bytes ahead of the loads, spread over the kernel's steps.
// Step i of N in a unit of Unit bytes at u prefetches the cache lines that start within its share of
// the unit, so each line of the group's stream is prefetched once, a few at a time. (Prefetching
// whole units in a burst at the top of each, or nothing, left Q4_K / Q6_K at 74-80% of the read
// bandwidth with 2 threads; spread at 2 KiB they read at 89-100%: measured on 512 MiB matrices.)
#pragma once

#include <xmmintrin.h>

#include <cstddef>
#include <cstdint>

namespace tandem::detail {

constexpr uintptr_t kAhead = 2048;

template <size_t Unit, int N>
inline __attribute__((always_inline)) void prefetch_share(const uint8_t* u, int i) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(u) + kAhead;
    const uintptr_t end = base + Unit * (i + 1) / N;
    for (uintptr_t a = (base + Unit * i / N + 63) & ~uintptr_t(63); a < end; a += 64)
        _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
}

}  // namespace tandem::detail
