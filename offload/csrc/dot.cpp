// Type table, activation quantizers, the scalar reference dot kernels, dispatch and matmul_rows.
// The SIMD kernels are in dot_simd.h (compiled per ISA by dot_avx2.cpp, dot_avx512.cpp,
// dot_avx512_vnni.cpp); this file is compiled for baseline x86-64 and runs anywhere.
#include "dot.h"

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dot_kernels.h"
#include "repack.h"

namespace tandem {

using qk::QK8_0;
using qk::QK_K;

// ---------------------------------------------------------------------------------------- types

namespace {

const TypeInfo kF32{"F32", 1, 4, true, GgmlType::F32};
const TypeInfo kF16{"F16", 1, 2, true, GgmlType::F16};
const TypeInfo kBF16{"BF16", 1, 2, true, GgmlType::BF16};
const TypeInfo kQ4_0{"Q4_0", 32, 18, true, GgmlType::Q8_0};
const TypeInfo kQ4_1{"Q4_1", 32, 20, true, GgmlType::Q8_1};
const TypeInfo kQ5_0{"Q5_0", 32, 22, true, GgmlType::Q8_0};
const TypeInfo kQ5_1{"Q5_1", 32, 24, true, GgmlType::Q8_1};
const TypeInfo kQ8_0{"Q8_0", 32, 34, true, GgmlType::Q8_0};
const TypeInfo kQ8_1{"Q8_1", 32, 36, false, GgmlType::Q8_1};
const TypeInfo kQ4_K{"Q4_K", 256, 144, true, GgmlType::Q8_K};
const TypeInfo kQ5_K{"Q5_K", 256, 176, true, GgmlType::Q8_K};
const TypeInfo kQ6_K{"Q6_K", 256, 210, true, GgmlType::Q8_K};
const TypeInfo kQ8_K{"Q8_K", 256, 292, false, GgmlType::Q8_K};
const TypeInfo kQ4_0_R16{"Q4_0_R16", 32, 18, true, GgmlType::Q8_0};
const TypeInfo kQ4_1_R16{"Q4_1_R16", 32, 20, true, GgmlType::Q8_1};
const TypeInfo kQ5_0_R16{"Q5_0_R16", 32, 22, true, GgmlType::Q8_0};
const TypeInfo kQ5_1_R16{"Q5_1_R16", 32, 24, true, GgmlType::Q8_1};
const TypeInfo kQ8_0_R16{"Q8_0_R16", 32, 34, true, GgmlType::Q8_0};
const TypeInfo kQ4_K_R16{"Q4_K_R16", 256, 144, true, GgmlType::Q8_K};
const TypeInfo kQ5_K_R16{"Q5_K_R16", 256, 176, true, GgmlType::Q8_K};
const TypeInfo kQ6_K_R16{"Q6_K_R16", 256, 210, true, GgmlType::Q8_K};

uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace

const TypeInfo* type_info(int32_t type_id) {
    switch (static_cast<GgmlType>(type_id)) {
        case GgmlType::F32: return &kF32;
        case GgmlType::F16: return &kF16;
        case GgmlType::BF16: return &kBF16;
        case GgmlType::Q4_0: return &kQ4_0;
        case GgmlType::Q4_1: return &kQ4_1;
        case GgmlType::Q5_0: return &kQ5_0;
        case GgmlType::Q5_1: return &kQ5_1;
        case GgmlType::Q8_0: return &kQ8_0;
        case GgmlType::Q8_1: return &kQ8_1;
        case GgmlType::Q4_K: return &kQ4_K;
        case GgmlType::Q5_K: return &kQ5_K;
        case GgmlType::Q6_K: return &kQ6_K;
        case GgmlType::Q8_K: return &kQ8_K;
        case GgmlType::Q4_0_R16: return &kQ4_0_R16;
        case GgmlType::Q4_1_R16: return &kQ4_1_R16;
        case GgmlType::Q5_0_R16: return &kQ5_0_R16;
        case GgmlType::Q5_1_R16: return &kQ5_1_R16;
        case GgmlType::Q8_0_R16: return &kQ8_0_R16;
        case GgmlType::Q4_K_R16: return &kQ4_K_R16;
        case GgmlType::Q5_K_R16: return &kQ5_K_R16;
        case GgmlType::Q6_K_R16: return &kQ6_K_R16;
    }
    return nullptr;
}

size_t row_size(GgmlType type, int64_t n) {
    const TypeInfo* t = type_info(static_cast<int32_t>(type));
    return t ? static_cast<size_t>(n / t->block_size) * t->type_size : 0;
}

// ---------------------------------------------------------------------------------------- conversions

float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));  // inf, NaN
    if (exp == 0) {
        if (man == 0) return float_of(sign);
        exp = 113;  // subnormal: normalize (value = man * 2^-24)
        while (!(man & 0x400u)) man <<= 1, --exp;
        return float_of(sign | (exp << 23) | ((man & 0x3FFu) << 13));
    }
    return float_of(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t float_to_half(float f) {
    const uint32_t x = bits_of(f);
    const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u | static_cast<uint16_t>((a >> 13) & 0x3FFu);  // NaN, quiet
    if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
    if (a < 0x38800000u) {                        // below 2^-14: a subnormal half (or zero)
        const uint32_t shift = 126 - (a >> 23);   // value = man * 2^(e-150) = (man >> shift) units of 2^-24
        if (shift > 24) return sign;
        const uint32_t man = (a & 0x7FFFFFu) | 0x800000u;
        uint32_t q = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) ++q;
        return sign | static_cast<uint16_t>(q);
    }
    const uint32_t r = a - 0x38000000u;  // rebias the exponent 127 -> 15
    return sign | static_cast<uint16_t>((r + 0xFFFu + ((r >> 13) & 1)) >> 13);
}

uint16_t float_to_bf16(float f) {
    uint32_t x = bits_of(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN, quiet
    return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1)) >> 16);
}

// ---------------------------------------------------------------------------------------- activation quantizers

namespace {

// _mm256_cvtps_epi32(_mm256_round_ps(v, NEAREST)): half to even for |v| < 2^22 (the 1.5*2^23 trick),
// INT_MIN for anything else (NaN, overflow), which the x86 quantizer's saturating packs make -128.
int32_t round_even_i32(float v) {
    if (!(std::fabs(v) < 4194304.0f)) return INT32_MIN;
    const float t = v + 12582912.0f;
    return static_cast<int32_t>(bits_of(t) & 0x007FFFFFu) - 0x00400000;
}

// llama.cpp's nearest_int (no range check, as its release build).
int nearest_int(float v) {
    const float t = v + 12582912.0f;
    return static_cast<int>(bits_of(t) & 0x007FFFFFu) - 0x00400000;
}

// Q8_0 / Q8_1 block (llama.cpp's x86 quantize_row_q8_0 / q8_1): returns d (f32) and the int32 sum of the
// rounded values before packing (wrapping like the vector adds; it only matters when 127/amax overflows).
float q8_block(const float* x, int8_t* qs, int32_t& sum) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    uint32_t s = 0;
    for (int j = 0; j < QK8_0; ++j) {
        const int32_t q = round_even_i32(x[j] * id);
        qs[j] = static_cast<int8_t>(std::clamp<int32_t>(q, -128, 127));
        s += static_cast<uint32_t>(q);
    }
    sum = static_cast<int32_t>(s);
    return d;
}

void quantize_q8_k(const float* x, block_q8_K& y) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK_K; ++j) {
        const float ax = std::fabs(x[j]);
        if (ax > amax) amax = ax, max = x[j];
    }
    if (amax == 0.0f) {
        std::memset(&y, 0, sizeof(y));
        return;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < QK_K; ++j) y.qs[j] = static_cast<int8_t>(std::min(127, nearest_int(iscale * x[j])));
    for (int g = 0; g < QK_K / 16; ++g) {
        int sum = 0;
        for (int l = 0; l < 16; ++l) sum += y.qs[16 * g + l];
        y.bsums[g] = static_cast<int16_t>(sum);
    }
    y.d = 1.0f / iscale;
}

}  // namespace

namespace {

// dot.cpp is built without floating-point contraction, and this has no FMA target: never fused.
__attribute__((target("avx2"))) void axpy_avx2(float w, const float* x, float* y, int64_t n) {
    const __m256 wv = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(wv, _mm256_loadu_ps(x + i))));
    for (; i < n; ++i) y[i] += w * x[i];
}

}  // namespace

void axpy(float w, const float* x, float* y, int64_t n, Isa isa) {
    if (isa >= Isa::Avx2) {
        require_isa(isa);
        return axpy_avx2(w, x, y, n);
    }
    for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

void swiglu(const float* g, const float* u, float* h, int64_t n, Isa isa) {
    if (isa >= Isa::Avx2) {
        require_isa(isa);
        return detail::avx2::swiglu(g, u, h, n);
    }
    for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

namespace {

// Whether x[0, n) holds a NaN (x != x, which -O3 keeps without -ffast-math), 16 or 8 lanes at a time where the
// ISA has them: a scalar scan took 3.7x the time of the Q8 quantizer it follows.
bool has_nan_scalar(const float* x, int64_t n) {
    int nan = 0;
    for (int64_t i = 0; i < n; ++i) nan |= x[i] != x[i];
    return nan != 0;
}

__attribute__((target("avx512f"))) bool has_nan_avx512(const float* x, int64_t n) {
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    return nan != 0 || has_nan_scalar(x + i, n - i);
}

__attribute__((target("avx2"))) bool has_nan_avx2(const float* x, int64_t n) {
    __m256 nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    return _mm256_movemask_ps(nan) != 0 || has_nan_scalar(x + i, n - i);
}

bool has_nan(const float* x, int64_t n, Isa isa) {
    if (isa >= Isa::Avx512) return has_nan_avx512(x, n);
    if (isa >= Isa::Avx2) return has_nan_avx2(x, n);
    return has_nan_scalar(x, n);
}

// Every block's scale of a Q8 activation row set to NaN, so that each product with the row is NaN as in float
// math (NaN * w): the quantizers take a block's scale from its largest magnitude, which passes over a NaN (and
// the scalar, AVX2 and AVX-512 maxima pass over it differently), and a NaN in x came out as a finite number.
void poison(GgmlType fmt, void* dst, int64_t n) {
    constexpr uint16_t kHalfNan = 0x7E00;
    if (fmt == GgmlType::Q8_K) {
        auto* y = static_cast<block_q8_K*>(dst);
        for (int64_t i = 0; i < n / QK_K; ++i) y[i].d = std::numeric_limits<float>::quiet_NaN();
    } else if (fmt == GgmlType::Q8_1) {
        auto* y = static_cast<block_q8_1*>(dst);
        for (int64_t i = 0; i < n / QK8_0; ++i) y[i].d = y[i].s = kHalfNan;
    } else {
        auto* y = static_cast<block_q8_0*>(dst);
        for (int64_t i = 0; i < n / QK8_0; ++i) y[i].d = kHalfNan;
    }
}

void quantize_activation_row_as(GgmlType fmt, const float* x, void* dst, int64_t n, Isa isa) {
    if (isa >= Isa::Avx2 && (fmt == GgmlType::Q8_0 || fmt == GgmlType::Q8_1 || fmt == GgmlType::Q8_K)) {
        require_isa(isa);
        if (isa >= Isa::Avx512) {
            if (fmt == GgmlType::Q8_K) return detail::avx512::quantize_act_q8_k(x, dst, n);
            return detail::avx512::quantize_act_q8_0(x, dst, n, fmt == GgmlType::Q8_1);
        }
        if (fmt == GgmlType::Q8_K) return detail::avx2::quantize_act_q8_k(x, dst, n);
        return detail::avx2::quantize_act_q8_0(x, dst, n, fmt == GgmlType::Q8_1);
    }
    switch (fmt) {
        case GgmlType::Q8_0: {
            auto* y = static_cast<block_q8_0*>(dst);
            for (int64_t i = 0; i < n / QK8_0; ++i) {
                int32_t sum;
                y[i].d = float_to_half(q8_block(x + i * QK8_0, y[i].qs, sum));
            }
            return;
        }
        case GgmlType::Q8_1: {
            auto* y = static_cast<block_q8_1*>(dst);
            for (int64_t i = 0; i < n / QK8_0; ++i) {
                int32_t sum;
                const float d = q8_block(x + i * QK8_0, y[i].qs, sum);
                y[i].d = float_to_half(d);
                y[i].s = float_to_half(d * static_cast<float>(sum));
            }
            return;
        }
        case GgmlType::Q8_K: {
            auto* y = static_cast<block_q8_K*>(dst);
            for (int64_t i = 0; i < n / QK_K; ++i) quantize_q8_k(x + i * QK_K, y[i]);
            return;
        }
        case GgmlType::F16: {
            auto* y = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) y[i] = float_to_half(x[i]);
            return;
        }
        case GgmlType::BF16: {
            auto* y = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
            return;
        }
        case GgmlType::F32: std::memcpy(dst, x, static_cast<size_t>(n) * sizeof(float)); return;
        default: throw std::invalid_argument("quantize_activation_row: not an activation format");
    }
}

}  // namespace

void quantize_activation_row(GgmlType fmt, const float* x, void* dst, int64_t n, Isa isa) {
    quantize_activation_row_as(fmt, x, dst, n, isa);
    if ((fmt == GgmlType::Q8_0 || fmt == GgmlType::Q8_1 || fmt == GgmlType::Q8_K) && has_nan(x, n, isa))
        poison(fmt, dst, n);
}

// ---------------------------------------------------------------------------------------- scalar reference

namespace detail::scalar {
namespace {

// One weight row against one activation row; by_rows runs it for each activation row.
template <float (*RowDot)(int64_t, const void*, const void*)>
void by_rows(int64_t n, const void* w, const void* a, size_t as, int n_act, float* out) {
    for (int r = 0; r < n_act; ++r) out[r] = RowDot(n, w, static_cast<const char*>(a) + r * as);
}

float h(uint16_t v) { return half_to_float(v); }

uint32_t qh32(const uint8_t* qh) {
    uint32_t v;
    std::memcpy(&v, qh, 4);
    return v;
}

float q4_0(int64_t n, const void* vw, const void* va) {
    const auto* x = static_cast<const block_q4_0*>(vw);
    const auto* y = static_cast<const block_q8_0*>(va);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        int s = 0;
        for (int j = 0; j < 16; ++j)
            s += ((x[i].qs[j] & 0xF) - 8) * y[i].qs[j] + ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        sum += h(x[i].d) * h(y[i].d) * static_cast<float>(s);
    }
    return sum;
}

float q5_0(int64_t n, const void* vw, const void* va) {
    const auto* x = static_cast<const block_q5_0*>(vw);
    const auto* y = static_cast<const block_q8_0*>(va);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        const uint32_t qh = qh32(x[i].qh);
        int s = 0;
        for (int j = 0; j < 16; ++j) {
            const int lo = ((x[i].qs[j] & 0xF) | ((qh >> j) & 1) << 4) - 16;
            const int hi = ((x[i].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16;
            s += lo * y[i].qs[j] + hi * y[i].qs[j + 16];
        }
        sum += h(x[i].d) * h(y[i].d) * static_cast<float>(s);
    }
    return sum;
}

float q8_0(int64_t n, const void* vw, const void* va) {
    const auto* x = static_cast<const block_q8_0*>(vw);
    const auto* y = static_cast<const block_q8_0*>(va);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        int s = 0;
        for (int j = 0; j < QK8_0; ++j) s += x[i].qs[j] * y[i].qs[j];
        sum += h(x[i].d) * h(y[i].d) * static_cast<float>(s);
    }
    return sum;
}

float q4_1(int64_t n, const void* vw, const void* va) {
    const auto* x = static_cast<const block_q4_1*>(vw);
    const auto* y = static_cast<const block_q8_1*>(va);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        int s = 0;
        for (int j = 0; j < 16; ++j) s += (x[i].qs[j] & 0xF) * y[i].qs[j] + (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        sum += h(x[i].d) * h(y[i].d) * static_cast<float>(s) + h(x[i].m) * h(y[i].s);
    }
    return sum;
}

float q5_1(int64_t n, const void* vw, const void* va) {
    const auto* x = static_cast<const block_q5_1*>(vw);
    const auto* y = static_cast<const block_q8_1*>(va);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        const uint32_t qh = qh32(x[i].qh);
        int s = 0;
        for (int j = 0; j < 16; ++j) {
            const int lo = (x[i].qs[j] & 0xF) | ((qh >> j) & 1) << 4;
            const int hi = (x[i].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
            s += lo * y[i].qs[j] + hi * y[i].qs[j + 16];
        }
        sum += h(x[i].d) * h(y[i].d) * static_cast<float>(s) + h(x[i].m) * h(y[i].s);
    }
    return sum;
}

// d_a (d sum_k sc_k sum_l q y - dmin sum_k m_k (bsums[2k] + bsums[2k+1])), q from qs (and qh for Q5_K).
template <class W, bool kFifthBit>
float qx_k(int64_t n, const void* vw, const void* va) {
    const auto* x = static_cast<const W*>(vw);
    const auto* y = static_cast<const block_q8_K*>(va);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        int sumi = 0, summ = 0;
        for (int k = 0; k < 8; ++k) {
            int sc, m;
            scale_min_k4(x[i].scales, k, sc, m);
            int s = 0;
            for (int l = 0; l < 32; ++l) {
                int q = (x[i].qs[32 * (k / 2) + l] >> (4 * (k & 1))) & 0xF;
                if constexpr (kFifthBit) q |= ((x[i].qh[l] >> k) & 1) << 4;
                s += q * y[i].qs[32 * k + l];
            }
            sumi += sc * s;
            summ += m * (y[i].bsums[2 * k] + y[i].bsums[2 * k + 1]);
        }
        sum += y[i].d * (h(x[i].d) * static_cast<float>(sumi) - h(x[i].dmin) * static_cast<float>(summ));
    }
    return sum;
}

float q6_k(int64_t n, const void* vw, const void* va) {
    const auto* x = static_cast<const block_q6_K*>(vw);
    const auto* y = static_cast<const block_q8_K*>(va);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        int group[16] = {};  // sum over each 16-value group of (q - 32) * a
        for (int half = 0; half < 2; ++half) {
            const uint8_t* ql = x[i].ql + 64 * half;
            const uint8_t* qh = x[i].qh + 32 * half;
            const int8_t* a = y[i].qs + 128 * half;
            for (int l = 0; l < 32; ++l) {  // values l, l+32, l+64, l+96 of this half
                const int q0 = ((ql[l] & 0xF) | (qh[l] & 3) << 4) - 32;
                const int q1 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32;
                const int q2 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
                const int q3 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
                int* g = group + 8 * half + l / 16;
                g[0] += q0 * a[l], g[2] += q1 * a[l + 32], g[4] += q2 * a[l + 64], g[6] += q3 * a[l + 96];
            }
        }
        int sumi = 0;
        for (int g = 0; g < 16; ++g) sumi += x[i].scales[g] * group[g];
        sum += h(x[i].d) * y[i].d * static_cast<float>(sumi);
    }
    return sum;
}

template <class T, float (*Cvt)(T)>
float floats(int64_t n, const void* vw, const void* va) {
    const T* w = static_cast<const T*>(vw);
    const T* a = static_cast<const T*>(va);
    double sum = 0.0;  // the reference: exact products, double accumulation
    for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(Cvt(w[j])) * Cvt(a[j]);
    return static_cast<float>(sum);
}

float same(float v) { return v; }

}  // namespace

DotKernel kernel(GgmlType wtype) {
    switch (wtype) {
        case GgmlType::F32: return &by_rows<floats<float, same>>;
        case GgmlType::F16: return &by_rows<floats<uint16_t, half_to_float>>;
        case GgmlType::BF16: return &by_rows<floats<uint16_t, bf16_to_float>>;
        case GgmlType::Q4_0: return &by_rows<q4_0>;
        case GgmlType::Q4_1: return &by_rows<q4_1>;
        case GgmlType::Q5_0: return &by_rows<q5_0>;
        case GgmlType::Q5_1: return &by_rows<q5_1>;
        case GgmlType::Q8_0: return &by_rows<q8_0>;
        case GgmlType::Q4_K: return &by_rows<qx_k<block_q4_K, false>>;
        case GgmlType::Q5_K: return &by_rows<qx_k<block_q5_K, true>>;
        case GgmlType::Q6_K: return &by_rows<q6_k>;
        default: return nullptr;
    }
}

}  // namespace detail::scalar

// ---------------------------------------------------------------------------------------- dispatch

void require_isa(Isa isa) {
    if (!isa_supported(isa))
        throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " dot kernels");
}

DotKernel dot_kernel(GgmlType wtype, Isa isa) {
    require_isa(isa);
    switch (isa) {
        case Isa::Scalar: return detail::scalar::kernel(wtype);
        case Isa::Avx2:
        case Isa::AvxVnni: return detail::avx2::kernel(wtype);
        case Isa::Avx512: return detail::avx512::kernel(wtype);
        case Isa::Avx512Vnni:
        case Isa::Amx:
            if (wtype == GgmlType::BF16 && cpu_features().avx512_bf16) return detail::avx512_vnni::bf16_dpbf16_kernel();
            return detail::avx512_vnni::kernel(wtype);
    }
    return nullptr;
}

namespace {

// The two-row kernel of a float type at a supported level; nullptr for the other types and for scalar.
detail::DotKernel2 dot_kernel2(GgmlType wtype, Isa isa) {
    switch (isa) {
        case Isa::Scalar: return nullptr;
        case Isa::Avx2:
        case Isa::AvxVnni: return detail::avx2::kernel2(wtype);
        case Isa::Avx512: return detail::avx512::kernel2(wtype);
        case Isa::Avx512Vnni:
        case Isa::Amx:
            if (wtype == GgmlType::BF16 && cpu_features().avx512_bf16)
                return detail::avx512_vnni::bf16_dpbf16_kernel2();
            return detail::avx512_vnni::kernel2(wtype);
    }
    return nullptr;
}

DotKernel checked_kernel(GgmlType wtype, Isa isa) {
    DotKernel k = dot_kernel(wtype, isa);
    if (!k) throw std::invalid_argument("no dot kernel for ggml type " + std::to_string(static_cast<int>(wtype)));
    return k;
}

}  // namespace

void dot(GgmlType wtype, int64_t n, const void* w_row, const void* act_rows, size_t act_row_stride, int n_act,
         float* out, Isa isa) {
    if (n_act < 1 || n_act > kMaxActRows) throw std::invalid_argument("dot: n_act must be 1..8");
    checked_kernel(wtype, isa)(n, w_row, act_rows, act_row_stride, n_act, out);
}

namespace {

detail::ScaledDotKernel scaled_kernel(GgmlType wtype, Isa isa) {
    switch (isa) {
        case Isa::Avx2:
        case Isa::AvxVnni: return detail::avx2::scaled_kernel(wtype);
        case Isa::Avx512: return detail::avx512::scaled_kernel(wtype);
        case Isa::Avx512Vnni:
        case Isa::Amx: return detail::avx512_vnni::scaled_kernel(wtype);
        default: return {};
    }
}

}  // namespace

namespace {

// Decode (one or two tokens) streams each weight row once, so software prefetch keeps the loads ahead
// of the hardware prefetchers, which ramp up too late on short cold matrices (MLA's, the attention
// projections read at a third of the bandwidth without it). It is spread over the work: each piece
// of kPiece bytes (a row, or a slice of a longer row) prefetches its own bytes kAhead further down
// the weight stream. (Rows of 8192 values, 2 threads, 512 MiB: each whole row prefetched one row
// ahead read BF16 at 67% of the bandwidth, 2 KiB ahead 86%; Q5_K 58 -> 72%, its kernel being near
// compute-bound here at ~17 GB/s per core.)
constexpr size_t kAhead = 2048, kPiece = 8192;

// Prefetches stream bytes [lo, hi) of the rows starting at row r (row r's bytes, then row r + 1's...),
// rows before row_end only.
inline void prefetch_stream(const char* w, size_t stride, size_t row_bytes, int64_t r, int64_t row_end, size_t lo,
                            size_t hi) {
    r += static_cast<int64_t>(lo / row_bytes);
    size_t off = lo % row_bytes;
    for (size_t left = hi - lo; left > 0 && r < row_end; ++r, off = 0) {
        const size_t n = std::min(left, row_bytes - off);
        const char* p = w + r * stride + off;
        const auto first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
        for (uintptr_t a = first; a < reinterpret_cast<uintptr_t>(p) + n; a += 64)
            _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
        left -= n;
    }
}

// The rows one tile of <= 2 activation rows at a time: rows longer than 2 * kPiece in slices of about
// kPiece bytes (whole blocks; the partial dots added in order), each piece prefetching ahead. With a
// two-row kernel (the float types) the rows go in pairs from the two halves of [row_begin, row_end), r
// beside r + half: two streams read side by side. (Rows of 8192 values, 256 MiB, 2 threads, as a share of
// a read timed in alternation: one stream BF16 0.75-0.79, F16 0.64, F32 0.66-0.69; two 0.98, 0.91, 0.80-0.82.)
void decode_rows(GgmlType wtype, DotKernel kernel, detail::DotKernel2 kernel2, int64_t n, const char* w,
                 size_t w_row_stride, int64_t row_begin, int64_t row_end, const char* tile, size_t a_stride, int nt,
                 float* Y, size_t y_stride) {
    const TypeInfo& info = *type_info(static_cast<int32_t>(wtype));
    const size_t row_bytes = row_size(wtype, n);
    const int64_t ks = row_bytes > 2 * kPiece
                           ? std::max<int64_t>(1, static_cast<int64_t>(kPiece / info.type_size)) * info.block_size
                           : n;
    // Row r's dot (and with a pair, row r2's) over the pieces; rows before `end` (and `end2`) prefetched
    auto rows = [&](int64_t r, int64_t end, int64_t r2, int64_t end2) {
        float out[kMaxActRows], out2[kMaxActRows];
        for (int64_t k0 = 0; k0 < n; k0 += ks) {
            const int64_t kn = std::min(ks, n - k0);
            const size_t off = row_size(wtype, k0), bytes = row_size(wtype, kn);
            const char* a = tile + row_size(info.act_type, k0);
            prefetch_stream(w, w_row_stride, row_bytes, r, end, off + kAhead, off + bytes + kAhead);
            if (r2 < 0) {
                kernel(kn, w + r * w_row_stride + off, a, a_stride, nt, out);
            } else {
                prefetch_stream(w, w_row_stride, row_bytes, r2, end2, off + kAhead, off + bytes + kAhead);
                kernel2(kn, w + r * w_row_stride + off, w + r2 * w_row_stride + off, a, a_stride, nt, out, out2);
            }
            for (int j = 0; j < nt; ++j) {
                Y[j * y_stride + r] = k0 == 0 ? out[j] : Y[j * y_stride + r] + out[j];
                if (r2 >= 0) Y[j * y_stride + r2] = k0 == 0 ? out2[j] : Y[j * y_stride + r2] + out2[j];
            }
        }
    };
    int64_t r = row_begin;
    if (kernel2 && nt <= 2) {
        const int64_t half = (row_end - row_begin) / 2, mid = row_begin + half;
        for (; r < mid; ++r) rows(r, mid, r + half, row_end);
        r = mid + half;  // an odd count's last row, below
    }
    for (; r < row_end; ++r) rows(r, row_end, -1, 0);
}

// BF16 rows [row_begin, row_end)'s whole 16-row groups on AMX-BF16 tiles, straight from the row-major weights;
// returns the first row left. Tokens in blocks of up to 256, so the packed activations every row group reads
// stay about L2-sized (K = 4096: 2 MiB) however long the prompt. 4096 x 4096, 2 threads: 128 tokens 3.1 ms
// against 35.7 ms by rows with dpbf16 (torch's bf16 matmul 3.0 ms); 8 tokens 0.8 ms against 2.3.
int64_t bf16_amx_rows(int64_t n, const char* w, size_t w_row_stride, int64_t row_begin, int64_t row_end,
                      const void* A, size_t a_stride, int64_t n_tokens, float* Y, size_t y_stride) {
    constexpr int64_t kBlockTokens = 256;
    const int64_t groups = (row_end - row_begin) / 16, block = std::min(n_tokens, kBlockTokens);
    thread_local std::vector<uint16_t> buf;
    buf.resize(static_cast<size_t>((n + 31) / 32 * ((block + 15) / 16)) * detail::amx::kBf16Tile + 32);
    auto* packed = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
    int configured = -1;
    for (int64_t t0 = 0; t0 < n_tokens; t0 += block) {
        const int64_t nt = std::min(block, n_tokens - t0);
        detail::amx::pack_bf16(static_cast<const char*>(A) + t0 * a_stride, a_stride, nt, n, packed);
        detail::amx::gemm_bf16(n, reinterpret_cast<const uint8_t*>(w + row_begin * w_row_stride), w_row_stride, groups,
                               packed, nt, Y + t0 * y_stride + row_begin, y_stride, configured);
    }
    detail::amx::release_tiles();
    return row_begin + groups * 16;
}

}  // namespace

void matmul_rows(GgmlType wtype, int64_t n, const void* W, size_t w_row_stride, int64_t row_begin, int64_t row_end,
                 const void* A, size_t a_stride, int64_t n_tokens, float* Y, size_t y_stride, Isa isa) {
    if (is_r16(wtype))  // checks the ISA itself (its fallback through the plain kernels does too)
        return matmul_rows_r16(wtype, n, W, row_begin, row_end, A, a_stride, n_tokens, Y, y_stride, isa);
    const DotKernel kernel = checked_kernel(wtype, isa);
    const detail::DotKernel2 kernel2 = dot_kernel2(wtype, isa);
    const auto* w = static_cast<const char*>(W);
    // BF16 from a few tokens on: whole 16-row groups on AMX-BF16 tiles (the rest below)
    if (wtype == GgmlType::BF16 && isa == Isa::Amx && cpu_features().amx_bf16 &&
        n_tokens >= detail::amx::kAmxBf16MinTokens && row_end - row_begin >= 16) {
        row_begin = bf16_amx_rows(n, w, w_row_stride, row_begin, row_end, A, a_stride, n_tokens, Y, y_stride);
        if (row_begin == row_end) return;
    }
    // Rows in chunks of ~256 KiB of weights (L2): each chunk is reused by every token tile, and each
    // tile (<= 8 activation rows) by every row of the chunk.
    const int64_t chunk = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<size_t>(1, row_size(wtype, n)));
    // 32-value blocks: the tile's f16 activation scales converted once per tile and chunk, not per row
    // (when there are rows enough to pay for it and the tile's scales fit; K <= 49152). On VNNI the
    // buffer holds the tile prepared for Gemm32 / GemmQ4K (dot_simd.h act_prep).
    constexpr int64_t kMaxScaleFloats = kMaxActRows * 3 * 1024;  // = dot_simd.h kActBufFloats
    const detail::ScaledDotKernel scaled = scaled_kernel(wtype, isa);
    const int per_block = wtype == GgmlType::Q4_1 || wtype == GgmlType::Q5_1 ? 2 : 1;
    const int64_t nb = n / qk::QK8_0;
    const bool use_scaled = scaled.dot && kMaxActRows * per_block * nb <= kMaxScaleFloats;
    alignas(64) float act_d[kMaxScaleFloats];  // 96 KiB of stack, touched only when used; whole cache lines
    const auto* a = static_cast<const char*>(A);
    float out[kMaxActRows], out2[kMaxActRows];
    const bool decode = n_tokens <= 2;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += chunk) {
        const int64_t r1 = std::min(row_end, r0 + chunk);
        for (int64_t t0 = 0; t0 < n_tokens; t0 += kMaxActRows) {
            const int nt = static_cast<int>(std::min<int64_t>(kMaxActRows, n_tokens - t0));
            const char* tile = a + t0 * a_stride;
            const bool scales_once = use_scaled && r1 - r0 >= 2;
            if (!scales_once && decode) {
                decode_rows(wtype, kernel, kernel2, n, w, w_row_stride, r0, r1, tile, a_stride, nt, Y + t0 * y_stride,
                            y_stride);
                continue;
            }
            if (!scales_once) {
                int64_t r = r0;
                // rows in pairs: each weight load serves twice the tile, for the same sums (by_rows2). MLA's
                // scores at 2048 positions, one thread, Zen 4: f32 cache 1.25-1.3x, f16 1.15-1.3x, bf16 1.07-1.27x
                if (kernel2 && nt >= 3 && isa >= Isa::Avx512)
                    for (; r + 1 < r1; r += 2) {
                        kernel2(n, w + r * w_row_stride, w + (r + 1) * w_row_stride, tile, a_stride, nt, out, out2);
                        for (int j = 0; j < nt; ++j) {
                            Y[(t0 + j) * y_stride + r] = out[j];
                            Y[(t0 + j) * y_stride + r + 1] = out2[j];
                        }
                    }
                for (; r < r1; ++r) {
                    kernel(n, w + r * w_row_stride, tile, a_stride, nt, out);
                    for (int j = 0; j < nt; ++j) Y[(t0 + j) * y_stride + r] = out[j];
                }
                continue;
            }
            // Q4_K: K in slices of 16384 / nt values (a multiple of 256), so the prepared tile (~20 KiB)
            // stays in L1 across the rows.
            const int64_t ks = wtype == GgmlType::Q4_K ? std::min<int64_t>(n, 16384 / nt / qk::QK_K * qk::QK_K) : n;
            for (int64_t k0 = 0; k0 < n; k0 += ks) {
                const int64_t kn = std::min(ks, n - k0);
                const char* tile_k = tile + (k0 == 0 ? 0 : static_cast<size_t>(k0 / qk::QK_K) * sizeof(block_q8_K));
                const size_t w_off = k0 == 0 ? 0 : row_size(wtype, k0);
                scaled.convert_scales(tile_k, a_stride, nt, kn / qk::QK8_0, act_d);
                const size_t kn_bytes = row_size(wtype, kn);
                for (int64_t r = r0; r < r1; ++r) {
                    if (decode) prefetch_stream(w + w_off, w_row_stride, kn_bytes, r, row_end, kAhead, kAhead + kn_bytes);
                    scaled.dot(kn, w + r * w_row_stride + w_off, tile_k, a_stride, act_d, nt, out);
                    if (k0 == 0)
                        for (int j = 0; j < nt; ++j) Y[(t0 + j) * y_stride + r] = out[j];
                    else
                        for (int j = 0; j < nt; ++j) Y[(t0 + j) * y_stride + r] += out[j];
                }
            }
        }
    }
}

}  // namespace tandem
