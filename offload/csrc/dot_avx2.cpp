// AVX2 + FMA + F16C dot kernels: the bodies are in dot_simd.h, compiled here for this ISA only.
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

#define TANDEM_DOT_LEVEL 2
#define TANDEM_DOT_NS avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include "dot_simd.h"

namespace tandem::detail::avx2 {

void swiglu(const float* g, const float* u, float* h, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, vexp(_mm256_sub_ps(_mm256_setzero_ps(), x))));
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

namespace {

// 32 int32 (4 vectors, in order) as 32 bytes in order: the packs work within 128-bit lanes, so the
// dwords come out as q0 q1 q2 q3 of each lane's half; the permutation puts them back
inline __m256i in_order(__m256i packed) {
    return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace

// quantize_activation_row's Q8_0 / Q8_1 blocks: the AVX-512 quantizer's steps on 8 lanes, the same bytes
void quantize_act_q8_0(const float* x, void* dst, int64_t n, bool q8_1) {
    for (int64_t i = 0; i < n / 32; ++i) {
        const float* xb = x + 32 * i;
        const float amax = max_magnitude<Lanes8>(xb, 32);
        const float d = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i q[4];
        for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k), id));
        // saturate to int8 (INT_MIN -> -128); the sum is of the unsaturated values, wrapping
        const __m256i p = in_order(_mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])));
        __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
        const int32_t sum = _mm_cvtsi128_si32(h);
        int8_t* qs = q8_block_head(dst, i, q8_1, d, sum);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), p);
    }
}

// quantize_activation_row's Q8_K blocks: the AVX-512 quantizer's steps on 8 lanes, the same bytes
void quantize_act_q8_k(const float* x, void* dst, int64_t n) {
    auto* y = static_cast<block_q8_K*>(dst);
    for (int64_t i = 0; i < n / 256; ++i, ++y) {
        const float* xb = x + 256 * i;
        float iscale;
        if (!q8k_iscale<Lanes8>(xb, y, iscale)) continue;
        const __m256 is = _mm256_set1_ps(iscale);
        const __m256i top = _mm256_set1_epi32(127), byte = _mm256_set1_epi32(0xFF);
        for (int k = 0; k < 8; ++k) {  // 32 values at a time, each truncated to its low byte as the scalar cast
            __m256i q[4];
            for (int j = 0; j < 4; ++j)
                q[j] = _mm256_and_si256(
                    _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 32 * k + 8 * j), is)), top),
                    byte);
            const __m256i p =
                in_order(_mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3])));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y->qs + 32 * k), p);
        }
        y->d = 1.0f / iscale;
        // the bsums from the bytes as stored: vpsadbw sums 8 bytes (each + 128, unsigned) per 64-bit lane
        const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), zero = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) {
            const __m256i v =
                _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y->qs + 32 * k)), flip);
            const __m256i s = _mm256_sad_epu8(v, zero);
            const __m256i pair = _mm256_add_epi64(s, _mm256_srli_si256(s, 8));  // each 128-bit lane's group
            y->bsums[2 * k] = static_cast<int16_t>(_mm256_extract_epi64(pair, 0) - 16 * 128);
            y->bsums[2 * k + 1] = static_cast<int16_t>(_mm256_extract_epi64(pair, 2) - 16 * 128);
        }
    }
}

}  // namespace tandem::detail::avx2

#if defined(__clang__)
#pragma clang attribute pop
#endif
