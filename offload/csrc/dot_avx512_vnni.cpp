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
    template <int NA, int NW>
    TANDEM_BF16_TARGET static void rows(int64_t n, const void* const* vw, const void* va, size_t as,
                                        float* const* out) {
        const uint16_t* w[NW];
        for (int k = 0; k < NW; ++k) w[k] = static_cast<const uint16_t*>(vw[k]);
        __m512 acc[NW][NA];
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
        if constexpr (NA * NW == 16) return out_sums16<NA, NW>([&](int k, int r) { return acc[k][r]; }, out);
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) out[k][r] = _mm512_reduce_add_ps(acc[k][r]);
    }
    template <int NA>
    TANDEM_BF16_TARGET static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        rows<NA, 1>(n, &vw, va, as, &out);
    }
};

// The mix of a BF16 cache, columns [r0, r0 + 16 NV), with _mm512_dpbf16_ps: per block of kMixBlockBf16
// positions, the block's rows interleaved in pairs once (vector k of pair j: lane l holds positions 2j and
// 2j + 1 of column r0 + 16 k + l), then per output row its p in bf16 pairs (exact: softmax_row rounded p
// to bf16) and one instruction per vector and pair, half the instructions of the f32 mix. A pair's two
// products are added to the sum one after the other (2j + 1 first), each product exact, so each output is
// its products summed in (nearly) position order; the instruction treats denormal inputs as zero. Past a
// row's last position p is zero, past the block's last position the cache too.
template <int NV>
TANDEM_BF16_TARGET void mix_bf16_t(const MixRows& m, int64_t r0) {
    constexpr int kPairs = kMixBlockBf16 / 2;
    alignas(64) uint16_t x[kPairs][NV][32];
    alignas(64) uint32_t pairs[kPairs];
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
        for (int64_t i = 0; i < m.n_rows; ++i) {
            const int64_t e = std::min(b1, m.n[i]);
            if (e <= b0) continue;
            for (int64_t c = b0; c < e; c += 16) {  // 16 at a time, masked past e
                const auto mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, e - c)) - 1);
                const __m512 pv = _mm512_maskz_loadu_ps(mask, m.p + i * m.p_stride + c);
                _mm256_store_si256(reinterpret_cast<__m256i*>(pairs + (c - b0) / 2), (__m256i)_mm512_cvtneps_pbh(pv));
            }
            float* out = m.out[i] + r0;
            __m512 acc[NV];
            for (int k = 0; k < NV; ++k) acc[k] = _mm512_loadu_ps(out + 16 * k);
            const int np = static_cast<int>((e - b0 + 1) / 2);
            for (int j = 0; j < np; ++j) {
                const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[j]));
                for (int k = 0; k < NV; ++k)
                    acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_load_si512(x[j][k]), w);
            }
            for (int k = 0; k < NV; ++k) _mm512_storeu_ps(out + 16 * k, acc[k]);
        }
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

DotKernel bf16_dpbf16_kernel() { return &by_rows<Bf16Dpbf16>; }
DotKernel2 bf16_dpbf16_kernel2() { return &by_rows2<Bf16Dpbf16>; }

}  // namespace tandem::detail::avx512_vnni

#if defined(__clang__)
#pragma clang attribute pop
#endif
