// AVX-512 + VNNI dot kernels (dot_simd.h compiled for this ISA), plus the BF16 kernel built on
// _mm512_dpbf16_ps, whose own target adds AVX512_BF16 (dot_kernel() calls it only when the CPU has it).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm*_undefined_*() idiom inside its own intrinsics headers as uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "dot_kernels.h"

#define TANDEM_DOT_LEVEL 4
#define TANDEM_DOT_NS avx512_vnni
#if defined(__clang__)
#pragma clang attribute push(                                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#endif

#include "dot_simd.h"

#define TANDEM_BF16_TARGET \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")))

namespace tandem::detail::avx512_vnni {
namespace {

// 32 bf16 pairs per instruction: acc += w[2i] a[2i] + w[2i+1] a[2i+1] in f32 (products of bf16 are
// exact in f32; the instruction treats denormal inputs as zero). Masked loads take the ragged tail.
// NW weight rows (1, or 2 read side by side: DotKernel2) against NA activation rows.
struct Bf16Dpbf16 {
    // acc[k][r] = w[k] . activation row r (rows `as` bytes apart from va), one accumulator a pair
    template <int NA, int NW>
    TANDEM_BF16_TARGET TANDEM_INLINE static void sums(int64_t n, const uint16_t* const* w, const void* va, size_t as,
                                                      __m512 (&acc)[NW][NA]) {
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) acc[k][r] = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            __m512bh wv[NW];
            for (int k = 0; k < NW; ++k) wv[k] = (__m512bh)_mm512_loadu_si512(w[k] + i);
            for (int r = 0; r < NA; ++r) {
                const __m512bh av = (__m512bh)_mm512_loadu_si512(act_row<uint16_t>(va, as, r) + i);
                for (int k = 0; k < NW; ++k) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], wv[k], av);
            }
        }
        if (i < n) {
            const auto m = static_cast<__mmask32>((1u << (n - i)) - 1);  // n - i < 32
            for (int r = 0; r < NA; ++r) {
                const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, act_row<uint16_t>(va, as, r) + i);
                for (int k = 0; k < NW; ++k)
                    acc[k][r] = _mm512_dpbf16_ps(acc[k][r], (__m512bh)_mm512_maskz_loadu_epi16(m, w[k] + i), av);
            }
        }
    }
    template <int NA, int NW>
    TANDEM_BF16_TARGET static void rows(int64_t n, const void* const* vw, const void* va, size_t as,
                                        float* const* out) {
        const uint16_t* w[NW];
        for (int k = 0; k < NW; ++k) w[k] = static_cast<const uint16_t*>(vw[k]);
        __m512 acc[NW][NA];
        sums<NA, NW>(n, w, va, as, acc);
        if constexpr (NA * NW == 16) return out_sums16<NA, NW>([&](int k, int r) { return acc[k][r]; }, out);
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) out[k][r] = _mm512_reduce_add_ps(acc[k][r]);
    }
    template <int NA>
    TANDEM_BF16_TARGET static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        rows<NA, 1>(n, &vw, va, as, &out);
    }
};

// Attention scores over a BF16 cache with _mm512_dpbf16_ps, as score_span (dot_simd.h) takes them over floats:
// NW cache rows against NA query rows (bf16, `as` bytes apart), y[r * ys + k] = w[k] . a_r, each pair's sum
// Bf16Dpbf16's (the same floats as matmul_rows)
template <int NW, int NA>
TANDEM_BF16_TARGET inline void score_tile_bf16(int64_t n, const uint16_t* const* w, const uint16_t* a, size_t as,
                                               float* y, size_t ys) {
    __m512 acc[NW][NA];
    Bf16Dpbf16::sums<NA, NW>(n, w, a, as, acc);
    store_sums<NW, NA>(acc, y, ys);
}

template <int NW>
TANDEM_BF16_TARGET inline void score_rows_bf16(int64_t n, const uint16_t* const* w, const uint16_t* a, size_t as,
                                               int64_t na, float* y, size_t ys) {
    int64_t r = 0;
    for (; r + 4 <= na; r += 4) score_tile_bf16<NW, 4>(n, w, act_row<uint16_t>(a, as, r), as, y + r * ys, ys);
    switch (na - r) {
        case 1: return score_tile_bf16<NW, 1>(n, w, act_row<uint16_t>(a, as, r), as, y + r * ys, ys);
        case 2: return score_tile_bf16<NW, 2>(n, w, act_row<uint16_t>(a, as, r), as, y + r * ys, ys);
        case 3: return score_tile_bf16<NW, 3>(n, w, act_row<uint16_t>(a, as, r), as, y + r * ys, ys);
        default: return;
    }
}

// Rows [i0, i0 + RR) x vectors [k0, k0 + CC) of a bf16 mix: pairs [j0, j1) of the block interleaved in x (pair j,
// vector k at x + (j NV + k) 32), row r's p pairs at pairs[r]; the RR x CC accumulators in registers
template <int RR, int CC, int NV>
TANDEM_BF16_TARGET inline void mix_tile_bf16(const MixRows& m, int64_t r0, int64_t i0, int k0, int64_t j0, int64_t j1,
                                             const uint16_t* x, const uint32_t* const* pairs) {
    __m512 acc[RR][CC];
    float* out[RR];
    for (int r = 0; r < RR; ++r) {
        out[r] = m.out[i0 + r] + r0 + 16 * k0;
        for (int c = 0; c < CC; ++c) acc[r][c] = _mm512_loadu_ps(out[r] + 16 * c);
    }
    for (int64_t j = j0; j < j1; ++j) {
        __m512bh v[CC];
        for (int c = 0; c < CC; ++c) v[c] = (__m512bh)_mm512_load_si512(x + (j * NV + k0 + c) * 32);
        for (int r = 0; r < RR; ++r) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[r][j]));
            for (int c = 0; c < CC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], v[c], w);
        }
    }
    for (int r = 0; r < RR; ++r)
        for (int c = 0; c < CC; ++c) _mm512_storeu_ps(out[r] + 16 * c, acc[r][c]);
}

// mix_tile_bf16 over every vector, four at a time (a row on its own: all NV at once)
template <int RR, int NV>
TANDEM_BF16_TARGET inline void mix_group_bf16(const MixRows& m, int64_t r0, int64_t i0, int64_t j0, int64_t j1,
                                              const uint16_t* x, const uint32_t* const* pairs) {
    constexpr int CC = RR == 1 ? NV : 4;
    int k0 = 0;
    for (; k0 + CC <= NV; k0 += CC) mix_tile_bf16<RR, CC, NV>(m, r0, i0, k0, j0, j1, x, pairs);
    if constexpr (NV % CC > 0) mix_tile_bf16<RR, NV % CC, NV>(m, r0, i0, k0, j0, j1, x, pairs);
}

// The mix of a BF16 cache, columns [r0, r0 + 16 NV), with _mm512_dpbf16_ps: per block of kMixBlockBf16
// positions, the block's rows interleaved in pairs once (vector k of pair j: lane l holds positions 2j and
// 2j + 1 of column r0 + 16 k + l), then the output rows four at a time against four vectors at a time, each
// row's p in bf16 pairs (exact: softmax_row rounded p to bf16), one instruction per vector and pair, half the
// instructions of the f32 mix. A pair's two products are added to the sum one after the other (2j + 1
// first), each product exact, so each output is its products summed in (nearly) position order; the
// instruction treats denormal inputs as zero. Past a row's last position p is zero, past the block's last
// position the cache too. A group of rows runs to the last whole pair all of them see, each row's rest on
// its own from there: every row adds the same pairs in the same order as on its own (the same floats).
// Four rows at a time, with score_span_bf16, against one row and matmul_rows' scores: the attention call (4096
// positions) 0.91-0.93x the time for Qwen3-30B-A3B's and V2-Lite's heads, a tile of 8 tokens 0.93-0.99x.
template <int NV>
TANDEM_BF16_TARGET void mix_bf16_t(const MixRows& m, int64_t r0) {
    constexpr int kPairs = kMixBlockBf16 / 2;
    alignas(64) uint16_t x[kPairs][NV][32];
    alignas(64) uint32_t pairs[4][kPairs + 8];  // (a row's pairs from an odd pair on run 8 past the block)
    const uint32_t* rows_pairs[4] = {pairs[0], pairs[1], pairs[2], pairs[3]};
    // word 2l <- word l of the first position, word 2l + 1 <- word l of the second (index 32 + l)
    const __m512i interleave = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                                38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    int64_t seen = 0;
    for (int64_t i = 0; i < m.n_rows; ++i) seen = std::max(seen, m.n[i]);
    for (int64_t b0 = 0; b0 < seen; b0 += kMixBlockBf16) {
        const int64_t b1 = std::min(seen, b0 + kMixBlockBf16);
        for (int64_t s = b0; s < b1; s += 2) {
            const uint16_t* a = reinterpret_cast<const uint16_t*>(m.rows + s * m.stride) + r0;
            const uint16_t* b = reinterpret_cast<const uint16_t*>(m.rows + (s + 1) * m.stride) + r0;
            for (int k = 0; k < NV; ++k) {
                const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * k));
                const __m256i vb = s + 1 < b1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * k))
                                              : _mm256_setzero_si256();
                const __m512i both = _mm512_permutex2var_epi16(_mm512_castsi256_si512(va), interleave,
                                                               _mm512_castsi256_si512(vb));
                _mm512_store_si512(x[(s - b0) / 2][k], both);
            }
        }
        // row i's p over positions [c0, e) (c0 - b0 even) as bf16 pairs into dst from pair (c0 - b0) / 2, zero past e
        auto make_pairs = [&](int64_t i, int64_t c0, int64_t e, uint32_t* dst) {
            for (int64_t c = c0; c < e; c += 16) {  // 16 at a time, masked past e
                const auto mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, e - c)) - 1);
                const __m512 pv = _mm512_maskz_loadu_ps(mask, m.p + i * m.p_stride + c);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c - b0) / 2), (__m256i)_mm512_cvtneps_pbh(pv));
            }
        };
        // a row on its own over [c0, e)
        auto one_row = [&](int64_t i, int64_t c0, int64_t e) {
            make_pairs(i, c0, e, pairs[0]);
            mix_group_bf16<1, NV>(m, r0, i, (c0 - b0) / 2, (e - b0 + 1) / 2, &x[0][0][0], rows_pairs);
        };
        int64_t i = 0;
        for (; i + 4 <= m.n_rows; i += 4) {
            int64_t e = b1;
            for (int r = 0; r < 4; ++r) e = std::min(e, m.n[i + r]);
            const int64_t whole = e > b0 ? b0 + (e - b0) / 2 * 2 : b0;  // the group's end: whole pairs
            if (whole > b0) {
                for (int r = 0; r < 4; ++r) make_pairs(i + r, b0, whole, pairs[r]);
                mix_group_bf16<4, NV>(m, r0, i, 0, (whole - b0) / 2, &x[0][0][0], rows_pairs);
            }
            for (int r = 0; r < 4; ++r)
                if (std::min(b1, m.n[i + r]) > whole) one_row(i + r, whole, std::min(b1, m.n[i + r]));
        }
        for (; i < m.n_rows; ++i)
            if (std::min(b1, m.n[i]) > b0) one_row(i, b0, std::min(b1, m.n[i]));
    }
}

}  // namespace

void mix_cols_bf16(const MixRows& m, int64_t r0, int nv) {
    switch (nv) {
        case 1: return mix_bf16_t<1>(m, r0);
        case 2: return mix_bf16_t<2>(m, r0);
        case 3: return mix_bf16_t<3>(m, r0);
        case 4: return mix_bf16_t<4>(m, r0);
        case 5: return mix_bf16_t<5>(m, r0);
        case 6: return mix_bf16_t<6>(m, r0);
        case 7: return mix_bf16_t<7>(m, r0);
        default: return mix_bf16_t<8>(m, r0);
    }
}

TANDEM_BF16_TARGET void score_span_bf16(int64_t n, const uint8_t* w, size_t ws, int64_t p0, int64_t p1,
                                        const uint16_t* a, size_t as, int64_t na, float* y, size_t ys) {
    for (int64_t p = p0; p < p1; p += 4) {
        const uint16_t* rows[4];
        const int nw = static_cast<int>(std::min<int64_t>(4, p1 - p));
        for (int k = 0; k < nw; ++k) rows[k] = reinterpret_cast<const uint16_t*>(w + (p + k) * ws);
        switch (nw) {
            case 4: score_rows_bf16<4>(n, rows, a, as, na, y + p, ys); break;
            case 3: score_rows_bf16<3>(n, rows, a, as, na, y + p, ys); break;
            case 2: score_rows_bf16<2>(n, rows, a, as, na, y + p, ys); break;
            default: score_rows_bf16<1>(n, rows, a, as, na, y + p, ys); break;
        }
    }
}

DotKernel bf16_dpbf16_kernel() { return &by_rows<Bf16Dpbf16>; }
DotKernel2 bf16_dpbf16_kernel2() { return &by_rows2<Bf16Dpbf16>; }

}  // namespace tandem::detail::avx512_vnni

#if defined(__clang__)
#pragma clang attribute pop
#endif
