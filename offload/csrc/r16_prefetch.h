// Software prefetch for the row-interleaved kernels (dot_r16_vnni.cpp, dot_r16_simd256.h, dot_r16_amx.cpp),
// which stream each 16-row group from memory once: kAhead bytes ahead of the loads, spread over the
// kernel's steps.
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

// 3 KiB ahead for the token-tile kernels (their groups in pairs, the prefetches wrapped as below): 2-15%
// faster than 2 KiB (1 KiB for the 32-value types) at 1 token on every type, 0.91-0.94x at 4 KiB for
// Q4_K. The AMX kernels stay at 2 KiB: 1, 4 and 8 KiB were 3-8% slower there (MoE at T=128).
constexpr uintptr_t kAhead = 3072, kAheadAmx = 2048;

// Lines at or past `at` are taken `by` further on (the first of two groups read side by side: GroupStep).
struct Wrap {
    uintptr_t at = UINTPTR_MAX, by = 0;
};

template <size_t Unit, int N, uintptr_t Ahead = kAhead>
inline __attribute__((always_inline)) void prefetch_share(const uint8_t* u, int i, Wrap wrap = {}) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(u) + Ahead;
    const uintptr_t end = base + Unit * (i + 1) / N;
    for (uintptr_t a = (base + Unit * i / N + 63) & ~uintptr_t(63); a < end; a += 64)
        _mm_prefetch(reinterpret_cast<const char*>(a < wrap.at ? a : a + wrap.by), _MM_HINT_T0);
}

// Step `step` of a token-tile kernel that reads G = 1 or 2 groups (nb units of Unit bytes each, the second
// right after the first) side by side, block by block, as G streams from memory: block b of group gi, at
// u. The first group's prefetches past its end would fetch the second group, read beside it; they go on
// into the next pair's second group instead (wrap), which the next call would otherwise start reading
// cold (+4-13% at 1 token, 512 MiB matrices of 1024-8192 columns, 2 threads; a V3-shaped MoE layer at
// T=1 7.14 -> 6.39 ms).
template <size_t Unit, int G>
struct GroupStep {
    int64_t b;
    int gi;
    const uint8_t* u;
    Wrap wrap;
    inline __attribute__((always_inline)) GroupStep(const uint8_t* group, int64_t nb, int64_t step)
        : b(step / G), gi(static_cast<int>(step % G)), u(group + (gi * nb + b) * Unit) {
        if (G == 2 && gi == 0) wrap = {reinterpret_cast<uintptr_t>(group) + nb * Unit, 2 * nb * Unit};
    }
};

}  // namespace tandem::detail
