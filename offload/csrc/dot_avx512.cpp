// AVX-512 (F/BW/VL/DQ) dot kernels: the bodies are in dot_simd.h, compiled here for this ISA only. Also the
// AVX-512 activation quantizers (Q8_0 / Q8_1 / Q8_K): the same bytes as the scalar ones in dot.cpp, which
// stay the reference. Their rounding is the conversion's round-half-to-even, as the scalar 1.5 * 2^23 trick
// rounds (INT_MIN for NaN or overflow, as there); the absolute maximum ignores NaN as std::max does.
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

#include "dot.h"
#include "dot_kernels.h"

#define TANDEM_DOT_LEVEL 3
#define TANDEM_DOT_NS avx512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#include "dot_simd.h"

namespace tandem::detail::avx512 {

void quantize_act_q8_0(const float* x, void* dst, int64_t n, bool q8_1) {
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; ++i) {
        const float* xb = x + 32 * i;
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        const float amax = max_magnitude<Lanes16>(xb, 32);
        const float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
        // saturate to int8 (INT_MIN -> -128); the sum is of the unsaturated values, wrapping
        const __m128i p0 = _mm512_cvtsepi32_epi8(q0), p1 = _mm512_cvtsepi32_epi8(q1);
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        int8_t* qs = q8_block_head(dst, i, q8_1, d, sum);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), p0);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + 16), p1);
    }
}

void quantize_act_q8_k(const float* x, void* dst, int64_t n) {
    auto* y = static_cast<block_q8_K*>(dst);
    for (int64_t i = 0; i < n / 256; ++i, ++y) {
        const float* xb = x + 256 * i;
        float iscale;
        if (!q8k_iscale<Lanes16>(xb, y, iscale)) continue;
        const __m512 is = _mm512_set1_ps(iscale);
        const __m512i top = _mm512_set1_epi32(127);
        for (int k = 0; k < 16; ++k) {  // one 16-value group per vector
            const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * k), is)), top);
            const __m128i q8 = _mm512_cvtepi32_epi8(q);  // truncating, as the scalar cast
            _mm_storeu_si128(reinterpret_cast<__m128i*>(y->qs + 16 * k), q8);
        }
        y->d = 1.0f / iscale;
        // the 16 bsums from the bytes as stored: vpsadbw sums 8 bytes (each + 128, unsigned) per 64-bit
        // lane, two lanes a group; then the even and odd lanes of all four vectors added, less 16 * 128
        // (with a horizontal reduction per group, 64 x 7168 values took 159 us; 108 us this way)
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
        __m256i half[4];
        for (int m = 0; m < 4; ++m) {
            const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(y->qs + 64 * m), flip);
            half[m] = _mm512_cvtepi64_epi32(_mm512_sad_epu8(v, zero));  // groups 4m .. 4m + 3, two lanes each
        }
        const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
        const __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(half[2]), half[3], 1);
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        const __m512i sums = _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi), _mm512_permutex2var_epi32(lo, odd, hi)),
            _mm512_set1_epi32(16 * 128));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y->bsums), _mm512_cvtepi32_epi16(sums));
    }
}

}  // namespace tandem::detail::avx512

#if defined(__clang__)
#pragma clang attribute pop
#endif
