// AVX2 + FMA + F16C dot kernels: the bodies are in dot_simd.h, compiled here for this ISA only.
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

#define TANDEM_DOT_LEVEL 2
#define TANDEM_DOT_NS avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include "dot_simd.h"

namespace tandem::detail::avx2 {

// exp(x) on 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n
// built in the exponent bits), x clamped to [-87, 88] so 2^n stays a normal float; NaN propagates
// (maxps / minps return their second operand for a NaN).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

void swiglu(const float* g, const float* u, float* h, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    if (i < n) {  // the tail through the same lanes, so every element gets the same function
        alignas(32) float gt[8] = {}, ut[8] = {}, ht[8];
        std::memcpy(gt, g + i, sizeof(float) * static_cast<size_t>(n - i));
        std::memcpy(ut, u + i, sizeof(float) * static_cast<size_t>(n - i));
        swiglu(gt, ut, ht, 8);
        std::memcpy(h + i, ht, sizeof(float) * static_cast<size_t>(n - i));
    }
}

}  // namespace tandem::detail::avx2

#if defined(__clang__)
#pragma clang attribute pop
#endif
