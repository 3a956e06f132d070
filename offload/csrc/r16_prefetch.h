// Software prefetch for the row-interleaved kernels (dot_r16_vnni.cpp, dot_r16_simd256.h, dot_r16_amx.cpp),
// which stream each 16-row group from memory once: kAhead bytes ahead of the loads, spread over the
// kernel's steps.
// Step i of N in a unit of Unit bytes at u prefetches the cache lines that start within its share of
// the unit, so each line of the group's stream is prefetched once, a few at a time. (Prefetching
// whole units in a burst at the top of each, or nothing, left Q4_K / Q6_K at 74-80% of a plain-load
// read with 2 threads; spread at 2 KiB they read at 89-100% of it: measured on 512 MiB matrices. The
// read probe now prefetches too, as fast as any read found, and gives ~15-30% more.)
// Into which cache depends on the CPU (g_stream_prefetch_l2, cpu_features.h): the L1 (prefetcht0) on Intel,
// where the distances below were measured, the L2 (prefetcht1) on AMD. On a Zen 4 core (KVM, 2 threads)
// with prefetcht0 the kernels' compute and memory stalls added up: one thread streamed a Q4_K matrix of
// 2048 columns at 10-11 GB/s, where it computes at 32-48 GB/s from L3 and a plain read runs at 22-26;
// with prefetcht1 at the same distance, 19-23 GB/s. MoE layers at T=1, the two in alternation: V2-Lite
// 74-76% -> 82-83% of the read, V3 85-89% -> 90-95%; decode end to end 1.1-1.4x. The bandwidth probe
// reads no faster with prefetcht1.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu_features.h"

namespace tandem::detail {

// 3 KiB ahead for the token-tile kernels (their groups in pairs, the prefetches wrapped as below): 2-15%
// faster than 2 KiB (1 KiB for the 32-value types) at 1 token on every type, 0.91-0.94x at 4 KiB for
// Q4_K; on Zen 4 with prefetcht1, MoE layers at T=1 ran no faster at 4, 6 or 8 KiB. The AMX kernels stay
// at 2 KiB: 1, 4 and 8 KiB were 3-8% slower there (MoE at T=128).
constexpr uintptr_t kAhead = 3072, kAheadAmx = 2048;

// Lines at or past `at` are taken `by` further on (the first of two groups read side by side: GroupStep).
struct Wrap {
    uintptr_t at = UINTPTR_MAX, by = 0;
};

// Where the cache is the CPU's call (g_stream_prefetch_l2) unless L1 says always the L1: the AVX2 Q6_K
// kernel, which reads each line in two passes (8 rows a pass), streamed a 2048-column matrix at 79-82%
// of the read with prefetcht0 on Zen 4 and 60-65% with prefetcht1 (its Q4_K and Q5_0 kernels: 85 -> 96%
// and 92 -> 94%).
template <size_t Unit, int N, uintptr_t Ahead = kAhead, bool L1 = false>
inline __attribute__((always_inline)) void prefetch_share(const uint8_t* u, int i, Wrap wrap = {}) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(u) + Ahead;
    const uintptr_t end = base + Unit * (i + 1) / N;
    const uintptr_t first = (base + Unit * i / N + 63) & ~uintptr_t(63);
    auto line = [&](uintptr_t a) { return reinterpret_cast<const char*>(a < wrap.at ? a : a + wrap.by); };
    // __builtin_prefetch's locality 3 is prefetcht0, 2 prefetcht1 (the hint must be a constant)
    if (!L1 && g_stream_prefetch_l2)
        for (uintptr_t a = first; a < end; a += 64) __builtin_prefetch(line(a), 0, 2);
    else
        for (uintptr_t a = first; a < end; a += 64) __builtin_prefetch(line(a), 0, 3);
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
