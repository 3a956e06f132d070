// Software prefetch for the row-interleaved kernels (dot_r16_vnni.cpp, dot_r16_amx.cpp), which stream
// each 16-row group from memory once: kAhead bytes ahead of the loads, spread over the kernel's steps.
// Step i of N in a unit of Unit bytes at u prefetches the cache lines that start within its share of
// the unit, so each line of the group's stream is prefetched once, a few at a time. (Prefetching
// whole units in a burst at the top of each, or nothing, left Q4_K / Q6_K at 74-80% of a plain-load
// read with 2 threads; spread at 2 KiB they read at 89-100% of it: measured on 512 MiB matrices. The
// read probe now prefetches too, as fast as any read found, and gives ~15-30% more.)
#pragma once

#include <xmmintrin.h>

#include <cstddef>
#include <cstdint>

namespace tandem::detail {

// 2 KiB ahead for the K-quants (Q6_K's steps load its high bits up to 2.8 KiB into a 3.3 KiB unit: 1 KiB
// ahead read it 13% slower); the 32-value types' small units read 4-6% faster at 1 KiB (2 threads,
// groups in pairs).
constexpr uintptr_t kAhead = 2048, kAhead32 = 1024;

// Lines at or past wrap_at are taken wrap_by further on (kernels reading two groups side by side: the
// first group's stream continues into the next pair's second group; +4-13% at 1 token, 512 MiB matrices
// of 1024-8192 columns, 2 threads; a V3-shaped MoE layer at T=1 7.14 -> 6.39 ms).
template <size_t Unit, int N, uintptr_t Ahead = kAhead>
inline __attribute__((always_inline)) void prefetch_share(const uint8_t* u, int i, uintptr_t wrap_at = UINTPTR_MAX,
                                                          uintptr_t wrap_by = 0) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(u) + Ahead;
    const uintptr_t end = base + Unit * (i + 1) / N;
    for (uintptr_t a = (base + Unit * i / N + 63) & ~uintptr_t(63); a < end; a += 64)
        _mm_prefetch(reinterpret_cast<const char*>(a < wrap_at ? a : a + wrap_by), _MM_HINT_T0);
}

}  // namespace tandem::detail
