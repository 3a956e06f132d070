// AVX-512 VNNI kernel for the row-interleaved layouts (repack.h): one group of 16 weight rows against
// up to 8 activation rows. Lane j of every vector is row j, so per block and activation row:
//   s    = seed (-off * sum(a), the unsigned quants' bias) + 8 dpbusd(q[k], broadcast a dword k)
//   acc += float(s) * (d_w[j] * d_a)
// with the block's 8 quant vectors unpacked once for all activation rows (Q4_0 / Q5_0: nibbles of 4
// loads, Q5_0's fifth bits added under mask; Q8_0: 8 loads, flipped to unsigned by xor 0x80).
// Integer block sums are exact; per lane the float sum runs over the blocks in order.
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
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#endif

namespace tandem::detail::avx512_vnni {
namespace {

using qk::QK8_0;

inline __attribute__((always_inline)) __m512i bcast32(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

template <GgmlType Base>
inline __attribute__((always_inline)) void unpack(const uint8_t* u, __m512i* q) {
    const uint8_t* qs = u + 2 * kR16;
    if constexpr (Base == GgmlType::Q8_0) {
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
        for (int k = 0; k < 8; ++k) q[k] = _mm512_xor_si512(_mm512_loadu_si512(qs + 64 * k), flip);
    } else {
        const __m512i nib = _mm512_set1_epi8(0x0F);
        for (int m = 0; m < 4; ++m) {
            const __m512i x = _mm512_loadu_si512(qs + 64 * m);
            q[m] = _mm512_and_si512(x, nib);
            q[m + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), nib);
        }
        if constexpr (Base == GgmlType::Q5_0) {
            const __m512i sixteen = _mm512_set1_epi8(16);
            for (int k = 0; k < 8; ++k) {
                uint64_t bits;
                std::memcpy(&bits, qs + 256 + 8 * k, 8);
                q[k] = _mm512_mask_add_epi8(q[k], _cvtu64_mask64(bits), q[k], sixteen);
            }
        }
    }
}

// The K-quant kernels' prefetch (super-blocks of 2304-3360 bytes a step): the L1 level 2 KiB ahead.
template <size_t Unit, int N>
inline __attribute__((always_inline)) void prefetch_kquant(const uint8_t* u, int i, Wrap wrap) {
    prefetch_share<Unit, N, kAhead, Prefetch::TwoLevel, kFarL2, kNearL2K>(u, i, wrap);
}

// f(std::integral_constant<int, nt>, std::integral_constant<int, ng>) for a token tile of nt = 1..8 rows
// and ng = 1 or 2 groups: the kernel instantiated for them.
template <int G, class F>
inline void by_tile(int nt, F&& f) {
    using G_ = std::integral_constant<int, G>;
    switch (nt) {
        case 1: return f(std::integral_constant<int, 1>{}, G_{});
        case 2: return f(std::integral_constant<int, 2>{}, G_{});
        case 3: return f(std::integral_constant<int, 3>{}, G_{});
        case 4: return f(std::integral_constant<int, 4>{}, G_{});
        case 5: return f(std::integral_constant<int, 5>{}, G_{});
        case 6: return f(std::integral_constant<int, 6>{}, G_{});
        case 7: return f(std::integral_constant<int, 7>{}, G_{});
        case 8: return f(std::integral_constant<int, 8>{}, G_{});
        default: return;
    }
}
template <class F>
inline void by_tile(int nt, int ng, F&& f) {
    if (ng == 2) by_tile<2>(nt, f);
    else by_tile<1>(nt, f);
}

// The integer dot of one block's 8 unpacked quant vectors with one activation row's 32 quants, per lane,
// from `init`: two chains (one activation row alone has too little independent work to hide dpbusd's
// latency).
inline __attribute__((always_inline)) __m512i block_dot(const __m512i* q, const int8_t* a, __m512i init) {
    __m512i s = init, s2 = _mm512_setzero_si512();
    for (int k = 0; k < 8; k += 2) {
        s = _mm512_dpbusd_epi32(s, q[k], bcast32(a + 4 * k));
        s2 = _mm512_dpbusd_epi32(s2, q[k + 1], bcast32(a + 4 * k + 4));
    }
    return _mm512_add_epi32(s, s2);
}

// Q4_0 / Q5_0 / Q8_0 against Q8_0 (seed from prep_r16), and Q4_1 / Q5_1 (kMin): unsigned quants
// (unpacked as Q4_0's / Q5_0's, no offset) and a min per row and block, against Q8_1 activations (scale
// d_a, and sa = d_a * sum of the block's quants, from prep_r16_min; no seed):
//   acc += float(sum_k q_k a_k) * (d_w d_a) + m_w s_a
template <GgmlType Base, int NA, int G>
void gemm(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad, const int32_t* seed,
          const float* sa, float* Y, size_t y_stride) {
    constexpr bool kMin = Base == GgmlType::Q4_1 || Base == GgmlType::Q5_1;
    constexpr GgmlType Plain = Base == GgmlType::Q5_1   ? GgmlType::Q5_0
                               : Base == GgmlType::Q4_1 ? GgmlType::Q4_0
                                                        : Base;
    constexpr size_t unit = (Base == GgmlType::Q8_0   ? 34
                             : Base == GgmlType::Q5_1 ? 24
                             : Base == GgmlType::Q4_1 ? 20
                             : Base == GgmlType::Q5_0 ? 22
                                                      : 18) *
                            kR16;
    using Act = std::conditional_t<kMin, block_q8_1, block_q8_0>;
    __m512 accs[G][NA];
    for (auto& acc : accs)
        for (int t = 0; t < NA; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t step = 0; step < G * nb; ++step) {  // the G groups' block b side by side
        const GroupStep<unit, G> pos(group, nb, step);
        const int64_t b = pos.b;
        __m512* acc = accs[pos.gi];
        const uint8_t* u = pos.u;
        constexpr uintptr_t far = Base == GgmlType::Q8_0 ? kFarL2Q8_0 : kFarL2;
        prefetch_share<unit, 1, kAhead, Prefetch::TwoLevel, far>(u, 0, pos.wrap);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)));
        __m512 mw = _mm512_setzero_ps();
        if constexpr (kMin) mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 2 * kR16)));
        __m512i q[8];
        unpack<Plain>(u + (kMin ? 2 * kR16 : 0), q);  // Q4_1 / Q5_1: the quants follow the mins
        for (int t = 0; t < NA; ++t) {
            const int8_t* a = reinterpret_cast<const Act*>(static_cast<const char*>(act) + t * as)[b].qs;
            const __m512i s = block_dot(q, a, kMin ? _mm512_setzero_si512() : _mm512_set1_epi32(seed[t * nb + b]));
            const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(ad[t * nb + b]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
            if constexpr (kMin) acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sa[t * nb + b]), acc[t]);
        }
    }
    for (int gi = 0; gi < G; ++gi)
        for (int t = 0; t < NA; ++t) _mm512_storeu_ps(Y + kR16 * gi + t * y_stride, accs[gi][t]);
}

template <GgmlType Base>
void gemm_rows(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
               const int32_t* seed, int nt, float* Y, size_t y_stride) {
    by_tile(nt, ng, [&](auto na, auto g) { gemm<Base, na, g>(nb, group, act, as, ad, seed, nullptr, Y, y_stride); });
}

// Q4_K, per super-block: the 16 rows' d, dmin and 6-bit scales / mins decoded in lanes (sc_j, m_j as
// float), the 8 sub-blocks' nibbles unpacked once; per activation row
//   acc += d_a * (d * sum_j sc_j * isum_j - dmin * sum_j m_j * S_j)
// with isum_j the exact dpbusd sum of sub-block j and S_j its activation sum (from the bsums).
// Q5_K (Q5): the same, each nibble given its fifth bit (+16 under the qh masks) before the products.
// Not kept: the scales as integers (bytes picked by vpshufb, sum_j sc_j * isum_j by vpmulld, the mins by
// vpdpwssd against the sub-block sums paired as int16: ~60 of ~350 vector ops a super-block fewer at 1 row,
// the same results): 1.03-1.18x from L3, but from memory, in alternation (2 threads, 256 MiB, read at
// 50-53 GB/s, ~400 rounds) Q4_K 0.97x, MoE layers at T=1 1.0-1.03x the time; with the far prefetch at 8
// or 10 KiB, worse. As with the prefetch loop (r16_prefetch.h), less work did not stream faster.
template <bool Q5, int NA, int G>
void gemm_q4k(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad, const float* sub_sums,
              float* Y, size_t y_stride) {
    constexpr size_t unit = (Q5 ? 176 : 144) * kR16;
    __m512 accs[G][NA];
    for (auto& acc : accs)
        for (int t = 0; t < NA; ++t) acc[t] = _mm512_setzero_ps();
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15), two = _mm512_set1_epi32(3);
    const __m512i nib = _mm512_set1_epi8(0x0F), nib_hi = _mm512_set1_epi8(static_cast<char>(0xF0));
    const __m512 sixteenth = _mm512_set1_ps(1.0f / 16);
    const __m512i sixteen = _mm512_set1_epi8(16);
    for (int64_t step = 0; step < G * nb; ++step) {  // the G groups' block b side by side
        const GroupStep<unit, G> pos(group, nb, step);
        const int64_t b = pos.b;
        __m512* acc = accs[pos.gi];
        const uint8_t* u = pos.u;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)));
        const __m512 dm = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 32)));
        const __m512i v0 = _mm512_loadu_si512(u + 64), v1 = _mm512_loadu_si512(u + 128);
        const __m512i v2 = _mm512_loadu_si512(u + 192);
        __m512 sc[8], mn[8];  // get_scale_min_k4, one row per lane
        for (int j = 0; j < 4; ++j) {
            sc[j] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v0, 8 * j), six));
            mn[j] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v1, 8 * j), six));
            const __m512i hs = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v0, 8 * j + 6), two), 4);
            const __m512i hm = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v1, 8 * j + 6), two), 4);
            const __m512i ls = _mm512_and_si512(_mm512_srli_epi32(v2, 8 * j), four);
            const __m512i lm = _mm512_and_si512(_mm512_srli_epi32(v2, 8 * j + 4), four);
            sc[j + 4] = _mm512_cvtepi32_ps(_mm512_or_si512(ls, hs));
            mn[j + 4] = _mm512_cvtepi32_ps(_mm512_or_si512(lm, hm));
        }
        __m512 sum_sc[NA], sum_m[NA];
        for (int t = 0; t < NA; ++t) sum_sc[t] = sum_m[t] = _mm512_setzero_ps();
        const uint8_t* qs = u + 256;
        for (int i = 0; i < 4; ++i) {  // sub-blocks 2i (low nibbles) and 2i + 1 (high)
            prefetch_kquant<unit, 4>(u, i, pos.wrap);
            // the high nibbles are multiplied in place (x & 0xF0 = 16 q, and 16 q * a stays exact in
            // int32); their scale divided by 16, so the products are the same floats bit for bit
            const __m512 sc_hi = Q5 ? sc[2 * i + 1] : _mm512_mul_ps(sc[2 * i + 1], sixteenth);
            __m512i lo[8], hi[8];
            for (int k = 0; k < 8; ++k) {
                const __m512i x = _mm512_loadu_si512(qs + 512 * i + 64 * k);
                lo[k] = _mm512_and_si512(x, nib);
                if constexpr (Q5) {  // q = nibble + 16 * fifth bit (0..31), the high nibbles shifted down
                    uint64_t bits[2];
                    std::memcpy(bits, u + 2304 + 128 * i + 16 * k, sizeof(bits));
                    lo[k] = _mm512_mask_add_epi8(lo[k], _cvtu64_mask64(bits[0]), lo[k], sixteen);
                    hi[k] = _mm512_and_si512(_mm512_srli_epi16(x, 4), nib);
                    hi[k] = _mm512_mask_add_epi8(hi[k], _cvtu64_mask64(bits[1]), hi[k], sixteen);
                } else {
                    hi[k] = _mm512_and_si512(x, nib_hi);  // 16 x the high nibble: sc_hi carries the 1/16
                }
            }
            for (int t = 0; t < NA; ++t) {
                const auto& y = reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as)[b];
                const int8_t* a0 = y.qs + 64 * i;
                __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
                for (int k = 0; k < 8; ++k) {
                    s0 = _mm512_dpbusd_epi32(s0, lo[k], bcast32(a0 + 4 * k));
                    s1 = _mm512_dpbusd_epi32(s1, hi[k], bcast32(a0 + 32 + 4 * k));
                }
                sum_sc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), sc[2 * i], sum_sc[t]);
                sum_sc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), sc_hi, sum_sc[t]);
            }
        }
        for (int t = 0; t < NA; ++t) {
            const float* S = sub_sums + (t * nb + b) * 8;
            for (int j = 0; j < 8; ++j) sum_m[t] = _mm512_fmadd_ps(mn[j], _mm512_set1_ps(S[j]), sum_m[t]);
            const __m512 da = _mm512_set1_ps(ad[t * nb + b]);
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), sum_sc[t], acc[t]);
            acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(dm, da), sum_m[t], acc[t]);
        }
    }
    for (int gi = 0; gi < G; ++gi)
        for (int t = 0; t < NA; ++t) _mm512_storeu_ps(Y + kR16 * gi + t * y_stride, accs[gi][t]);
}

// Q6_K, per super-block: 16 sub-blocks of 16 values, each with a signed 8-bit scale per row. Per half
// n and quarter g the 8 quant vectors (4 low bits from ql, 2 high bits from qh, unsigned 0..63) are
// built once for all activation rows; per activation row and sub-block s the exact integer sum
//   isum_s = seed_s (-32 * sum of its activation quants) + 4 dpbusd
// is scaled by the rows' scales in lanes (vpmulld) and summed over the super-block, then
//   acc += float(sum_s sc_s * isum_s) * d_w * d_a          (llama.cpp's integer order, one row per lane)
//
// Half n of a super-block (at u), quarter by quarter g: values 128n + 32g + 4k + l, sub-blocks 8n + 2g
// (k < 4) and + 1; isum[t] += sum_s sc_s * isum_s over the half.
template <int NA>
inline __attribute__((always_inline)) void q6k_half(const uint8_t* u, int n, Wrap wrap, const void* act, size_t as,
                                                     int64_t b, const int32_t* seed, int64_t seed_stride,
                                                     __m512i* isum) {
    constexpr size_t unit = 210 * kR16;
    const __m512i nib = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
    const uint8_t *sc = u + 32, *ql = u + 288, *qh = u + 2336;
    for (int g = 0; g < 4; ++g) {
        prefetch_kquant<unit, 8>(u, 4 * n + g, wrap);
        __m512i q[8];
        for (int k = 0; k < 8; ++k) {
            const __m512i x = _mm512_loadu_si512(ql + 64 * (16 * n + 8 * (g & 1) + k));
            const __m512i h = _mm512_loadu_si512(qh + 64 * (8 * n + k));
            const __m512i low = _mm512_and_si512(g < 2 ? x : _mm512_srli_epi16(x, 4), nib);
            // bits 2g, 2g + 1 of qh to bits 4, 5 (16-bit shifts: what crosses a byte is masked off)
            const __m512i hb = g == 0 ? _mm512_slli_epi16(h, 4)
                               : g == 1 ? _mm512_slli_epi16(h, 2)
                               : g == 2 ? h
                                        : _mm512_srli_epi16(h, 2);
            q[k] = _mm512_ternarylogic_epi32(low, hb, top, 0xF8);  // low | (hb & top)
        }
        const int s = 8 * n + 2 * g;
        const __m512i sa = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16 * s)));
        const __m512i sb = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16 * (s + 1))));
        for (int t = 0; t < NA; ++t) {
            const int8_t* a =
                reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as)[b].qs + 128 * n + 32 * g;
            const int32_t* sd = seed + t * seed_stride + s;
            __m512i s0 = _mm512_set1_epi32(sd[0]), s1 = _mm512_set1_epi32(sd[1]);
            for (int k = 0; k < 4; ++k) {
                s0 = _mm512_dpbusd_epi32(s0, q[k], bcast32(a + 4 * k));
                s1 = _mm512_dpbusd_epi32(s1, q[k + 4], bcast32(a + 16 + 4 * k));
            }
            const __m512i scaled = _mm512_add_epi32(_mm512_mullo_epi32(s0, sa), _mm512_mullo_epi32(s1, sb));
            isum[t] = _mm512_add_epi32(isum[t], scaled);
        }
    }
}

// The same for NA <= 2 activation rows (decode), the loops turned inside out: per k the two ql
// vectors and the qh vector are loaded once for the four quarters g (q6k_half loads ql twice and qh
// four times, which pays only where many rows share the unpacking), and a row's 8 sub-block sums stay in
// registers. The same integers; one thread, 2048 x ~2000 from L3: 43 -> 52 GB/s at 1 row, 34 -> 39 at 2.
template <int NA>
inline __attribute__((always_inline)) void q6k_half_few(const uint8_t* u, int n, Wrap wrap, const void* act,
                                                         size_t as, int64_t b, const int32_t* seed,
                                                         int64_t seed_stride, __m512i* isum) {
    constexpr size_t unit = 210 * kR16;
    const __m512i nib = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
    const uint8_t *sc = u + 32, *ql = u + 288 + 64 * 16 * n, *qh = u + 2336 + 64 * 8 * n;
    const int8_t* a[NA];
    __m512i s[NA][8];  // sub-block 8n + j
    for (int t = 0; t < NA; ++t) {
        a[t] = reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as)[b].qs + 128 * n;
        for (int j = 0; j < 8; ++j) s[t][j] = _mm512_set1_epi32(seed[t * seed_stride + 8 * n + j]);
    }
#pragma GCC unroll 8  // s indexed by constants: registers, not the stack (not unrolled: 0.6x the speed)
    for (int k = 0; k < 8; ++k) {
        // every other step a share of ~7 lines: in 16 shares of ~3 lines, one a step, 256 MiB matrices of 2048
        // and 8192 columns read 0.7-3 points less of a read in alternation with them at 38-58 GB/s (~3600
        // pairs each, 2 threads), the same at 31; in 4 shares the same as in 16, in 2 shares less
        if (k % 2 == 0) prefetch_kquant<unit, 8>(u, 4 * n + k / 2, wrap);
        const __m512i x0 = _mm512_loadu_si512(ql + 64 * k), x1 = _mm512_loadu_si512(ql + 64 * (8 + k));
        const __m512i h = _mm512_loadu_si512(qh + 64 * k);
        // quarter g: the low or high nibbles of x0 / x1, bits 2g, 2g + 1 of h to bits 4, 5
        const __m512i q[4] = {
            _mm512_ternarylogic_epi32(_mm512_and_si512(x0, nib), _mm512_slli_epi16(h, 4), top, 0xF8),
            _mm512_ternarylogic_epi32(_mm512_and_si512(x1, nib), _mm512_slli_epi16(h, 2), top, 0xF8),
            _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(x0, 4), nib), h, top, 0xF8),
            _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(x1, 4), nib), _mm512_srli_epi16(h, 2), top,
                                      0xF8)};
        for (int t = 0; t < NA; ++t)
            for (int g = 0; g < 4; ++g)
                s[t][2 * g + k / 4] = _mm512_dpbusd_epi32(s[t][2 * g + k / 4], q[g], bcast32(a[t] + 32 * g + 4 * k));
    }
    for (int j = 0; j < 8; ++j) {
        const __m512i scale =
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16 * (8 * n + j))));
        for (int t = 0; t < NA; ++t) isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(s[t][j], scale));
    }
}

template <int NA, int G>
void gemm_q6k(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad, const int32_t* seed,
              float* Y, size_t y_stride) {
    constexpr size_t unit = 210 * kR16;
    __m512 accs[G][NA];
    for (auto& acc : accs)
        for (int t = 0; t < NA; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t step = 0; step < G * nb; ++step) {  // the G groups' block b side by side
        const GroupStep<unit, G> pos(group, nb, step);
        const int64_t b = pos.b;
        __m512* acc = accs[pos.gi];
        const uint8_t* u = pos.u;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)));
        __m512i isum[NA];
        for (int t = 0; t < NA; ++t) isum[t] = _mm512_setzero_si512();
        for (int n = 0; n < 2; ++n) {
            if constexpr (NA <= 2) q6k_half_few<NA>(u, n, pos.wrap, act, as, b, seed + b * 16, nb * 16, isum);
            else q6k_half<NA>(u, n, pos.wrap, act, as, b, seed + b * 16, nb * 16, isum);
        }
        for (int t = 0; t < NA; ++t)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(dw, _mm512_set1_ps(ad[t * nb + b])),
                                     acc[t]);
    }
    for (int gi = 0; gi < G; ++gi)
        for (int t = 0; t < NA; ++t) _mm512_storeu_ps(Y + kR16 * gi + t * y_stride, accs[gi][t]);
}

}  // namespace

void gemm_r16_q6k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                  const int32_t* seed, int nt, float* Y, size_t y_stride) {
    by_tile(nt, ng, [&](auto na, auto g) { gemm_q6k<na, g>(nb, group, act, as, ad, seed, Y, y_stride); });
}

void prep_r16_q6k(const void* act, size_t as, int nt, int64_t nb, float* ad, int32_t* seed) {
    for (int t = 0; t < nt; ++t) {
        const auto* y = reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as);
        for (int64_t b = 0; b < nb; ++b) {
            ad[t * nb + b] = y[b].d;
            for (int s = 0; s < 16; ++s) seed[(t * nb + b) * 16 + s] = -32 * y[b].bsums[s];
        }
    }
}

void gemm_r16_q4k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride) {
    by_tile(nt, ng, [&](auto na, auto g) { gemm_q4k<false, na, g>(nb, group, act, as, ad, sub_sums, Y, y_stride); });
}

void gemm_r16_q5k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride) {
    by_tile(nt, ng, [&](auto na, auto g) { gemm_q4k<true, na, g>(nb, group, act, as, ad, sub_sums, Y, y_stride); });
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

void gemm_r16_min(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride,
                  const float* ad, const float* sa, int nt, float* Y, size_t y_stride) {
    by_tile(nt, ng, [&](auto na, auto g) {
        constexpr int NA = decltype(na)::value, G = decltype(g)::value;
        if (base == GgmlType::Q5_1)
            gemm<GgmlType::Q5_1, NA, G>(nb, group, act, act_stride, ad, nullptr, sa, Y, y_stride);
        else gemm<GgmlType::Q4_1, NA, G>(nb, group, act, act_stride, ad, nullptr, sa, Y, y_stride);
    });
}

void prep_r16_min(const void* act, size_t act_stride, int nt, int64_t nb, float* ad, float* sa) {
    for (int t = 0; t < nt; ++t) {
        const auto* y = reinterpret_cast<const block_q8_1*>(static_cast<const char*>(act) + t * act_stride);
        for (int64_t b = 0; b < nb; ++b) {
            ad[t * nb + b] = _cvtsh_ss(y[b].d);
            sa[t * nb + b] = _cvtsh_ss(y[b].s);
        }
    }
}

void gemm_r16(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride,
              const float* ad, const int32_t* seed, int nt, float* Y, size_t y_stride) {
    switch (base) {
        case GgmlType::Q4_0:
            return gemm_rows<GgmlType::Q4_0>(nb, group, ng, act, act_stride, ad, seed, nt, Y, y_stride);
        case GgmlType::Q5_0:
            return gemm_rows<GgmlType::Q5_0>(nb, group, ng, act, act_stride, ad, seed, nt, Y, y_stride);
        case GgmlType::Q8_0:
            return gemm_rows<GgmlType::Q8_0>(nb, group, ng, act, act_stride, ad, seed, nt, Y, y_stride);
        default: return;
    }
}

void prep_r16(const void* act, size_t act_stride, int nt, int64_t nb, int off, float* ad, int32_t* seed) {
    const __m256i ones = _mm256_set1_epi8(1);
    for (int t = 0; t < nt; ++t) {
        const auto* y = reinterpret_cast<const block_q8_0*>(static_cast<const char*>(act) + t * act_stride);
        for (int64_t b = 0; b < nb; ++b) {
            // sum of the 32 signed quants: dpbusd(1, a) in 8 lanes, then across them
            const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones,
                                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs)));
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
            seed[t * nb + b] = -off * _mm_cvtsi128_si32(h);
            ad[t * nb + b] = _cvtsh_ss(y[b].d);
        }
    }
}

}  // namespace tandem::detail::avx512_vnni

#if defined(__clang__)
#pragma clang attribute pop
#endif
