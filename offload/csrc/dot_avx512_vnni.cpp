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
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) out[k][r] = _mm512_reduce_add_ps(acc[k][r]);
    }
    template <int NA>
    TANDEM_BF16_TARGET static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        rows<NA, 1>(n, &vw, va, as, &out);
    }
};

}  // namespace

DotKernel bf16_dpbf16_kernel() { return &by_rows<Bf16Dpbf16>; }
DotKernel2 bf16_dpbf16_kernel2() { return &by_rows2<Bf16Dpbf16>; }

}  // namespace tandem::detail::avx512_vnni

#if defined(__clang__)
#pragma clang attribute pop
#endif
