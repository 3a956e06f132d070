// Software prefetch for the row-interleaved kernels (dot_r16_vnni.cpp, dot_r16_simd256.h, dot_r16_amx.cpp),
// which stream each 16-row group from memory once: a fixed distance ahead of the loads, spread over the
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
// The AVX-512 kernels on AMD use both, in two levels: prefetcht1 kFarL2 ahead into the L2, then prefetcht0
// kNearL2 (kNearL2K) ahead into the L1. Zen 4, 2 threads, GEMVs of 256 MiB in alternation with the read
// (one process switching between the two, ~1000 pairs each): when the read ran at 42-60 GB/s, prefetcht1
// alone at 3 KiB left the kernels at 72-77% of it (Q6_K 61-63%), the two levels (6 KiB / 1 KiB) at 85-90%
// (Q6_K 78-81%; Q8_0 at 3 KiB / 1 KiB: 0.77 -> 0.86); at 32-42 GB/s both held 92-98%. Farther alone (6 or
// 12 KiB) gained less (0.71-0.73 for Q4_K), the L1 alone lost (0.67).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu_features.h"

namespace tandem::detail {

// 3 KiB ahead for the token-tile kernels (their groups in pairs, the prefetches wrapped as below): 2-15%
// faster than 2 KiB (1 KiB for the 32-value types) at 1 token on every type, 0.91-0.94x at 4 KiB for
// Q4_K; on Zen 4 with prefetcht1 alone, MoE layers at T=1 ran no faster at 4, 6 or 8 KiB. The AMX kernels
// stay at 2 KiB: 1, 4 and 8 KiB were 3-8% slower there (MoE at T=128).
constexpr uintptr_t kAhead = 3072, kAheadAmx = 2048;
// The two levels on AMD: 6 KiB ahead into the L2 (4 KiB for Q8_0, whose kernel reads fastest), then 1 KiB
// ahead into the L1 for the 32-value kernels (units of 288-544 bytes), 2 KiB for the K-quant kernels
// (2304-3360).
// Zen 4, 2 threads, 128 MiB GEMVs against the read in one process, ~1300-7000 pairs a setting, read at
// 42-60 GB/s: Q8_0 far 3 KiB 0.72 of the read (K = 2048 and 8192 alike), 3.5 KiB 0.78, 4 KiB 0.81-0.85,
// 5 KiB 0.80-0.83, 6 KiB 0.78-0.79; near 1 -> 2 KiB: Q4_K 0.90 -> 0.91, Q6_K 0.85 -> 0.87, Q8_0 0.85 ->
// 0.75. At 32-42 GB/s all within 0.91-0.98 (Q8_0 at 6 KiB far or 2 KiB near 0.91-0.94).
// Q8_0 at 42-60 GB/s, not kept (the same in-process A/B, ~8000-18000 pairs; the current 0.84-0.86): the
// near level as prefetchnta 0.86; near 512 or 1536 bytes 0.82-0.83; far as prefetcht2 0.84; prefetchnta alone
// 0.64; units padded to 576 bytes so every load is aligned 0.79 against 0.84; without the unsigned flip (8
// xors a block) 0.83 against 0.85. As with the leaner forms below, less work per byte did not stream faster.
// A decode call's first kFarL2 bytes a stream (the AVX2 kernels' first kAhead), which no step prefetches:
// repack.cpp's prefetch_call_start.
constexpr uintptr_t kFarL2 = 6144, kFarL2Q8_0 = 4096, kNearL2 = 1024, kNearL2K = 2048;

// Lines at or past `at` are taken `by` further on (the first of two groups read side by side: GroupStep).
struct Wrap {
    uintptr_t at = UINTPTR_MAX, by = 0;
};

// The lines starting in [first, end), those at or past wrap.at taken wrap.by further on; Locality as
// __builtin_prefetch's (3 prefetcht0, 2 prefetcht1; it must be a constant). A loop with a test per line
// costs: without any prefetch the kernels ran 30-60% faster from L2 (Q8_0 44 -> 70 GB/s a thread). But
// leaner forms (unrolled at constant offsets, or a line or two per inner step) streamed worse from memory
// at 48-60 GB/s (Zen 4: Q4_K 0.86 -> 0.79-0.81 of the read), and so did prefetching every other line.
// Checked again with the prefetches counted in the object code (a form that passed the locality through a
// generic lambda compiled to no prefetch at all, and measured as none): each step's lines unrolled at
// constant offsets from one wrapped base ran 1.2-1.5x faster from cache, but from memory, in alternation
// with this loop (2 threads, 70 rounds read at 45-58 GB/s): 256 MiB Q4_K 0.88x, Q8_0 0.87x, MoE layers at
// T=1 0.88-0.91x; spaced by a 3-cycle dependency a line 0.91-0.96x; at 31-33 GB/s 0.95x and 0.97-0.99x.
// Spread instead over the Q4_K kernel's quant loads (a line of each level beside each 64-byte load): 1.04x
// from cache, and from memory 0.96-1.02x of the loop (Q4_K GEMV, MoE layers at T=1; ~150 rounds a regime).
template <int Locality>
inline __attribute__((always_inline)) void prefetch_lines(uintptr_t first, uintptr_t end, Wrap wrap) {
    for (uintptr_t a = first; a < end; a += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(a < wrap.at ? a : a + wrap.by), 0, Locality);
}

// How a kernel prefetches: the L1 always (the AVX2 Q6_K kernel, which reads each line in two passes, 8 rows
// a pass: on Zen 4 it streamed a 2048-column matrix at 79-82% of the read with prefetcht0, 60-65% with
// prefetcht1); one level, the CPU's (the other AVX2 kernels: on Zen 4 prefetcht1 took their Q4_K and Q5_0
// from 85 to 96% and 92 to 94% of a 32 GB/s read, and the two levels gained them nothing at 42-60 GB/s,
// Q8_0 0.84 -> 0.70); or two levels on AMD (the AVX-512 kernels), the L1 elsewhere.
enum class Prefetch { L1, OneLevel, TwoLevel };

// FarL2, NearL2: the two levels' distances.
template <size_t Unit, int N, uintptr_t Ahead = kAhead, Prefetch P = Prefetch::TwoLevel, uintptr_t FarL2 = kFarL2,
          uintptr_t NearL2 = kNearL2>
inline __attribute__((always_inline)) void prefetch_share(const uint8_t* u, int i, Wrap wrap = {}) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(u), lo = at + Unit * i / N, hi = at + Unit * (i + 1) / N;
    auto first = [](uintptr_t a) { return (a + 63) & ~uintptr_t(63); };
    if (P != Prefetch::L1 && g_stream_prefetch_l2) {
        if (P == Prefetch::TwoLevel) {
            prefetch_lines<2>(first(lo + FarL2), hi + FarL2, wrap);
            prefetch_lines<3>(first(lo + NearL2), hi + NearL2, wrap);
        } else {
            prefetch_lines<2>(first(lo + Ahead), hi + Ahead, wrap);
        }
    } else {
        prefetch_lines<3>(first(lo + Ahead), hi + Ahead, wrap);
    }
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
