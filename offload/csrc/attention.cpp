#include "attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace tandem {
namespace {

void axpy_scalar(GgmlType type, const uint8_t* rows, size_t stride, int64_t n, int64_t R, const float* p, float* out) {
    for (int64_t s = 0; s < n; ++s) {
        const uint8_t* row = rows + s * stride;
        const float w = p[s];
        if (type == GgmlType::F32) {
            const float* x = reinterpret_cast<const float*>(row);
            for (int64_t r = 0; r < R; ++r) out[r] += w * x[r];
        } else {
            const uint16_t* x = reinterpret_cast<const uint16_t*>(row);
            for (int64_t r = 0; r < R; ++r) out[r] += w * (type == GgmlType::F16 ? half_to_float(x[r]) : bf16_to_float(x[r]));
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) void axpy_avx2(GgmlType type, const uint8_t* rows, size_t stride, int64_t n,
                                                         int64_t R, const float* p, float* out) {
    const int64_t R8 = R / 8 * 8;
    for (int64_t s = 0; s < n; ++s) {
        const uint8_t* row = rows + s * stride;
        const __m256 w = _mm256_set1_ps(p[s]);
        for (int64_t r = 0; r < R8; r += 8) {
            __m256 x;
            if (type == GgmlType::F32) {
                x = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + r);
            } else {
                const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(row) + r));
                x = type == GgmlType::F16 ? _mm256_cvtph_ps(h)
                                          : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            }
            _mm256_storeu_ps(out + r, _mm256_fmadd_ps(w, x, _mm256_loadu_ps(out + r)));
        }
        if (R8 < R) axpy_scalar(type, row + R8 * (type == GgmlType::F32 ? 4 : 2), stride, 1, R - R8, p + s, out + R8);
    }
}

__attribute__((target("avx512f,avx512bw,f16c,fma"))) void axpy_avx512(GgmlType type, const uint8_t* rows, size_t stride,
                                                                       int64_t n, int64_t R, const float* p, float* out) {
    const int64_t R16 = R / 16 * 16;
    for (int64_t s = 0; s < n; ++s) {
        const uint8_t* row = rows + s * stride;
        const __m512 w = _mm512_set1_ps(p[s]);
        for (int64_t r = 0; r < R16; r += 16) {
            __m512 x;
            if (type == GgmlType::F32) {
                x = _mm512_loadu_ps(reinterpret_cast<const float*>(row) + r);
            } else {
                const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + r));
                x = type == GgmlType::F16 ? _mm512_cvtph_ps(h)
                                          : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            }
            _mm512_storeu_ps(out + r, _mm512_fmadd_ps(w, x, _mm512_loadu_ps(out + r)));
        }
        if (R16 < R) axpy_scalar(type, row + R16 * (type == GgmlType::F32 ? 4 : 2), stride, 1, R - R16, p + s, out + R16);
    }
}

// p rounded to the cache's precision, as llama.cpp's mix with a lower-precision V does.
inline float round_to(GgmlType type, float v) {
    if (type == GgmlType::F16) return half_to_float(float_to_half(v));
    if (type == GgmlType::BF16) return bf16_to_float(float_to_bf16(v));
    return v;
}

}  // namespace

void axpy_rows(GgmlType type, const uint8_t* rows, size_t stride, int64_t n, int64_t R, const float* p, float* out,
               Isa isa) {
    if (isa >= Isa::Avx512) return axpy_avx512(type, rows, stride, n, R, p, out);
    if (isa >= Isa::Avx2) return axpy_avx2(type, rows, stride, n, R, p, out);
    axpy_scalar(type, rows, stride, n, R, p, out);
}

void mla_attention(ThreadPool& pool, int64_t H, int64_t T, int64_t S, int64_t R, int64_t Dr, const float* q_lat,
                   const float* q_pe, GgmlType cache_type, const uint8_t* c_kv, const uint8_t* k_pe, float scale,
                   float* o_lat, Isa isa) {
    const GgmlType act = type_info(static_cast<int32_t>(cache_type))->act_type;
    const size_t kv_stride = row_size(cache_type, R), pe_stride = row_size(cache_type, Dr);
    const size_t qa_stride = row_size(act, R), pa_stride = row_size(act, Dr);
    auto head = [&](int64_t h, int) {
        // per-thread scratch, grown as needed and kept: no allocation per call once warm
        thread_local std::vector<uint8_t> qa, pa;
        thread_local std::vector<float> s1, s2;
        qa.resize(static_cast<size_t>(T) * qa_stride);
        pa.resize(static_cast<size_t>(T) * pa_stride);
        s1.resize(static_cast<size_t>(T * S));
        s2.resize(static_cast<size_t>(T * S));
        for (int64_t t = 0; t < T; ++t) {
            quantize_activation_row(act, q_lat + (h * T + t) * R, qa.data() + t * qa_stride, R);
            quantize_activation_row(act, q_pe + (h * T + t) * Dr, pa.data() + t * pa_stride, Dr);
        }
        // scores in tiles of 8 new tokens, each against only the positions its last token sees (causal)
        for (int64_t t0 = 0; t0 < T; t0 += 8) {
            const int64_t nt = std::min<int64_t>(8, T - t0), seen = S - T + t0 + nt;
            matmul_rows(cache_type, R, c_kv, kv_stride, 0, seen, qa.data() + t0 * qa_stride, qa_stride, nt,
                        s1.data() + t0 * S, S, isa);
            matmul_rows(cache_type, Dr, k_pe, pe_stride, 0, seen, pa.data() + t0 * pa_stride, pa_stride, nt,
                        s2.data() + t0 * S, S, isa);
        }
        for (int64_t t = 0; t < T; ++t) {
            const int64_t n = S - T + t + 1;  // causal: the new token t sees the cache and new tokens up to itself
            float* sc = s1.data() + t * S;
            const float* pe = s2.data() + t * S;
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
            for (int64_t s = 0; s < n; ++s) sc[s] = round_to(cache_type, sc[s] * inv);
            float* o = o_lat + (h * T + t) * R;
            std::fill(o, o + R, 0.0f);
            axpy_rows(cache_type, c_kv, kv_stride, n, R, sc, o, isa);
        }
    };
    if (H * T * S * (R + Dr) < (1 << 15)) {
        for (int64_t h = 0; h < H; ++h) head(h, 0);
    } else {
        pool.parallel_for(H, head);
    }
}

}  // namespace tandem
