// AVX2 kernel for the row-interleaved Q4_K layout (repack.h): one group of 16 weight rows against up to
// 8 activation rows, for CPUs without AVX-512 VNNI. The scheme of avx512_vnni::gemm_q4k (dot_r16_vnni.cpp)
// in 256-bit halves: lane j of a vector is row j of the half (rows 0-7 from the low 32 bytes of every
// 64-byte run of the layout, rows 8-15 from the high ones), so per super-block and activation row
//   acc += d_a * (d * sum_j sc_j * isum_j - dmin * sum_j m_j * S_j)
// with isum_j the exact sum of sub-block j (vpmaddubsw on the unsigned nibbles, summed in int16, then
// vpmaddwd by ones) and S_j its activation sum from the bsums. Against the plain
// kernel (dot_simd.h's QxK, a row at a time) each broadcast activation dword serves 8 rows and the
// nibbles are unpacked once for every activation row.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "r16_prefetch.h"
#include "repack.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

namespace tandem::detail::avx2 {
namespace {

inline __attribute__((always_inline)) __m256i bcast32(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}


template <int NA>
void gemm_q4k(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad, const float* sub_sums,
              float* Y, size_t y_stride) {
    constexpr size_t unit = 144 * kR16;
    __m256 acc[NA][2];
    for (int t = 0; t < NA; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const __m256i six = _mm256_set1_epi32(63), four = _mm256_set1_epi32(15), two = _mm256_set1_epi32(3);
    const __m256i nib = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* u = group + b * unit;
        const uint8_t* qs = u + 256;
        for (int h = 0; h < 2; ++h) {
            prefetch_share<unit, 2>(u, h);  // the weights stream from memory
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 16 * h)));
            const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 32 + 16 * h)));
            const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 64 + 32 * h));
            const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 128 + 32 * h));
            const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 192 + 32 * h));
            __m256 sc[8], mn[8];  // get_scale_min_k4, one row per lane
            for (int j = 0; j < 4; ++j) {
                sc[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v0, 8 * j), six));
                mn[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v1, 8 * j), six));
                const __m256i hs = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(v0, 8 * j + 6), two), 4);
                const __m256i hm = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(v1, 8 * j + 6), two), 4);
                const __m256i ls = _mm256_and_si256(_mm256_srli_epi32(v2, 8 * j), four);
                const __m256i lm = _mm256_and_si256(_mm256_srli_epi32(v2, 8 * j + 4), four);
                sc[j + 4] = _mm256_cvtepi32_ps(_mm256_or_si256(ls, hs));
                mn[j + 4] = _mm256_cvtepi32_ps(_mm256_or_si256(lm, hm));
            }
            __m256 sum_sc[NA];
            for (int t = 0; t < NA; ++t) sum_sc[t] = _mm256_setzero_ps();
            for (int i = 0; i < 4; ++i) {  // sub-blocks 2i (low nibbles) and 2i + 1 (high)
                // a sub-block's products in int16 pairs (vpmaddubsw: nibble x activation, two to a lane, at
                // most 2 * 15 * 128 = 3840), summed over its 8 vectors (<= 30720, no overflow), then to
                // int32 once
                __m256i s0[NA], s1[NA];
                for (int t = 0; t < NA; ++t) s0[t] = s1[t] = _mm256_setzero_si256();
                for (int k = 0; k < 8; ++k) {
                    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 512 * i + 64 * k + 32 * h));
                    const __m256i lo = _mm256_and_si256(x, nib), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
                    for (int t = 0; t < NA; ++t) {
                        const int8_t* a0 =
                            reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as)[b].qs + 64 * i;
                        s0[t] = _mm256_add_epi16(s0[t], _mm256_maddubs_epi16(lo, bcast32(a0 + 4 * k)));
                        s1[t] = _mm256_add_epi16(s1[t], _mm256_maddubs_epi16(hi, bcast32(a0 + 32 + 4 * k)));
                    }
                }
                const __m256i ones = _mm256_set1_epi16(1);
                for (int t = 0; t < NA; ++t) {
                    const __m256 i0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(s0[t], ones));
                    const __m256 i1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(s1[t], ones));
                    sum_sc[t] = _mm256_fmadd_ps(i0, sc[2 * i], sum_sc[t]);
                    sum_sc[t] = _mm256_fmadd_ps(i1, sc[2 * i + 1], sum_sc[t]);
                }
            }
            for (int t = 0; t < NA; ++t) {
                const float* S = sub_sums + (t * nb + b) * 8;
                __m256 sum_m = _mm256_mul_ps(mn[0], _mm256_set1_ps(S[0]));
                for (int j = 1; j < 8; ++j) sum_m = _mm256_fmadd_ps(mn[j], _mm256_set1_ps(S[j]), sum_m);
                const __m256 da = _mm256_set1_ps(ad[t * nb + b]);
                acc[t][h] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), sum_sc[t], acc[t][h]);
                acc[t][h] = _mm256_fnmadd_ps(_mm256_mul_ps(dm, da), sum_m, acc[t][h]);
            }
        }
    }
    for (int t = 0; t < NA; ++t) {
        _mm256_storeu_ps(Y + t * y_stride, acc[t][0]);
        _mm256_storeu_ps(Y + t * y_stride + 8, acc[t][1]);
    }
}

}  // namespace

void gemm_r16_q4k(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride) {
    // up to 4 activation rows a pass: their sums and the unpacked nibbles fit the 16 vector registers
    for (int t0 = 0; t0 < nt; t0 += 4) {
        const void* a = static_cast<const char*>(act) + t0 * as;
        const float* adt = ad + t0 * nb;
        const float* st = sub_sums + t0 * nb * 8;
        float* y = Y + t0 * y_stride;
        switch (nt - t0 < 4 ? nt - t0 : 4) {
            case 1: gemm_q4k<1>(nb, group, a, as, adt, st, y, y_stride); break;
            case 2: gemm_q4k<2>(nb, group, a, as, adt, st, y, y_stride); break;
            case 3: gemm_q4k<3>(nb, group, a, as, adt, st, y, y_stride); break;
            default: gemm_q4k<4>(nb, group, a, as, adt, st, y, y_stride); break;
        }
    }
}

void prep_r16_q4k(const void* act, size_t as, int nt, int64_t nb, float* ad, float* sub_sums) {
    for (int t = 0; t < nt; ++t) {
        const auto* y = reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as);
        for (int64_t b = 0; b < nb; ++b) {
            ad[t * nb + b] = y[b].d;
            for (int j = 0; j < 8; ++j)
                sub_sums[(t * nb + b) * 8 + j] = static_cast<float>(y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
        }
    }
}

}  // namespace tandem::detail::avx2

#if defined(__clang__)
#pragma clang attribute pop
#endif
