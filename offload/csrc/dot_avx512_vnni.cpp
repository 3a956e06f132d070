// AVX-512 + VNNI dot kernels (dot_simd.h compiled for this ISA), plus the BF16 kernel built on
// _mm512_dpbf16_ps, whose own target adds AVX512_BF16 (dot_kernel() calls it only when the CPU has it).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm*_undefined_*() idiom inside its own intrinsics headers as uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>
#include <cstring>
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
struct Bf16Dpbf16 {
    template <int NA>
    TANDEM_BF16_TARGET static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        const auto* w = static_cast<const uint16_t*>(vw);
        __m512 acc[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);
            for (int r = 0; r < NA; ++r)
                acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(act_row<uint16_t>(va, as, r) + i));
        }
        if (i < n) {
            const auto m = static_cast<__mmask32>((1u << (n - i)) - 1);  // n - i < 32
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + i);
            for (int r = 0; r < NA; ++r)
                acc[r] = _mm512_dpbf16_ps(acc[r], wv,
                                          (__m512bh)_mm512_maskz_loadu_epi16(m, act_row<uint16_t>(va, as, r) + i));
        }
        for (int r = 0; r < NA; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    }
};

}  // namespace

DotKernel bf16_dpbf16_kernel() { return &by_rows<Bf16Dpbf16>; }

}  // namespace tandem::detail::avx512_vnni

#if defined(__clang__)
#pragma clang attribute pop
#endif
