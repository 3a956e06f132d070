// The AVX2 and AVX-VNNI kernels for the row-interleaved layouts: their bodies, compiled by
// dot_r16_avx2.cpp (AVX2 + FMA + F16C) and dot_r16_avx_vnni.cpp (the same plus AVX-VNNI) with
//   TANDEM_R16_NS    the namespace (avx2 / avx_vnni)
//   TANDEM_R16_VNNI  1 where the 256-bit vpdpbusd replaces vpmaddubsw + vpmaddwd (sums in int32 throughout)
// Everything but the exported kernels has internal linkage, so no code of one build can be merged with
// the other's.
//
// Kernels for the row-interleaved layouts (repack.h): one group of 16 rows against up to 8 activation
// rows, for CPUs without AVX-512 VNNI. The schemes of dot_r16_vnni.cpp in 256-bit halves: lane j of a
// vector is row j of the half (rows 0-7 from the low 32 bytes of every 64-byte run of the layout, rows
// 8-15 from the high ones), and vpmaddubsw (unsigned quants x signed activations, pairs to int16) then
// vpmaddwd by ones where VNNI has vpdpbusd. The int16 pairs are summed over as many vectors as their
// bounds allow before each vpmaddwd (a pair is at most 2 * q_max * 128). Against the plain kernels
// (dot_simd.h, a row at a time) each broadcast activation dword serves 8 rows and the quants are unpacked
// once for every activation row. Up to 4 activation rows a pass: their sums and a block's unpacked quants
// fit the 16 vector registers.
// With AVX-VNNI (Intel client cores from Alder Lake on) vpdpbusd sums the products of four byte pairs
// straight into int32, one instruction where AVX2 takes two.
#pragma once

#if !defined(TANDEM_R16_NS) || !defined(TANDEM_R16_VNNI)
#error "define TANDEM_R16_NS and TANDEM_R16_VNNI before including dot_r16_simd256.h"
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "r16_prefetch.h"
#include "repack.h"

namespace tandem::detail::TANDEM_R16_NS {
namespace {

inline __attribute__((always_inline)) __m256i bcast32(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

constexpr bool kVnni = TANDEM_R16_VNNI;

// acc + the products of q's unsigned and a's signed bytes, four to an int32 lane: vpdpbusd on AVX-VNNI,
// vpmaddubsw + vpmaddwd in the AVX2 build (one vector only there: a pair must stay below 2^15, as Q8_0's
// |w| x sign(a, w) does; the other kernels sum several vectors in int16 first, without this)
inline __attribute__((always_inline)) __m256i dpbusd(__m256i acc, __m256i q, __m256i a) {
#if TANDEM_R16_VNNI
    return _mm256_dpbusd_avx_epi32(acc, q, a);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), _mm256_set1_epi16(1)));
#endif
}

// Byte i = 0xFF where bit i of the 32-bit word is set.
inline __attribute__((always_inline)) __m256i bits_to_bytes(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(  // byte i <- byte i / 8 of the word
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));  // byte i -> bit i % 8
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

// Q4_K (Q5_K: Q5), per super-block, half and activation row:
//   acc += d_a * (d * sum_j sc_j * isum_j - dmin * sum_j m_j * S_j)
// with isum_j the exact sum of sub-block j and S_j its activation sum (from the bsums).
template <bool Q5, int NA, int G>
__attribute__((noinline))
void gemm_q4k(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad, const float* sub_sums,
              float* Y, size_t y_stride) {
    constexpr size_t unit = (Q5 ? 176 : 144) * kR16;
    __m256 accs[G][NA][2];
    for (auto& acc : accs)
        for (int t = 0; t < NA; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const __m256i six = _mm256_set1_epi32(63), four = _mm256_set1_epi32(15), two = _mm256_set1_epi32(3);
    const __m256i nib = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16);
    for (int64_t step = 0; step < G * nb; ++step) {  // the G groups' block b side by side
        const GroupStep<unit, G> pos(group, nb, step);
        const int64_t b = pos.b;
        auto& acc = accs[pos.gi];
        const uint8_t* u = pos.u;
        const uint8_t* qs = u + 256;
        for (int h = 0; h < 2; ++h) {
            prefetch_share<unit, 2, kAhead, Prefetch::OneLevel>(u, h, pos.wrap);  // the weights stream from memory
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
                // a sub-block's products in int16 pairs (vpmaddubsw: quant x activation, two to a lane, at
                // most 2 * 15 * 128 = 3840, Q5_K 2 * 31 * 128 = 7936), summed over its 8 vectors (<= 30720)
                // or 4 (<= 31744) in int16, then to int32
                const __m256i ones = _mm256_set1_epi16(1);
                constexpr int NW = Q5 ? NA : 1;  // Q5_K's int32 sums of the first four vectors
                __m256i s0[NA], s1[NA], w0[NW], w1[NW];
                for (int t = 0; t < NA; ++t) s0[t] = s1[t] = _mm256_setzero_si256();
                for (int k = 0; k < 8; ++k) {
                    const __m256i x =
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 512 * i + 64 * k + 32 * h));
                    __m256i lo = _mm256_and_si256(x, nib), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
                    if constexpr (Q5) {  // the fifth bits (repack.h): bits 32h.. of the pair's words
                        uint32_t bits[2];
                        std::memcpy(&bits[0], u + 2304 + 128 * i + 16 * k + 4 * h, 4);
                        std::memcpy(&bits[1], u + 2304 + 128 * i + 16 * k + 8 + 4 * h, 4);
                        lo = _mm256_or_si256(lo, _mm256_and_si256(bits_to_bytes(bits[0]), sixteen));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(bits_to_bytes(bits[1]), sixteen));
                    }
                    for (int t = 0; t < NA; ++t) {
                        const int8_t* a0 =
                            reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as)[b].qs + 64 * i;
                        if constexpr (kVnni) {  // int32 sums throughout
                            s0[t] = dpbusd(s0[t], lo, bcast32(a0 + 4 * k));
                            s1[t] = dpbusd(s1[t], hi, bcast32(a0 + 32 + 4 * k));
                            continue;
                        }
                        s0[t] = _mm256_add_epi16(s0[t], _mm256_maddubs_epi16(lo, bcast32(a0 + 4 * k)));
                        s1[t] = _mm256_add_epi16(s1[t], _mm256_maddubs_epi16(hi, bcast32(a0 + 32 + 4 * k)));
                        if constexpr (Q5) {
                            if (k == 3) {
                                w0[t] = _mm256_madd_epi16(s0[t], ones), w1[t] = _mm256_madd_epi16(s1[t], ones);
                                s0[t] = s1[t] = _mm256_setzero_si256();
                            }
                        }
                    }
                }
                for (int t = 0; t < NA; ++t) {
                    __m256i j0 = s0[t], j1 = s1[t];
                    if constexpr (!kVnni) j0 = _mm256_madd_epi16(j0, ones), j1 = _mm256_madd_epi16(j1, ones);
                    if constexpr (Q5 && !kVnni) j0 = _mm256_add_epi32(w0[t], j0), j1 = _mm256_add_epi32(w1[t], j1);
                    const __m256 i0 = _mm256_cvtepi32_ps(j0), i1 = _mm256_cvtepi32_ps(j1);
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
    for (int gi = 0; gi < G; ++gi) {
        for (int t = 0; t < NA; ++t) {
            _mm256_storeu_ps(Y + kR16 * gi + t * y_stride, accs[gi][t][0]);
            _mm256_storeu_ps(Y + kR16 * gi + t * y_stride + 8, accs[gi][t][1]);
        }
    }
}

// Q4_0 / Q5_0: per block and half, the 8 quant vectors unsigned (Q4_0 0..15, Q5_0 0..31: the fifth bits
// from qh, bits 32h.. of each word), then per activation row
//   acc += float(seed + sum_k maddubs(q[k], a dword k)) * (d_w * d_a)
// seed = -off * sum(a) taking the offset off (prep_r16). vpmaddubsw pairs stay below 2 * 31 * 128 = 7936,
// so four vectors are summed in int16 (<= 31744) before each vpmaddwd to int32. Q8_0's signed quants go
// as |w| x sign(a, w) (a pair <= 2 * 128 * 127 = 32512: one vpmaddwd per vector; seed 0): as unsigned
// (w + 128, VNNI's way) a pair would saturate.
// Q4_1 / Q5_1 (kMin): Q4_0's / Q5_0's unsigned quants after the rows' mins, against Q8_1 (seed null; sa
// [nt][nb] = d_a * the sum of the block's activation quants): acc += float(sum) * (d_w d_a) + m_w sa.
template <GgmlType Base, int NA, int G>
__attribute__((noinline))
void gemm32(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad, const int32_t* seed,
            float* Y, size_t y_stride, const float* sa = nullptr) {
    constexpr bool kMin = Base == GgmlType::Q4_1 || Base == GgmlType::Q5_1;
    constexpr bool kFifth = Base == GgmlType::Q5_0 || Base == GgmlType::Q5_1;
    constexpr size_t unit = (Base == GgmlType::Q8_0   ? 34
                             : Base == GgmlType::Q5_1 ? 24
                             : Base == GgmlType::Q4_1 ? 20
                             : Base == GgmlType::Q5_0 ? 22
                                                      : 18) *
                            kR16;
    using Act = std::conditional_t<kMin, block_q8_1, block_q8_0>;
    __m256 accs[G][NA][2];
    for (auto& acc : accs)
        for (int t = 0; t < NA; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t step = 0; step < G * nb; ++step) {  // the G groups' block b side by side
        const GroupStep<unit, G> pos(group, nb, step);
        const int64_t b = pos.b;
        auto& acc = accs[pos.gi];
        const uint8_t* u = pos.u;
        prefetch_share<unit, 1, kAhead, Prefetch::OneLevel>(u, 0, pos.wrap);
        const uint8_t* qs = u + (kMin ? 4 : 2) * kR16;
        for (int h = 0; h < 2; ++h) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 16 * h)));
            __m256i q[8];
            if constexpr (Base == GgmlType::Q8_0) {
                for (int k = 0; k < 8; ++k)
                    q[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * k + 32 * h));
                for (int t = 0; t < NA; ++t) {
                    const int8_t* a = reinterpret_cast<const block_q8_0*>(static_cast<const char*>(act) + t * as)[b].qs;
                    __m256i s = _mm256_setzero_si256();
                    for (int k = 0; k < 8; ++k) {
                        const __m256i w = _mm256_sign_epi8(q[k], q[k]), x = _mm256_sign_epi8(bcast32(a + 4 * k), q[k]);
                        s = dpbusd(s, w, x);  // AVX2: a pair <= 2 * 128 * 127 = 32512, one vpmaddwd each
                    }
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s),
                                                _mm256_mul_ps(dw, _mm256_set1_ps(ad[t * nb + b])), acc[t][h]);
                }
                continue;
            }
            for (int m = 0; m < 4; ++m) {
                const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * m + 32 * h));
                q[m] = _mm256_and_si256(x, nib);
                q[m + 4] = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
            }
            if constexpr (kFifth) {
                for (int k = 0; k < 8; ++k) {
                    uint32_t bits;
                    std::memcpy(&bits, qs + 256 + 8 * k + 4 * h, 4);
                    q[k] = _mm256_or_si256(q[k], _mm256_and_si256(bits_to_bytes(bits), _mm256_set1_epi8(16)));
                }
            }
            for (int t = 0; t < NA; ++t) {
                const int8_t* a = reinterpret_cast<const Act*>(static_cast<const char*>(act) + t * as)[b].qs;
                __m256i s = kMin ? _mm256_setzero_si256() : _mm256_set1_epi32(seed[t * nb + b]);
                if constexpr (kVnni) {
                    for (int k = 0; k < 8; ++k) s = dpbusd(s, q[k], bcast32(a + 4 * k));
                } else {
                    for (int k0 = 0; k0 < 8; k0 += 4) {
                        __m256i p = _mm256_maddubs_epi16(q[k0], bcast32(a + 4 * k0));
                        for (int k = k0 + 1; k < k0 + 4; ++k)
                            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(q[k], bcast32(a + 4 * k)));
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                    }
                }
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(ad[t * nb + b])),
                                            acc[t][h]);
                if constexpr (kMin) {
                    const __m128i m16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 32 + 16 * h));
                    const __m256 mw = _mm256_cvtph_ps(m16);
                    acc[t][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(sa[t * nb + b]), acc[t][h]);
                }
            }
        }
    }
    for (int gi = 0; gi < G; ++gi) {
        for (int t = 0; t < NA; ++t) {
            _mm256_storeu_ps(Y + kR16 * gi + t * y_stride, accs[gi][t][0]);
            _mm256_storeu_ps(Y + kR16 * gi + t * y_stride + 8, accs[gi][t][1]);
        }
    }
}

// Q6_K: avx512_vnni::gemm_q6k's scheme (per half n and quarter g of a super-block the 8 quant vectors,
// unsigned 0..63, built once for all activation rows; per row and sub-block s the exact
//   isum_s = seed_s + sum of its 4 vectors' products, scaled by the rows' scales in lanes (vpmulld),
// summed over the super-block, then acc += float(sum) * d_w * d_a). Two vpmaddubsw pairs (<= 2 * 63 *
// 128 = 16128 each) are summed in int16 before each vpmaddwd.
template <int NA, int G>
__attribute__((noinline))
void gemm_q6k(int64_t nb, const uint8_t* group, const void* act, size_t as, const float* ad, const int32_t* seed,
              float* Y, size_t y_stride) {
    constexpr size_t unit = 210 * kR16;
    __m256 accs[G][NA][2];
    for (auto& acc : accs)
        for (int t = 0; t < NA; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const __m256i nib = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
    for (int64_t step = 0; step < G * nb; ++step) {  // the G groups' block b side by side
        const GroupStep<unit, G> pos(group, nb, step);
        const int64_t b = pos.b;
        auto& acc = accs[pos.gi];
        const uint8_t* u = pos.u;
        const uint8_t *sc = u + 32, *ql = u + 288, *qh = u + 2336;
        for (int h = 0; h < 2; ++h) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 16 * h)));
            __m256i isum[NA];
            for (int t = 0; t < NA; ++t) isum[t] = _mm256_setzero_si256();
            for (int n = 0; n < 2; ++n) {
                for (int g = 0; g < 4; ++g) {  // values 128n + 32g + 4k + l, sub-blocks 8n + 2g (k < 4) and + 1
                    prefetch_share<unit, 16, kAhead, Prefetch::L1>(u, 8 * h + 4 * n + g, pos.wrap);  // r16_prefetch.h
                    __m256i q[8];
                    for (int k = 0; k < 8; ++k) {
                        const uint8_t* xp = ql + 64 * (16 * n + 8 * (g & 1) + k) + 32 * h;
                        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
                        const __m256i hv =
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 64 * (8 * n + k) + 32 * h));
                        const __m256i low = _mm256_and_si256(g < 2 ? x : _mm256_srli_epi16(x, 4), nib);
                        // bits 2g, 2g + 1 of qh to bits 4, 5 (16-bit shifts: what crosses a byte is masked off)
                        const __m256i hb = g == 0 ? _mm256_slli_epi16(hv, 4)
                                           : g == 1 ? _mm256_slli_epi16(hv, 2)
                                           : g == 2 ? hv
                                                    : _mm256_srli_epi16(hv, 2);
                        q[k] = _mm256_or_si256(low, _mm256_and_si256(hb, top));
                    }
                    const int s = 8 * n + 2 * g;
                    auto scales = [&](int sub) {
                        int64_t v;
                        std::memcpy(&v, sc + 16 * sub + 8 * h, 8);
                        return _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v));
                    };
                    const __m256i sa = scales(s), sb = scales(s + 1);
                    for (int t = 0; t < NA; ++t) {
                        const auto& y = reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as)[b];
                        const int8_t* a = y.qs + 128 * n + 32 * g;
                        const int32_t* sd = seed + (t * nb + b) * 16 + s;
                        auto sub_sum = [&](const __m256i* qv, const int8_t* av, int32_t seed_s) {
                            if constexpr (kVnni) {
                                __m256i v = _mm256_set1_epi32(seed_s);
                                for (int k = 0; k < 4; ++k) v = dpbusd(v, qv[k], bcast32(av + 4 * k));
                                return v;
                            }
                            const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(qv[0], bcast32(av)),
                                                                _mm256_maddubs_epi16(qv[1], bcast32(av + 4)));
                            const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(qv[2], bcast32(av + 8)),
                                                                _mm256_maddubs_epi16(qv[3], bcast32(av + 12)));
                            const __m256i p0w = _mm256_madd_epi16(p0, ones), p1w = _mm256_madd_epi16(p1, ones);
                            return _mm256_add_epi32(_mm256_set1_epi32(seed_s), _mm256_add_epi32(p0w, p1w));
                        };
                        const __m256i s0 = sub_sum(q, a, sd[0]), s1 = sub_sum(q + 4, a + 16, sd[1]);
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(_mm256_mullo_epi32(s0, sa),
                                                                             _mm256_mullo_epi32(s1, sb)));
                    }
                }
            }
            for (int t = 0; t < NA; ++t)
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]),
                                            _mm256_mul_ps(dw, _mm256_set1_ps(ad[t * nb + b])), acc[t][h]);
        }
    }
    for (int gi = 0; gi < G; ++gi) {
        for (int t = 0; t < NA; ++t) {
            _mm256_storeu_ps(Y + kR16 * gi + t * y_stride, accs[gi][t][0]);
            _mm256_storeu_ps(Y + kR16 * gi + t * y_stride + 8, accs[gi][t][1]);
        }
    }
}

// f(t0, std::integral_constant<int, n>, std::integral_constant<int, ng>) for each pass of n <= 4
// activation rows from t0 over nt rows, over ng = 1 or 2 groups (the kernels stay out of line: inlined
// into this loop, Q4_K's ran 0.6-0.85x as fast)
template <int G, class F>
void by_pass(int nt, F&& f) {
    using G_ = std::integral_constant<int, G>;
    for (int t0 = 0; t0 < nt; t0 += 4) {
        switch (nt - t0 < 4 ? nt - t0 : 4) {
            case 1: f(t0, std::integral_constant<int, 1>{}, G_{}); break;
            case 2: f(t0, std::integral_constant<int, 2>{}, G_{}); break;
            case 3: f(t0, std::integral_constant<int, 3>{}, G_{}); break;
            default: f(t0, std::integral_constant<int, 4>{}, G_{}); break;
        }
    }
}
template <class F>
void by_pass(int nt, int ng, F&& f) {
    if (ng == 2) by_pass<2>(nt, f);
    else by_pass<1>(nt, f);
}

template <GgmlType Base>
void gemm32_rows(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                 const int32_t* seed, const float* sa, int nt, float* Y, size_t y_stride) {
    by_pass(nt, ng, [&](int t0, auto na, auto g) {
        gemm32<Base, na, g>(nb, group, static_cast<const char*>(act) + t0 * as, as, ad + t0 * nb,
                                          seed ? seed + t0 * nb : nullptr, Y + t0 * y_stride, y_stride,
                                          sa ? sa + t0 * nb : nullptr);
    });
}

template <bool Q5>
void gemm_qxk_rows(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                   const float* sub_sums, int nt, float* Y, size_t y_stride) {
    by_pass(nt, ng, [&](int t0, auto na, auto g) {
        gemm_q4k<Q5, na, g>(nb, group, static_cast<const char*>(act) + t0 * as, as, ad + t0 * nb,
                                          sub_sums + t0 * nb * 8, Y + t0 * y_stride, y_stride);
    });
}

}  // namespace

void gemm_r16_q6k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                  const int32_t* seed, int nt, float* Y, size_t y_stride) {
    by_pass(nt, ng, [&](int t0, auto na, auto g) {
        gemm_q6k<na, g>(nb, group, static_cast<const char*>(act) + t0 * as, as, ad + t0 * nb,
                                      seed + t0 * nb * 16, Y + t0 * y_stride, y_stride);
    });
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

void gemm_r16(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
              const int32_t* seed, int nt, float* Y, size_t y_stride) {
    switch (base) {
        case GgmlType::Q5_0:
            return gemm32_rows<GgmlType::Q5_0>(nb, group, ng, act, as, ad, seed, nullptr, nt, Y, y_stride);
        case GgmlType::Q8_0:
            return gemm32_rows<GgmlType::Q8_0>(nb, group, ng, act, as, ad, seed, nullptr, nt, Y, y_stride);
        default:
            return gemm32_rows<GgmlType::Q4_0>(nb, group, ng, act, as, ad, seed, nullptr, nt, Y, y_stride);
    }
}

void gemm_r16_min(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                  const float* sa, int nt, float* Y, size_t y_stride) {
    if (base == GgmlType::Q5_1) gemm32_rows<GgmlType::Q5_1>(nb, group, ng, act, as, ad, nullptr, sa, nt, Y, y_stride);
    else gemm32_rows<GgmlType::Q4_1>(nb, group, ng, act, as, ad, nullptr, sa, nt, Y, y_stride);
}

void prep_r16_min(const void* act, size_t as, int nt, int64_t nb, float* ad, float* sa) {
    for (int t = 0; t < nt; ++t) {
        const auto* y = reinterpret_cast<const block_q8_1*>(static_cast<const char*>(act) + t * as);
        for (int64_t b = 0; b < nb; ++b) {
            ad[t * nb + b] = _cvtsh_ss(y[b].d);
            sa[t * nb + b] = _cvtsh_ss(y[b].s);
        }
    }
}

void prep_r16(const void* act, size_t as, int nt, int64_t nb, int off, float* ad, int32_t* seed) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int t = 0; t < nt; ++t) {
        const auto* y = reinterpret_cast<const block_q8_0*>(static_cast<const char*>(act) + t * as);
        for (int64_t b = 0; b < nb; ++b) {
            const __m256i s = _mm256_madd_epi16(
                _mm256_maddubs_epi16(ones8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs))), ones16);
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
            seed[t * nb + b] = -off * _mm_cvtsi128_si32(h);
            ad[t * nb + b] = _cvtsh_ss(y[b].d);
        }
    }
}

void gemm_r16_q4k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride) {
    gemm_qxk_rows<false>(nb, group, ng, act, as, ad, sub_sums, nt, Y, y_stride);
}

void gemm_r16_q5k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t as, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride) {
    gemm_qxk_rows<true>(nb, group, ng, act, as, ad, sub_sums, nt, Y, y_stride);
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

}  // namespace tandem::detail::TANDEM_R16_NS

