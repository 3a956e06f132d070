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

#include <cstdint>
#include <cstring>
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
namespace {

// max |x| of 16 lanes folded into acc; a NaN lane leaves acc as it is (maxps returns its second operand)
inline __m512 max_abs(__m512 acc, __m512 x) { return _mm512_max_ps(_mm512_abs_ps(x), acc); }

}  // namespace

void quantize_act_q8_0(const float* x, void* dst, int64_t n, bool q8_1) {
    const int64_t nb = n / 32;
    for (int64_t i = 0; i < nb; ++i) {
        const float* xb = x + 32 * i;
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(max_abs(max_abs(_mm512_setzero_ps(), x0), x1));
        const float d = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
        // saturate to int8 (INT_MIN -> -128); the sum is of the unsaturated values, wrapping
        const __m128i p0 = _mm512_cvtsepi32_epi8(q0), p1 = _mm512_cvtsepi32_epi8(q1);
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        int8_t* qs;
        if (q8_1) {
            auto* y = static_cast<block_q8_1*>(dst) + i;
            y->d = float_to_half(d);
            y->s = float_to_half(d * static_cast<float>(sum));
            qs = y->qs;
        } else {
            auto* y = static_cast<block_q8_0*>(dst) + i;
            y->d = float_to_half(d);
            qs = y->qs;
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), p0);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + 16), p1);
    }
}

void quantize_act_q8_k(const float* x, void* dst, int64_t n) {
    auto* y = static_cast<block_q8_K*>(dst);
    for (int64_t i = 0; i < n / 256; ++i, ++y) {
        const float* xb = x + 256 * i;
        __m512 acc = _mm512_setzero_ps();
        for (int k = 0; k < 16; ++k) acc = max_abs(acc, _mm512_loadu_ps(xb + 16 * k));
        const float amax = _mm512_reduce_max_ps(acc);
        if (amax == 0.0f) {
            std::memset(y, 0, sizeof(*y));
            continue;
        }
        // the signed value of the first element with the largest magnitude, as the scalar loop keeps it
        float max = 0.0f;
        const __m512 am = _mm512_set1_ps(amax);
        for (int k = 0; k < 16; ++k) {
            const __m512 v = _mm512_loadu_ps(xb + 16 * k);
            const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(v), am, _CMP_EQ_OQ);
            if (hit) {
                max = xb[16 * k + __builtin_ctz(hit)];
                break;
            }
        }
        const float iscale = -127.0f / max;
        const __m512 is = _mm512_set1_ps(iscale);
        const __m512i top = _mm512_set1_epi32(127);
        for (int k = 0; k < 16; ++k) {  // one 16-value group per vector: its bsum too
            const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * k), is)), top);
            const __m128i q8 = _mm512_cvtepi32_epi8(q);  // truncating, as the scalar cast
            _mm_storeu_si128(reinterpret_cast<__m128i*>(y->qs + 16 * k), q8);
            y->bsums[k] = static_cast<int16_t>(_mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q8)));
        }
        y->d = 1.0f / iscale;
    }
}

}  // namespace tandem::detail::avx512

#if defined(__clang__)
#pragma clang attribute pop
#endif
