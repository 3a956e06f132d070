#include "attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace tandem {
namespace {

// Positions a mix kernel converts to float at a time (a block of the cache's columns [r0, r1), kept in L1
// while every row of probabilities takes its share of it), and the widest column slice it takes.
constexpr int64_t kMixBlock = 16, kMixCols = 128;

inline float cache_value(GgmlType type, const uint8_t* row, int64_t r) {
    if (type == GgmlType::F32) return reinterpret_cast<const float*>(row)[r];
    const uint16_t v = reinterpret_cast<const uint16_t*>(row)[r];
    return type == GgmlType::F16 ? half_to_float(v) : bf16_to_float(v);
}

void mix_scalar(const MixRows& m, int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < m.n_rows; ++i) {
        const float* p = m.p + i * m.p_stride;
        float* out = m.out[i];
        for (int64_t s = 0; s < m.n[i]; ++s) {
            const uint8_t* row = m.rows + s * m.stride;
            for (int64_t r = r0; r < r1; ++r) out[r] += p[s] * cache_value(m.type, row, r);
        }
    }
}

// The SIMD mix of columns [r0, r0 + NV * width): per block of kMixBlock positions, their columns converted
// to float once, then each row's NV accumulators run over the block in registers. Every output value sums
// its products in position order, one fused multiply-add each, as a row-at-a-time loop would.
template <int NV>
__attribute__((target("avx512f,avx512bw,f16c,fma"))) void mix_avx512_cols(const MixRows& m, int64_t r0) {
    alignas(64) float x[kMixBlock][NV * 16];
    int64_t seen = 0;
    for (int64_t i = 0; i < m.n_rows; ++i) seen = std::max(seen, m.n[i]);
    for (int64_t b0 = 0; b0 < seen; b0 += kMixBlock) {
        const int64_t b1 = std::min(seen, b0 + kMixBlock);
        for (int64_t s = b0; s < b1; ++s) {
            const uint8_t* row = m.rows + s * m.stride;
            for (int k = 0; k < NV; ++k) {
                __m512 v;
                if (m.type == GgmlType::F32) {
                    v = _mm512_loadu_ps(reinterpret_cast<const float*>(row) + r0 + 16 * k);
                } else {
                    const __m256i h = _mm256_loadu_si256(
                        reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + r0 + 16 * k));
                    v = m.type == GgmlType::F16 ? _mm512_cvtph_ps(h)
                                                : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                }
                _mm512_store_ps(x[s - b0] + 16 * k, v);
            }
        }
        for (int64_t i = 0; i < m.n_rows; ++i) {
            const int64_t e = std::min(b1, m.n[i]);
            if (e <= b0) continue;
            const float* p = m.p + i * m.p_stride;
            float* out = m.out[i] + r0;
            __m512 acc[NV];
            for (int k = 0; k < NV; ++k) acc[k] = _mm512_loadu_ps(out + 16 * k);
            for (int64_t s = b0; s < e; ++s) {
                const __m512 w = _mm512_set1_ps(p[s]);
                for (int k = 0; k < NV; ++k) acc[k] = _mm512_fmadd_ps(w, _mm512_load_ps(x[s - b0] + 16 * k), acc[k]);
            }
            for (int k = 0; k < NV; ++k) _mm512_storeu_ps(out + 16 * k, acc[k]);
        }
    }
}

template <int NV>
__attribute__((target("avx2,fma,f16c"))) void mix_avx2_cols(const MixRows& m, int64_t r0) {
    alignas(32) float x[kMixBlock][NV * 8];
    int64_t seen = 0;
    for (int64_t i = 0; i < m.n_rows; ++i) seen = std::max(seen, m.n[i]);
    for (int64_t b0 = 0; b0 < seen; b0 += kMixBlock) {
        const int64_t b1 = std::min(seen, b0 + kMixBlock);
        for (int64_t s = b0; s < b1; ++s) {
            const uint8_t* row = m.rows + s * m.stride;
            for (int k = 0; k < NV; ++k) {
                __m256 v;
                if (m.type == GgmlType::F32) {
                    v = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + r0 + 8 * k);
                } else {
                    const __m128i h = _mm_loadu_si128(
                        reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(row) + r0 + 8 * k));
                    v = m.type == GgmlType::F16 ? _mm256_cvtph_ps(h)
                                                : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                }
                _mm256_store_ps(x[s - b0] + 8 * k, v);
            }
        }
        for (int64_t i = 0; i < m.n_rows; ++i) {
            const int64_t e = std::min(b1, m.n[i]);
            if (e <= b0) continue;
            const float* p = m.p + i * m.p_stride;
            float* out = m.out[i] + r0;
            __m256 acc[NV];
            for (int k = 0; k < NV; ++k) acc[k] = _mm256_loadu_ps(out + 8 * k);
            for (int64_t s = b0; s < e; ++s) {
                const __m256 w = _mm256_set1_ps(p[s]);
                for (int k = 0; k < NV; ++k) acc[k] = _mm256_fmadd_ps(w, _mm256_load_ps(x[s - b0] + 8 * k), acc[k]);
            }
            for (int k = 0; k < NV; ++k) _mm256_storeu_ps(out + 8 * k, acc[k]);
        }
    }
}

// Columns [r0, r1) of a SIMD mix: whole vectors (16 values for AVX-512, 8 for AVX2), 8 vectors at most
void mix_simd(const MixRows& m, int64_t r0, int64_t r1, Isa isa) {
    const int width = isa >= Isa::Avx512 ? 16 : 8;
    const int nv = static_cast<int>((r1 - r0) / width);
    if (isa >= Isa::Avx512) {
        switch (nv) {
            case 1: return mix_avx512_cols<1>(m, r0);
            case 2: return mix_avx512_cols<2>(m, r0);
            case 3: return mix_avx512_cols<3>(m, r0);
            case 4: return mix_avx512_cols<4>(m, r0);
            case 5: return mix_avx512_cols<5>(m, r0);
            case 6: return mix_avx512_cols<6>(m, r0);
            case 7: return mix_avx512_cols<7>(m, r0);
            default: return mix_avx512_cols<8>(m, r0);
        }
    }
    switch (nv) {  // AVX2: kMixCols / 8 = 16 vectors at most; 8 keep the accumulators in registers
        case 1: return mix_avx2_cols<1>(m, r0);
        case 2: return mix_avx2_cols<2>(m, r0);
        case 3: return mix_avx2_cols<3>(m, r0);
        case 4: return mix_avx2_cols<4>(m, r0);
        case 5: return mix_avx2_cols<5>(m, r0);
        case 6: return mix_avx2_cols<6>(m, r0);
        case 7: return mix_avx2_cols<7>(m, r0);
        default: return mix_avx2_cols<8>(m, r0);
    }
}

// p rounded to the cache's precision, as llama.cpp's mix with a lower-precision V does.
inline float round_to(GgmlType type, float v) {
    if (type == GgmlType::F16) return half_to_float(float_to_half(v));
    if (type == GgmlType::BF16) return bf16_to_float(float_to_bf16(v));
    return v;
}

// One row's softmax in place: sc[s] = (sc[s] + pe[s]) * scale, then p = exp(sc - max) / sum over s < n,
// rounded to the cache's precision. The scalar reference (libm's expf).
void softmax_scalar(float* sc, const float* pe, int64_t n, float scale, GgmlType type) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < n; ++s) {
        sc[s] = (sc[s] + pe[s]) * scale;
        mx = std::max(mx, sc[s]);
    }
    float sum = 0;
    for (int64_t s = 0; s < n; ++s) {
        sc[s] = std::exp(sc[s] - mx);
        sum += sc[s];
    }
    const float inv = 1.0f / sum;
    for (int64_t s = 0; s < n; ++s) sc[s] = round_to(type, sc[s] * inv);
}

// exp(x) for x <= 0, within ~2 ulp of expf (the Cephes expf scheme: x = n ln2 + r, |r| <= ln2 / 2, ln2 in
// two parts, exp(r) = 1 + r + r^2 P(r)); 0 below -87 (where expf's results are subnormal or 0: a
// probability below 1e-38 next to the row's maximum, 1, which no cache type keeps).
constexpr float kExpLow = -87.0f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma"))) inline __m512 exp_avx512(__m512 x) {
    const __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLow), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(kExpLow));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kExpP[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP[i]));
    const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~low), _mm512_scalef_ps(y, n));
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 exp_avx2(__m256 x) {
    const __m256 low = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLow), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(kExpLow));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpP[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
    const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n as float bits (n >= -126 here)
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    return _mm256_andnot_ps(low, _mm256_mul_ps(y, scale));
}

// round_to a vector: F16 through the hardware's round-to-nearest-even, BF16 as float_to_bf16 (NaN kept quiet)
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma"))) inline __m512 round_avx512(__m512 v, GgmlType type) {
    if (type == GgmlType::F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (type != GgmlType::BF16) return v;
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, x, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 round_avx2(__m256 v, GgmlType type) {
    if (type == GgmlType::F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (type != GgmlType::BF16) return v;
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(x, _mm256_set1_epi32(0x400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma"))) void softmax_avx512(float* sc, const float* pe, int64_t n,
                                                                                   float scale, GgmlType type) {
    const __m512 vs = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s < n; s += 16) {
        const __mmask16 k = n - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - s)) - 1);
        const __m512 v = _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(k, sc + s), _mm512_maskz_loadu_ps(k, pe + s)), vs);
        _mm512_mask_storeu_ps(sc + s, k, v);
        mx = _mm512_mask_max_ps(mx, k, mx, v);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 16) {
        const __mmask16 k = n - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - s)) - 1);
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + s), m));
        _mm512_mask_storeu_ps(sc + s, k, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t s = 0; s < n; s += 16) {
        const __mmask16 k = n - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - s)) - 1);
        _mm512_mask_storeu_ps(sc + s, k, round_avx512(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + s), inv), type));
    }
}

__attribute__((target("avx2,fma,f16c"))) void softmax_avx2(float* sc, const float* pe, int64_t n, float scale,
                                                             GgmlType type) {
    const int64_t n8 = n / 8 * 8;
    const __m256 vs = _mm256_set1_ps(scale);
    __m256 mx8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s < n8; s += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(sc + s), _mm256_loadu_ps(pe + s)), vs);
        _mm256_storeu_ps(sc + s, v);
        mx8 = _mm256_max_ps(mx8, v);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx8);
    float mx = *std::max_element(lanes, lanes + 8);
    for (int64_t s = n8; s < n; ++s) {
        sc[s] = (sc[s] + pe[s]) * scale;
        mx = std::max(mx, sc[s]);
    }
    const __m256 m = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (int64_t s = 0; s < n8; s += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + s), m));
        _mm256_storeu_ps(sc + s, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    _mm256_store_ps(lanes, sum8);
    float sum = 0;
    for (float l : lanes) sum += l;
    for (int64_t s = n8; s < n; ++s) {
        alignas(32) float one[8] = {sc[s] - mx};
        _mm256_store_ps(one, exp_avx2(_mm256_load_ps(one)));  // the same exp as the vectors'
        sc[s] = one[0];
        sum += sc[s];
    }
    const float inv = 1.0f / sum;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t s = 0; s < n8; s += 8) _mm256_storeu_ps(sc + s, round_avx2(_mm256_mul_ps(_mm256_loadu_ps(sc + s), vinv), type));
    for (int64_t s = n8; s < n; ++s) sc[s] = round_to(type, sc[s] * inv);
}

void softmax_row(float* sc, const float* pe, int64_t n, float scale, GgmlType type, Isa isa) {
    if (isa >= Isa::Avx512) return softmax_avx512(sc, pe, n, scale, type);
    if (isa >= Isa::Avx2) return softmax_avx2(sc, pe, n, scale, type);
    softmax_scalar(sc, pe, n, scale, type);
}

}  // namespace

int64_t mix_slices(int64_t R, Isa isa) {
    const int64_t width = isa >= Isa::Avx512 ? 16 : isa >= Isa::Avx2 ? 8 : R;
    const int64_t cols = isa >= Isa::Avx512 ? kMixCols : isa >= Isa::Avx2 ? 8 * 8 : R;
    const int64_t simd = R / width * width;
    return (simd + cols - 1) / cols + (simd < R ? 1 : 0);
}

void mix_rows(const MixRows& m, int64_t slice, Isa isa) {
    if (isa < Isa::Avx2) return mix_scalar(m, 0, m.R);
    const int64_t width = isa >= Isa::Avx512 ? 16 : 8, cols = isa >= Isa::Avx512 ? kMixCols : 8 * 8;
    const int64_t simd = m.R / width * width, r0 = slice * cols;
    if (r0 >= simd) return mix_scalar(m, simd, m.R);  // the tail past the whole vectors
    mix_simd(m, r0, std::min(simd, r0 + cols), isa);
}

void mla_attention(ThreadPool& pool, int64_t H, int64_t T, int64_t S, int64_t R, int64_t Dr, const float* q_lat,
                   const float* q_pe, GgmlType cache_type, const uint8_t* c_kv, const uint8_t* k_pe, float scale,
                   float* o_lat, Isa isa) {
    const GgmlType act = type_info(static_cast<int32_t>(cache_type))->act_type;
    const size_t kv_stride = row_size(cache_type, R), pe_stride = row_size(cache_type, Dr);
    const size_t qa_stride = row_size(act, R), pa_stride = row_size(act, Dr);
    // The new tokens in tiles of up to 8, every head of a tile at once (its rows i = h * nt + j): the cache is
    // read once a tile for the scores and once for the mix. A head at a time, as before, read it 2 H times.
    // DeepSeek-V2-Lite's decode (16 heads, R 512, an f16 cache), 2 threads, per layer and token: 1.21 ->
    // 0.37 ms at 1024 positions, 3.64 -> 1.55 ms at 4096, 19.0 -> 6.3 ms at 16384 (with the vectorized
    // softmax: libm's expf and the software f16 rounding took 0.6 ms of it at 4096).
    constexpr int64_t kTile = 8;
    const int64_t tile = std::min(T, kTile), max_rows = H * tile;
    // the score rows' length: S rounded up to whole cache lines and one more, so that the rows of a tile
    // (read side by side by the mix) do not all fall into one L1 set as they would 16 KiB apart
    const int64_t ld = (S + 15) / 16 * 16 + 16;
    // scratch kept per calling thread (the pool's threads reach it through these references: a
    // thread_local named in a lambda would be theirs)
    struct Scratch {
        std::vector<uint8_t> qa, pa;
        std::vector<float> s1, s2;
        std::vector<int64_t> n;
        std::vector<float*> out;
    };
    thread_local Scratch scratch;
    auto &qa = scratch.qa, &pa = scratch.pa;
    auto &s1 = scratch.s1, &s2 = scratch.s2;
    auto &n_seen = scratch.n;
    auto &outs = scratch.out;
    qa.resize(static_cast<size_t>(max_rows) * qa_stride);
    pa.resize(static_cast<size_t>(max_rows) * pa_stride);
    s1.resize(static_cast<size_t>(max_rows * ld));
    s2.resize(static_cast<size_t>(max_rows * ld));
    n_seen.resize(static_cast<size_t>(max_rows));
    outs.resize(static_cast<size_t>(max_rows));
    // small calls on the calling thread alone (waking the pool costs more than they take)
    const bool inline_only = H * T * S * (R + Dr) < (1 << 15);
    auto run = [&](int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
        if (inline_only) {
            for (int64_t k = 0; k < n_tasks; ++k) fn(k, 0);
        } else {
            pool.parallel_for(n_tasks, fn);
        }
    };
    for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t nt = std::min(kTile, T - t0), rows = H * nt, seen = S - T + t0 + nt;
        run(rows, [&](int64_t i, int) {
            const int64_t h = i / nt, t = t0 + i % nt;
            quantize_activation_row(act, q_lat + (h * T + t) * R, qa.data() + i * qa_stride, R);
            quantize_activation_row(act, q_pe + (h * T + t) * Dr, pa.data() + i * pa_stride, Dr);
            n_seen[i] = S - T + t + 1;  // causal: token t sees the cache and the new tokens up to itself
            outs[i] = o_lat + (h * T + t) * R;
        });
        // scores of every row against the positions the tile's last token sees, in slabs of positions
        const int64_t slabs = std::max<int64_t>(1, std::min<int64_t>(4 * pool.threads(), seen / 64));
        const int64_t slab = ((seen + slabs - 1) / slabs + 15) / 16 * 16;
        run((seen + slab - 1) / slab, [&](int64_t k, int) {
            const int64_t p0 = k * slab, p1 = std::min(seen, p0 + slab);
            matmul_rows(cache_type, R, c_kv, kv_stride, p0, p1, qa.data(), qa_stride, rows, s1.data(), ld, isa);
            matmul_rows(cache_type, Dr, k_pe, pe_stride, p0, p1, pa.data(), pa_stride, rows, s2.data(), ld, isa);
        });
        run(rows, [&](int64_t i, int) {  // softmax, p rounded to the cache's precision; the outputs zeroed
            softmax_row(s1.data() + i * ld, s2.data() + i * ld, n_seen[i], scale, cache_type, isa);
            std::fill(outs[i], outs[i] + R, 0.0f);
        });
        const MixRows m{cache_type, c_kv, kv_stride, R, rows, n_seen.data(), s1.data(), static_cast<size_t>(ld),
                        outs.data()};
        run(mix_slices(R, isa), [&](int64_t k, int) { mix_rows(m, k, isa); });
    }
}

}  // namespace tandem
