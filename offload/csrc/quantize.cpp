// GGUF block quantizers: scalar references, the AVX2 / AVX-512 variants (quantize_simd.inc, compiled
// once per ISA under a target pragma), run-time dispatch and the threaded driver.
//
// The scalar references follow quant/formats.py (numpy), which is the spec: llama.cpp's
// quantize_row_*_ref for the K-quants, gguf-py's formulas for the 32-value blocks. Where the two C
// references and numpy differ (NaN inputs, the sign of an all-zero Q4_0/Q5_0 block's scale), numpy wins:
//   - reductions propagate NaN (np.min / np.max), argmax picks the first NaN or the first largest |x|;
//   - float -> (u)int8 casts behave like numpy's (C truncation through int32, low byte kept);
//   - float -> half is numpy's (round to nearest even; NaN keeps its top payload bits).
// Compiled with -ffp-contract=off: a fused multiply-add would round differently.
#include "quantize.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TANDEM_QUANT_X86 1
#endif

namespace tandem {
namespace {

using namespace qk;

constexpr float GROUP_MAX_EPS = 1e-15f;

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// llama.cpp's nearest_int: round half to even through the 1.5*2^23 magic number, read off the bits
// (so out-of-range, infinite and NaN inputs give what C gives).
inline int nearest_int(float f) {
    const float v = f + 12582912.f;
    return static_cast<int>(bits_of(v) & 0x007fffff) - 0x00400000;
}

// numpy's float32 -> uint8/int8 cast: truncate through int32 (0x80000000 when out of range or NaN),
// keep the low byte.
inline uint8_t numpy_cast_u8(float f) {
    const int32_t i = (f >= -2147483648.f && f < 2147483648.f) ? static_cast<int32_t>(f) : INT32_MIN;
    return static_cast<uint8_t>(i & 0xff);
}

// numpy's float32 -> float16 (npy_floatbits_to_halfbits): round to nearest even, overflow to inf,
// NaN keeps the top 10 payload bits (and stays a NaN).
inline ggml_half fp32_to_fp16(float f) {
    uint32_t x = bits_of(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
    x &= 0x7fffffff;
    if (x >= 0x47800000u) {      // |f| >= 65536, inf or NaN
        if (x > 0x7f800000u) {
            uint16_t h = static_cast<uint16_t>(0x7c00u + ((x & 0x007fffffu) >> 13));
            if (h == 0x7c00u) h = 0x7c01u;
            return sign | h;
        }
        return sign | 0x7c00u;
    }
    if (x < 0x38800000u) {       // below the smallest normal half: the float add rounds to 2^-24 units
        const float t = float_of(x) + 0.5f;
        return sign | static_cast<uint16_t>(bits_of(t) - 0x3f000000u);
    }
    x += 0xc8000fffu + ((x >> 13) & 1);   // rebias the exponent (-112 << 23), round to nearest even
    return sign | static_cast<uint16_t>(x >> 13);
}

inline float fp16_to_fp32(ggml_half h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 0x1f) return float_of(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        const float v = static_cast<float>(mant) * 0x1p-24f;   // exact
        return sign ? -v : v;
    }
    return float_of(sign | ((exp + 112) << 23) | (mant << 13));
}

// np.argmax(|x|): the first NaN, else the first largest |x|. Returns that |x| and the signed x.
inline void numpy_signed_max(const float* x, int n, float& amax, float& max) {
    int best = 0;
    float a = std::fabs(x[0]);
    if (!std::isnan(a)) {
        for (int i = 1; i < n; ++i) {
            const float ai = std::fabs(x[i]);
            if (std::isnan(ai)) {
                a = ai, best = i;
                break;
            }
            if (ai > a) a = ai, best = i;
        }
    }
    amax = a;
    max = x[best];
}

// np.min / np.max: NaN propagates; ties keep the earlier value (numpy's own order between +0 and -0
// depends on its SIMD path, so blocks whose minimum is a mix of +0 and -0 have no portable answer).
inline float numpy_min(float acc, float v) { return (v < acc || std::isnan(v)) ? v : acc; }
inline float numpy_max(float acc, float v) { return (v > acc || std::isnan(v)) ? v : acc; }

// np.sign(v) * round-half-away(|v|), computed as gguf-py's np_roundf.
inline float numpy_roundf(float v) {
    const float a = std::fabs(v);
    const float floored = std::floor(a);
    const float b = floored + std::floor(2.f * (a - floored));
    const float s = v > 0 ? 1.f : (v < 0 ? -1.f : v);
    return s * b;
}

// The 12 bytes of 6-bit scales and mins of Q4_K / Q5_K (inverse of get_scale_min_k4).
inline void pack_scale_min_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* scales) {
    for (int j = 0; j < 4; ++j) {
        scales[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
        scales[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
        scales[j + 8] = (ls[j + 4] & 0xf) | ((lm[j + 4] & 0xf) << 4);
    }
}

// The super-block part of Q4_K / Q5_K after the per-sub-block search: quantize the 8 scales and mins
// to 6 bits. Returns d and dmin as halves, fills ls/lm and the packed scales.
inline void qkx_super_scales(const float* scales, const float* mins, uint8_t* ls, uint8_t* lm,
                             uint8_t* packed, ggml_half& d, ggml_half& dmin) {
    float max_scale = 0, max_min = 0;   // a strict `>` from 0: NaN never wins
    for (int j = 0; j < 8; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
        ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
        lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
    }
    pack_scale_min_k4(ls, lm, packed);
    d = fp32_to_fp16(max_scale / 63.f);
    dmin = fp32_to_fp16(max_min / 63.f);
}

// Q6_K's super-block scale from the 16 sub-block scales: the first largest |scale| (NaN never wins).
// Returns false for an all-zero block (the caller writes zeros).
inline bool q6_k_super_scale(const float* scales, int8_t* sc, ggml_half& d) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float a = std::fabs(scales[ib]);
        if (a > max_abs_scale) max_abs_scale = a, max_scale = scales[ib];
    }
    if (max_abs_scale < GROUP_MAX_EPS) return false;
    const float iscale = -128.f / max_scale;
    d = fp32_to_fp16(1 / iscale);
    for (int ib = 0; ib < 16; ++ib)
        sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
    return true;
}

inline void pack_q4_k(const uint8_t* L, uint8_t* qs) {
    for (int j = 0; j < QK_K; j += 64, qs += 32)
        for (int l = 0; l < 32; ++l) qs[l] = L[j + l] | (L[j + l + 32] << 4);
}

inline void pack_q5_k(const uint8_t* L, uint8_t* qh, uint8_t* qs) {
    std::memset(qh, 0, QK_K / 8);
    for (int k = 0; k < 8; ++k)
        for (int l = 0; l < 32; ++l) qh[l] |= (L[32 * k + l] >> 4) << k;
    for (int j = 0; j < QK_K; j += 64, qs += 32)
        for (int l = 0; l < 32; ++l) qs[l] = (L[j + l] & 0xf) | ((L[j + l + 32] & 0xf) << 4);
}

inline void pack_q6_k(const uint8_t* L, uint8_t* ql, uint8_t* qh) {
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t* q = L + j + l;
            ql[l] = (q[0] & 0xf) | ((q[64] & 0xf) << 4);
            ql[l + 32] = (q[32] & 0xf) | ((q[96] & 0xf) << 4);
            qh[l] = (q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6);
        }
    }
}

inline void bsums_q8_k(block_q8_K& y) {
    for (int j = 0; j < QK_K / 16; ++j) {
        int sum = 0;
        for (int i = 0; i < 16; ++i) sum += y.qs[16 * j + i];
        y.bsums[j] = static_cast<int16_t>(sum);
    }
}

// =============================================================================================== scalar

namespace scalar {

void q8_0(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q8_0* y = static_cast<block_q8_0*>(dst);
    const int64_t nb = nrows * n / QK8_0;
    for (int64_t i = 0; i < nb; ++i, x += QK8_0) {
        float amax = std::fabs(x[0]);
        for (int j = 1; j < QK8_0; ++j) amax = numpy_max(amax, std::fabs(x[j]));
        const float d = amax / 127.f;
        const float id = d == 0 ? 0.f : 1.f / d;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; ++j) y[i].qs[j] = static_cast<int8_t>(numpy_cast_u8(numpy_roundf(x[j] * id)));
    }
}

// Q4_0 (nmax 8, 4 bits) and Q5_0 (nmax 16, 5 bits): d = max / -nmax, q = min(2nmax-1, trunc(x/d + nmax + 0.5))
template <int NMAX>
inline float q_0_block(const float* x, uint8_t* q, ggml_half& d_out) {
    float amax, max;
    numpy_signed_max(x, 32, amax, max);
    const float d = max / static_cast<float>(-NMAX);
    const float id = d == 0 ? 0.f : 1.f / d;
    d_out = fp32_to_fp16(d);
    for (int j = 0; j < 32; ++j)
        q[j] = std::min<uint8_t>(2 * NMAX - 1, numpy_cast_u8(x[j] * id + (NMAX + 0.5f)));
    return d;
}

void q4_0(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q4_0* y = static_cast<block_q4_0*>(dst);
    const int64_t nb = nrows * n / QK4_0;
    uint8_t q[32];
    for (int64_t i = 0; i < nb; ++i, x += QK4_0) {
        q_0_block<8>(x, q, y[i].d);
        for (int j = 0; j < 16; ++j) y[i].qs[j] = q[j] | (q[j + 16] << 4);
    }
}

inline void pack_q5(const uint8_t* q, uint8_t* qh, uint8_t* qs) {
    uint32_t h = 0;
    for (int j = 0; j < 32; ++j) h |= static_cast<uint32_t>(q[j] >> 4) << j;
    for (int j = 0; j < 4; ++j) qh[j] = static_cast<uint8_t>(h >> (8 * j));
    for (int j = 0; j < 16; ++j) qs[j] = (q[j] & 0xf) | (q[j + 16] << 4);
}

void q5_0(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q5_0* y = static_cast<block_q5_0*>(dst);
    const int64_t nb = nrows * n / QK5_0;
    uint8_t q[32];
    for (int64_t i = 0; i < nb; ++i, x += QK5_0) {
        q_0_block<16>(x, q, y[i].d);
        pack_q5(q, y[i].qh, y[i].qs);
    }
}

// Q4_1 / Q5_1: d = (max - min) / levels, q = min(levels, trunc((x - min)/d + 0.5))
template <int LEVELS>
inline void q_1_block(const float* x, uint8_t* q, ggml_half& d_out, ggml_half& m_out) {
    float lo = x[0], hi = x[0];
    for (int j = 1; j < 32; ++j) lo = numpy_min(lo, x[j]), hi = numpy_max(hi, x[j]);
    const float d = (hi - lo) / static_cast<float>(LEVELS);
    const float id = d == 0 ? 0.f : 1.f / d;
    d_out = fp32_to_fp16(d);
    m_out = fp32_to_fp16(lo);
    for (int j = 0; j < 32; ++j) q[j] = std::min<uint8_t>(LEVELS, numpy_cast_u8((x[j] - lo) * id + 0.5f));
}

void q4_1(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q4_1* y = static_cast<block_q4_1*>(dst);
    const int64_t nb = nrows * n / QK4_1;
    uint8_t q[32];
    for (int64_t i = 0; i < nb; ++i, x += QK4_1) {
        q_1_block<15>(x, q, y[i].d, y[i].m);
        for (int j = 0; j < 16; ++j) y[i].qs[j] = q[j] | (q[j + 16] << 4);
    }
}

void q5_1(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q5_1* y = static_cast<block_q5_1*>(dst);
    const int64_t nb = nrows * n / QK5_1;
    uint8_t q[32];
    for (int64_t i = 0; i < nb; ++i, x += QK5_1) {
        q_1_block<31>(x, q, y[i].d, y[i].m);
        pack_q5(q, y[i].qh, y[i].qs);
    }
}

// llama.cpp's make_qkx2_quants (use_mad = false); sums accumulate sequentially from the first term,
// min/max as numpy's.
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        min = numpy_min(min, x[i]);
        max = numpy_max(max, x[i]);
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - min))));
        L[i] = static_cast<uint8_t>(l);
        float diff = scale * l + min - x[i];
        diff = diff * diff;
        const float e = weights[i] * diff;
        best_error = i ? best_error + e : e;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - min))));
            Laux[i] = static_cast<uint8_t>(l);
            const float wl = weights[i] * l;
            sum_l = i ? sum_l + wl : wl;
            sum_l2 = i ? sum_l2 + wl * l : wl * l;
            sum_xl = i ? sum_xl + wl * x[i] : wl * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = diff * diff;
                const float e = weights[i] * diff;
                cur_error = i ? cur_error + e : e;
            }
            if (cur_error < best_error) {
                std::memcpy(L, Laux, n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// quantize_row_q4_K_ref (NMAX 15) / quantize_row_q5_K_ref (NMAX 31) up to the bit packing.
template <int NMAX>
void qkx_block(const float* x, uint8_t* L, ggml_half& d, ggml_half& dmin, uint8_t* packed) {
    constexpr float rmin = NMAX == 15 ? -1.f : -0.5f;
    constexpr int nstep = NMAX == 15 ? 20 : 15;
    float weights[32], mins[8], scales[8];
    uint8_t Laux[32], ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
        const float* xj = x + 32 * j;
        float sum_x2 = xj[0] * xj[0];
        for (int l = 1; l < 32; ++l) sum_x2 += xj[l] * xj[l];
        const float av_x = std::sqrt(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xj[l]);
        scales[j] = make_qkx2_quants(32, NMAX, xj, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep);
    }
    qkx_super_scales(scales, mins, ls, lm, packed, d, dmin);
    const float df = fp16_to_fp32(d), dminf = fp16_to_fp32(dmin);
    for (int j = 0; j < 8; ++j) {
        const float dj = df * ls[j];
        if (dj == 0) continue;   // keeps the search's L
        const float dm = dminf * lm[j];
        for (int ii = 0; ii < 32; ++ii)
            L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(NMAX, nearest_int((x[32 * j + ii] + dm) / dj))));
    }
}

void q4_k(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q4_K* y = static_cast<block_q4_K*>(dst);
    const int64_t nb = nrows * n / QK_K;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; ++i, x += QK_K) {
        qkx_block<15>(x, L, y[i].d, y[i].dmin, y[i].scales);
        pack_q4_k(L, y[i].qs);
    }
}

void q5_k(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q5_K* y = static_cast<block_q5_K*>(dst);
    const int64_t nb = nrows * n / QK_K;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; ++i, x += QK_K) {
        qkx_block<31>(x, L, y[i].d, y[i].dmin, y[i].scales);
        pack_q5_k(L, y[i].qh, y[i].qs);
    }
}

// llama.cpp's make_qx_quants with rmse_type = 1 and no importance weights; L in 0..2*nmax-1.
float make_qx_quants_rmse1(int n, int nmax, const float* x, uint8_t* L) {
    float amax, max;
    numpy_signed_max(x, n, amax, max);
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    auto sums = [&](float iscale, float& sumlx, float& suml2, bool keep) {
        for (int i = 0; i < n; ++i) {
            const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
            if (keep) L[i] = static_cast<uint8_t>(nmax + l);
            const float w = x[i] * x[i];
            const float a = w * x[i] * l, b = w * l * l;
            sumlx = i ? sumlx + a : a;
            suml2 = i ? suml2 + b : b;
        }
    };
    float iscale = -nmax / max;
    float sumlx, suml2;
    sums(iscale, sumlx, suml2, true);
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sums(iscale, sumlx, suml2, false);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            sums(iscale, sumlx, suml2, true);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

void q6_k(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q6_K* y = static_cast<block_q6_K*>(dst);
    const int64_t nb = nrows * n / QK_K;
    uint8_t L[QK_K];
    float scales[16];
    for (int64_t i = 0; i < nb; ++i, x += QK_K) {
        for (int ib = 0; ib < 16; ++ib) scales[ib] = make_qx_quants_rmse1(16, 32, x + 16 * ib, L + 16 * ib);
        if (!q6_k_super_scale(scales, y[i].scales, y[i].d)) {
            std::memset(&y[i], 0, sizeof(block_q6_K));
            continue;
        }
        const float df = fp16_to_fp32(y[i].d);
        for (int j = 0; j < 16; ++j) {
            const float d = df * y[i].scales[j];
            if (d == 0) continue;
            for (int ii = 0; ii < 16; ++ii)
                L[16 * j + ii] = static_cast<uint8_t>(32 + std::max(-32, std::min(31, nearest_int(x[16 * j + ii] / d))));
        }
        pack_q6_k(L, y[i].ql, y[i].qh);
    }
}

void q8_k(const float* x, void* dst, int64_t nrows, int64_t n) {
    block_q8_K* y = static_cast<block_q8_K*>(dst);
    const int64_t nb = nrows * n / QK_K;
    for (int64_t i = 0; i < nb; ++i, x += QK_K) {
        float amax, max;
        numpy_signed_max(x, QK_K, amax, max);
        if (amax == 0) {
            std::memset(&y[i], 0, sizeof(block_q8_K));
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; ++j) y[i].qs[j] = static_cast<int8_t>(std::min(127, nearest_int(iscale * x[j])));
        bsums_q8_k(y[i]);
        y[i].d = 1 / iscale;
    }
}

}  // namespace scalar

// =============================================================================================== SIMD

#ifdef TANDEM_QUANT_X86
#define TANDEM_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define TANDEM_TARGET_PUSH(t) TANDEM_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define TANDEM_TARGET_POP _Pragma("clang attribute pop")
#else
#define TANDEM_TARGET_PUSH(t) _Pragma("GCC push_options") TANDEM_PRAGMA(GCC target(t))
#define TANDEM_TARGET_POP _Pragma("GCC pop_options")
#endif

TANDEM_TARGET_PUSH("avx2")
namespace avx2 {
#define TANDEM_QUANT_AVX2 1
#include "quantize_simd.inc"
#undef TANDEM_QUANT_AVX2
}  // namespace avx2
TANDEM_TARGET_POP

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"   // GCC 12's _mm512_undefined_ps() in its own headers
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
TANDEM_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#define TANDEM_QUANT_AVX512 1
#include "quantize_simd.inc"
#undef TANDEM_QUANT_AVX512
}  // namespace avx512
TANDEM_TARGET_POP
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// =============================================================================================== dispatch

struct Variants {
    QuantType type;
    const char* name;
    int block_size, type_size;
    QuantizeRowsFn scalar, avx2, avx512;
};

#ifdef TANDEM_QUANT_X86
#define TANDEM_SIMD(fn) avx2::fn, avx512::fn
#else
#define TANDEM_SIMD(fn) nullptr, nullptr
#endif

const Variants kVariants[] = {
    {QuantType::Q4_0, "Q4_0", QK4_0, sizeof(block_q4_0), scalar::q4_0, TANDEM_SIMD(q4_0)},
    {QuantType::Q4_1, "Q4_1", QK4_1, sizeof(block_q4_1), scalar::q4_1, TANDEM_SIMD(q4_1)},
    {QuantType::Q5_0, "Q5_0", QK5_0, sizeof(block_q5_0), scalar::q5_0, TANDEM_SIMD(q5_0)},
    {QuantType::Q5_1, "Q5_1", QK5_1, sizeof(block_q5_1), scalar::q5_1, TANDEM_SIMD(q5_1)},
    {QuantType::Q8_0, "Q8_0", QK8_0, sizeof(block_q8_0), scalar::q8_0, TANDEM_SIMD(q8_0)},
    {QuantType::Q4_K, "Q4_K", QK_K, sizeof(block_q4_K), scalar::q4_k, TANDEM_SIMD(q4_k)},
    {QuantType::Q5_K, "Q5_K", QK_K, sizeof(block_q5_K), scalar::q5_k, TANDEM_SIMD(q5_k)},
    {QuantType::Q6_K, "Q6_K", QK_K, sizeof(block_q6_K), scalar::q6_k, TANDEM_SIMD(q6_k)},
    {QuantType::Q8_K, "Q8_K", QK_K, sizeof(block_q8_K), scalar::q8_k, TANDEM_SIMD(q8_k)},
};

const Variants* find_variants(QuantType type) {
    for (const Variants& v : kVariants)
        if (v.type == type) return &v;
    return nullptr;
}

}  // namespace

bool is_quant_type(int type_id) { return find_variants(static_cast<QuantType>(type_id)) != nullptr; }

const char* quant_type_name(QuantType type) {
    const Variants* v = find_variants(type);
    return v ? v->name : "?";
}

int quant_block_size(QuantType type) {
    const Variants* v = find_variants(type);
    return v ? v->block_size : 0;
}

int quant_type_size(QuantType type) {
    const Variants* v = find_variants(type);
    return v ? v->type_size : 0;
}

Isa quantize_variant_isa(QuantType type, Isa isa) {
    const Variants* v = find_variants(type);
    if (!v) return Isa::Scalar;
    if (static_cast<int>(isa) >= static_cast<int>(Isa::Avx512) && v->avx512) return Isa::Avx512;
    if (static_cast<int>(isa) >= static_cast<int>(Isa::Avx2) && v->avx2) return Isa::Avx2;
    return Isa::Scalar;
}

QuantizeRowsFn quantize_rows_fn(QuantType type, Isa isa) {
    const Variants* v = find_variants(type);
    if (!v) return nullptr;
    switch (quantize_variant_isa(type, isa)) {
        case Isa::Avx512: return v->avx512;
        case Isa::Avx2: return v->avx2;
        default: return v->scalar;
    }
}

#define TANDEM_DISPATCH(fn, type)                                                       \
    void quantize_rows_##fn(const float* src, void* dst, int64_t nrows, int64_t n) {  \
        static const QuantizeRowsFn f = quantize_rows_fn(QuantType::type, best_isa()); \
        f(src, dst, nrows, n);                                                          \
    }
TANDEM_DISPATCH(q8_0, Q8_0)
TANDEM_DISPATCH(q4_0, Q4_0)
TANDEM_DISPATCH(q5_0, Q5_0)
TANDEM_DISPATCH(q4_1, Q4_1)
TANDEM_DISPATCH(q5_1, Q5_1)
TANDEM_DISPATCH(q4_k, Q4_K)
TANDEM_DISPATCH(q5_k, Q5_K)
TANDEM_DISPATCH(q6_k, Q6_K)
TANDEM_DISPATCH(q8_k, Q8_K)
#undef TANDEM_DISPATCH

void quantize_rows_parallel(QuantType type, const float* src, void* dst, int64_t nrows, int64_t n_per_row,
                            int threads, Isa isa) {
    const Variants* v = find_variants(type);
    const QuantizeRowsFn fn = quantize_rows_fn(type, isa);
    if (!v || !fn || nrows <= 0 || n_per_row <= 0) return;
    const int64_t nblocks = nrows * (n_per_row / v->block_size);
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    // at least ~64k values per thread (a thread costs tens of microseconds to start); whole groups of
    // 4 blocks per thread, so the SIMD variants see full batches
    const int64_t min_blocks = std::max<int64_t>(4, (int64_t{1} << 16) / v->block_size);
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, nblocks / min_blocks));
    const int64_t per = ((nblocks + nt - 1) / nt + 3) & ~int64_t{3};
    auto run = [&](int64_t b0) {
        const int64_t count = std::min(per, nblocks - b0);
        if (count > 0)
            fn(src + b0 * v->block_size, static_cast<uint8_t*>(dst) + b0 * v->type_size, 1, count * v->block_size);
    };
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(nt - 1));
    int64_t t = 1;
    try {
        for (; t < nt; ++t) pool.emplace_back(run, t * per);
    } catch (const std::system_error&) {   // no more threads to be had: this one does the rest
    }
    for (int64_t r = t; r < nt; ++r) run(r * per);
    run(0);
    for (std::thread& th : pool) th.join();
}

// ---- dequantization (the numpy formulas of quant/formats.py, in their order of operations)

namespace {

template <class B, int Offset>
void dequantize_q_0(const void* src, int64_t nb, float* y) {  // Q4_0, Q5_0: x = d * (q - Offset)
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        const B& b = static_cast<const B*>(src)[i];
        uint32_t qh = 0;
        if constexpr (Offset == 16) std::memcpy(&qh, b.qh, 4);
        const float d = fp16_to_fp32(b.d);
        for (int j = 0; j < 16; ++j) {
            const int lo = (b.qs[j] & 0xF) | (Offset == 16 ? ((qh >> j) & 1) << 4 : 0);
            const int hi = (b.qs[j] >> 4) | (Offset == 16 ? ((qh >> (j + 16)) & 1) << 4 : 0);
            y[j] = d * static_cast<float>(lo - Offset);
            y[j + 16] = d * static_cast<float>(hi - Offset);
        }
    }
}

template <class B, bool kFifthBit>
void dequantize_q_1(const void* src, int64_t nb, float* y) {  // Q4_1, Q5_1: x = d * q + m
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        const B& b = static_cast<const B*>(src)[i];
        uint32_t qh = 0;
        if constexpr (kFifthBit) std::memcpy(&qh, b.qh, 4);
        const float d = fp16_to_fp32(b.d), m = fp16_to_fp32(b.m);
        for (int j = 0; j < 16; ++j) {
            const int lo = (b.qs[j] & 0xF) | (kFifthBit ? ((qh >> j) & 1) << 4 : 0);
            const int hi = (b.qs[j] >> 4) | (kFifthBit ? ((qh >> (j + 16)) & 1) << 4 : 0);
            y[j] = d * static_cast<float>(lo) + m;
            y[j + 16] = d * static_cast<float>(hi) + m;
        }
    }
}

template <class B, bool kFifthBit>
void dequantize_qx_k(const void* src, int64_t nb, float* y) {  // Q4_K, Q5_K: x = (d sc) q - (dmin m)
    for (int64_t i = 0; i < nb; ++i, y += QK_K) {
        const B& b = static_cast<const B*>(src)[i];
        const float d = fp16_to_fp32(b.d), dmin = fp16_to_fp32(b.dmin);
        for (int j = 0; j < 8; ++j) {  // sub-block j: nibble j % 2 of qs[32 (j / 2) + l]
            int sc, m;
            scale_min_k4(b.scales, j, sc, m);
            const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(m);
            for (int l = 0; l < 32; ++l) {
                int q = (b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
                if constexpr (kFifthBit) q |= ((b.qh[l] >> j) & 1) << 4;
                y[32 * j + l] = dl * static_cast<float>(q) - ml;
            }
        }
    }
}

void dequantize_q6_k(const void* src, int64_t nb, float* y) {  // x = (d scale) (q - 32)
    for (int64_t i = 0; i < nb; ++i, y += QK_K) {
        const block_q6_K& b = static_cast<const block_q6_K*>(src)[i];
        const float d = fp16_to_fp32(b.d);
        for (int v = 0; v < QK_K; ++v) {
            const int h = v / 128, r = v % 128, k = r / 32, l = r % 32;  // value 128h + 32k + l
            const int low = (b.ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0xF;
            const int high = (b.qh[32 * h + l] >> (2 * k)) & 3;
            y[v] = d * static_cast<float>(b.scales[v / 16]) * static_cast<float>((low | high << 4) - 32);
        }
    }
}

}  // namespace

bool dequantize_row(int type_id, const void* src, int64_t n, float* y) {
    switch (type_id) {
        case 0: std::memcpy(y, src, sizeof(float) * static_cast<size_t>(n)); return true;  // F32
        case 1:  // F16
            for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(static_cast<const ggml_half*>(src)[i]);
            return true;
        case 30:  // BF16
            for (int64_t i = 0; i < n; ++i)
                y[i] = float_of(static_cast<uint32_t>(static_cast<const uint16_t*>(src)[i]) << 16);
            return true;
        case 2: dequantize_q_0<block_q4_0, 8>(src, n / 32, y); return true;
        case 3: dequantize_q_1<block_q4_1, false>(src, n / 32, y); return true;
        case 6: dequantize_q_0<block_q5_0, 16>(src, n / 32, y); return true;
        case 7: dequantize_q_1<block_q5_1, true>(src, n / 32, y); return true;
        case 8:  // Q8_0: x = q * d
            for (int64_t i = 0; i < n / 32; ++i) {
                const block_q8_0& b = static_cast<const block_q8_0*>(src)[i];
                const float d = fp16_to_fp32(b.d);
                for (int j = 0; j < 32; ++j) y[32 * i + j] = static_cast<float>(b.qs[j]) * d;
            }
            return true;
        case 12: dequantize_qx_k<block_q4_K, false>(src, n / QK_K, y); return true;
        case 13: dequantize_qx_k<block_q5_K, true>(src, n / QK_K, y); return true;
        case 14: dequantize_q6_k(src, n / QK_K, y); return true;
        default: return false;
    }
}

}  // namespace tandem
