#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "dot_kernels.h"

namespace tandem {
namespace {

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

// p rounded to the cache's precision, as llama.cpp's mix with a lower-precision V does.
inline float round_to(GgmlType type, float v) {
    if (type == GgmlType::F16) return half_to_float(float_to_half(v));
    if (type == GgmlType::BF16) return bf16_to_float(float_to_bf16(v));
    return v;
}

// One row's softmax in place: sc[s] = (sc[s] + pe[s]) * scale (pe null: sc[s] * scale), then
// p = exp(sc - max) / sum over s < n, rounded to the cache's precision. The scalar reference (libm's expf).
void softmax_scalar(float* sc, const float* pe, int64_t n, float scale, GgmlType type) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < n; ++s) {
        sc[s] = (sc[s] + (pe ? pe[s] : 0.0f)) * scale;
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

void softmax_row(float* sc, const float* pe, int64_t n, float scale, GgmlType type, Isa isa) {
    if (isa >= Isa::Avx512) return detail::avx512::softmax_row(sc, pe, n, scale, type);
    if (isa >= Isa::Avx2) return detail::avx2::softmax_row(sc, pe, n, scale, type);
    softmax_scalar(sc, pe, n, scale, type);
}

// A SIMD mix's vector width; its slices are 8 vectors wide (the accumulators a row keeps in registers),
// then one for the columns past the whole vectors, on the scalar loop. Below AVX2, one scalar slice.
int64_t mix_width(int64_t R, Isa isa) { return isa >= Isa::Avx512 ? 16 : isa >= Isa::Avx2 ? 8 : R; }

// Columns [c0, c1) of slice `slice` of mix_slices(R, isa)
std::pair<int64_t, int64_t> slice_cols(int64_t R, int64_t slice, Isa isa) {
    if (isa < Isa::Avx2) return {0, R};
    const int64_t width = mix_width(R, isa), simd = R / width * width, r0 = slice * 8 * width;
    return r0 >= simd ? std::pair<int64_t, int64_t>{simd, R} : std::pair<int64_t, int64_t>{r0, std::min(simd, r0 + 8 * width)};
}

}  // namespace

int64_t mix_slices(int64_t R, Isa isa) {
    const int64_t width = mix_width(R, isa), simd = R / width * width;
    return (simd + 8 * width - 1) / (8 * width) + (simd < R ? 1 : 0);
}

void mix_rows(const MixRows& m, int64_t slice, Isa isa) {
    const auto [r0, r1] = slice_cols(m.R, slice, isa);
    const int64_t width = mix_width(m.R, isa);
    if (isa < Isa::Avx2 || r0 >= m.R / width * width) return mix_scalar(m, r0, r1);  // the columns past the vectors
    const int nv = static_cast<int>((r1 - r0) / width);
    if (isa >= Isa::Avx512Vnni && m.type == GgmlType::BF16 && cpu_features().avx512_bf16)
        return detail::avx512_vnni::mix_cols_bf16(m, r0, nv);
    if (isa >= Isa::Avx512) return detail::avx512::mix_cols(m, r0, nv);
    detail::avx2::mix_cols(m, r0, nv);
}

namespace {

// Cache rows [p0, p1) (`stride` bytes apart) from byte `c0` to `c1` of each, into the L2 ahead of their use.
// A KV head's rows of a GQA cache [S, G, Dh] are a quarter or less of each position's bytes, and the hardware
// prefetchers, which stop at every 4 KiB page, did not keep up with them: Qwen3-30B-A3B's attention (32
// heads, 4 KV heads of 128, f16, 4096 positions, 2 threads) found its cache out of the caches (as in decode,
// where the layers' weights sweep it out) took 1330 us against 610 from the L3. Spans prefetched against one
// pass, in one process, 60 alternations: that call 0.72x the time found cold (0.79x from the L3), 0.91x for a
// tile of 8 tokens; MLA's (16 heads, f32), whose rows are whole positions, 0.86x (8 tokens 0.98x). An 8-layer
// Qwen3's decode step at 4096 positions: 0.87-0.93x (f16 and f32 caches).
void prefetch_rows(const uint8_t* rows, size_t stride, int64_t p0, int64_t p1, size_t c0, size_t c1) {
    for (int64_t p = p0; p < p1; ++p) {
        const uintptr_t row = reinterpret_cast<uintptr_t>(rows + p * stride);
        for (uintptr_t a = (row + c0) & ~uintptr_t(63); a < row + c1; a += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(a), 0, 2);
    }
}

// Positions a score or mix task computes at a time, prefetching the next span's rows while it does: a span
// of scores is 16 positions x 8 query rows x 128 values (~0.6 us of FMAs per thread with matmul_rows' kernel),
// a span of the mix kMixBlock positions (kMixBlockBf16 for the bf16 mix). With matmul_rows' kernel, spans of
// 8, 32, 64 and 128 positions were no faster (Qwen3-30B-A3B's heads, f32 and f16, 4096 positions: 0.97-1.16x
// the time); so was a kernel for a whole span holding each query row in registers against its 16 cache rows,
// its 16 sums stored as one vector (the same floats): 0.94x the time from the L3 but 1.03-1.07x cold, with an
// f32 cache; 1.01-1.03x with f16. Prefetching 2-6 spans ahead was no faster either; with the span kernels,
// prefetching into the L1 rather than the L2 took 1.09-1.80x the time (GQA and MLA, f32 and f16).
constexpr int64_t kScoreSpan = 16;

// Whether the scores of na query rows take AVX-512's span kernel (dot_simd.h score_span): four cache rows
// against four query rows at a time, each loaded vector feeding four products. matmul_rows took two cache rows
// against up to 8 query rows with each query vector loaded once per product (perf: ~2.2 cycles a product,
// against ~1.4 now). With the mix in tiles too (mix_cols_t), the attention call found cold (4096 positions, 2
// threads, medians of 4 alternated processes): Qwen3-30B-A3B's (32 heads, 4 KV heads of 128) 0.85x the time
// with an f32 cache and 0.81x with f16; DeepSeek-V2-Lite's MLA (16 heads) 0.77x with either; a tile of 8
// tokens 0.70x (Qwen3, f32) and 0.76x (V2-Lite, f16, 2048 positions). Each sum runs in matmul_rows' order
// (the same floats, but for a last tile of 1 or 2 query rows past 8, which it splits over 2 or 4
// accumulators). A BF16 cache with AVX512-BF16 takes the same tiles in _mm512_dpbf16_ps (score_span_bf16; with
// its mix in tiles too, the call 0.91-0.93x the time, GQA and MLA, in-process alternation). Below 3 rows,
// matmul_rows' decode path.
enum class Scores { Rows, Span, SpanBf16 };  // matmul_rows, score_span, score_span_bf16
Scores score_kernel(GgmlType type, int64_t na, Isa isa) {
    if (isa < Isa::Avx512 || na < 3) return Scores::Rows;
    const bool dpbf16 = type == GgmlType::BF16 && isa >= Isa::Avx512Vnni && cpu_features().avx512_bf16;
    return dpbf16 ? Scores::SpanBf16 : Scores::Span;
}

// A query row as the scores take it: for the span kernel, float rounded to the cache's precision (the same
// values as the act type's, without a conversion at every load: an f16 cache's call 0.94-0.97x the time, a
// tile of 8 tokens 0.92x (GQA) and 0.97x (MLA), in-process alternation; bf16 at AVX-512 0.92x cold); else the
// act type
size_t query_row_size(GgmlType act, int64_t n, Scores k) {
    return k == Scores::Span ? sizeof(float) * n : row_size(act, n);
}
void query_row(GgmlType type, GgmlType act, const float* x, uint8_t* dst, int64_t n, Scores k) {
    if (k == Scores::Span) return detail::avx512::round_to_cache_row(type, x, reinterpret_cast<float*>(dst), n);
    quantize_activation_row(act, x, dst, n);
}

// Scores of na query rows (query_row's, `as` bytes apart) against cache rows [p0, p1): y[r * ys + p]
void span_scores(GgmlType type, int64_t n, const uint8_t* w, size_t ws, int64_t p0, int64_t p1, const uint8_t* a,
                 size_t as, int64_t na, float* y, size_t ys, Scores k, Isa isa) {
    if (k == Scores::Span)
        return detail::avx512::score_span(type, n, w, ws, p0, p1, reinterpret_cast<const float*>(a), as, na, y, ys);
    if (k == Scores::SpanBf16)
        return detail::avx512_vnni::score_span_bf16(n, w, ws, p0, p1, reinterpret_cast<const uint16_t*>(a), as, na,
                                                    y, ys);
    matmul_rows(type, n, w, ws, p0, p1, a, as, na, y, ys, isa);
}

// One attention call over a cache shared by groups of query heads: G groups (MLA: one, every head against
// the latent; GQA: the KV heads) of Hg heads each. Group g's key rows (R values, and Dr more from a second
// stream of positional keys where Dr > 0) and value rows (R values) sit `group` bytes after group 0's, each
// position `stride` bytes after the last. q [G*Hg, T, R], q_pe [G*Hg, T, Dr], out [G*Hg, T, R].
struct Attend {
    int64_t G, Hg, T, S, R, Dr;
    const float *q, *q_pe;
    GgmlType type;
    const uint8_t *key, *pe, *val;
    size_t key_stride, pe_stride, val_stride, key_group, pe_group, val_group;
    float scale;
    float* out;
};

void attend(ThreadPool& pool, const Attend& a, Isa isa) {
    const int64_t T = a.T, S = a.S, R = a.R, Dr = a.Dr;
    const GgmlType act = type_info(static_cast<int32_t>(a.type))->act_type;
    // The new tokens in tiles of up to 8, every head of a tile at once (a group's rows i = j * nt + t for its
    // head j): a group's cache rows are read once a tile for the scores and once for the mix. A head at a time,
    // as before, read them 2 H times. DeepSeek-V2-Lite's decode (16 heads, R 512, an f16 cache), 2 threads, per
    // layer and token: 1.21 -> 0.37 ms at 1024 positions, 3.64 -> 1.55 ms at 4096, 19.0 -> 6.3 ms at 16384 (with
    // the vectorized softmax: libm's expf and the software f16 rounding took 0.6 ms of it at 4096).
    constexpr int64_t kTile = 8;
    const int64_t tile = std::min(T, kTile), max_rows = a.G * a.Hg * tile;
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
    qa.resize(static_cast<size_t>(max_rows) * std::max(query_row_size(act, R, Scores::Span), row_size(act, R)));
    pa.resize(static_cast<size_t>(max_rows) * std::max(query_row_size(act, Dr, Scores::Span), row_size(act, Dr)));
    s1.resize(static_cast<size_t>(max_rows * S));
    s2.resize(static_cast<size_t>(Dr ? max_rows * S : 0));
    n_seen.resize(static_cast<size_t>(max_rows));
    outs.resize(static_cast<size_t>(max_rows));
    // small calls on the calling thread alone (waking the pool costs more than they take)
    const bool inline_only = a.G * a.Hg * T * S * (R + Dr) < (1 << 15);
    auto run = [&](int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
        if (inline_only) {
            for (int64_t k = 0; k < n_tasks; ++k) fn(k, 0);
        } else {
            pool.parallel_for(n_tasks, fn);
        }
    };
    for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t nt = std::min(kTile, T - t0), rows_g = a.Hg * nt, rows = a.G * rows_g, seen = S - T + t0 + nt;
        const Scores kernel = score_kernel(a.type, rows_g, isa);
        const size_t qa_stride = query_row_size(act, R, kernel), pa_stride = Dr ? query_row_size(act, Dr, kernel) : 0;
        run(rows, [&](int64_t i, int) {
            const int64_t h = i / nt, t = t0 + i % nt;  // h = g * Hg + j: the groups' rows follow each other
            query_row(a.type, act, a.q + (h * T + t) * R, qa.data() + i * qa_stride, R, kernel);
            if (Dr) query_row(a.type, act, a.q_pe + (h * T + t) * Dr, pa.data() + i * pa_stride, Dr, kernel);
            n_seen[i] = S - T + t + 1;  // causal: token t sees the cache and the new tokens up to itself
            outs[i] = a.out + (h * T + t) * R;
        });
        // scores of every row against the positions the tile's last token sees, in slabs of positions
        const int64_t slabs = std::max<int64_t>(1, std::min<int64_t>((4 * pool.threads() + a.G - 1) / a.G, seen / 64));
        const int64_t slab = ((seen + slabs - 1) / slabs + 15) / 16 * 16, per_group = (seen + slab - 1) / slab;
        const size_t key_bytes = row_size(a.type, R), pe_bytes = Dr ? row_size(a.type, Dr) : 0;
        run(a.G * per_group, [&](int64_t k, int) {
            const int64_t g = k / per_group, p0 = k % per_group * slab, p1 = std::min(seen, p0 + slab);
            const int64_t r0 = g * rows_g;
            const uint8_t *key = a.key + g * a.key_group, *pe = Dr ? a.pe + g * a.pe_group : nullptr;
            for (int64_t q0 = p0; q0 < p1; q0 += kScoreSpan) {
                const int64_t q1 = std::min(p1, q0 + kScoreSpan), next = std::min(p1, q1 + kScoreSpan);
                prefetch_rows(key, a.key_stride, q1, next, 0, key_bytes);
                if (Dr) prefetch_rows(pe, a.pe_stride, q1, next, 0, pe_bytes);
                span_scores(a.type, R, key, a.key_stride, q0, q1, qa.data() + r0 * qa_stride, qa_stride, rows_g,
                            s1.data() + r0 * S, S, kernel, isa);
                if (Dr)
                    span_scores(a.type, Dr, pe, a.pe_stride, q0, q1, pa.data() + r0 * pa_stride, pa_stride, rows_g,
                                s2.data() + r0 * S, S, kernel, isa);
            }
        });
        run(rows, [&](int64_t i, int) {  // softmax, p rounded to the cache's precision; the outputs zeroed
            softmax_row(s1.data() + i * S, Dr ? s2.data() + i * S : nullptr, n_seen[i], a.scale, a.type, isa);
            std::fill(outs[i], outs[i] + R, 0.0f);
        });
        // the mix in spans of positions, in position order (each output sums its products in the same order as
        // in one pass), every row's count cut to the span
        const int64_t slices = mix_slices(R, isa);
        const bool bf16_mix = isa >= Isa::Avx512Vnni && a.type == GgmlType::BF16 && cpu_features().avx512_bf16;
        const int64_t span = bf16_mix ? kMixBlockBf16 : kMixBlock;
        const size_t elt = a.type == GgmlType::F32 ? 4 : 2;
        run(a.G * slices, [&](int64_t k, int) {
            const int64_t g = k / slices, r0 = g * rows_g;
            const auto [c0, c1] = slice_cols(R, k % slices, isa);
            const uint8_t* val = a.val + g * a.val_group;
            std::vector<int64_t> n_span(static_cast<size_t>(rows_g));
            const int64_t last = *std::max_element(n_seen.begin() + r0, n_seen.begin() + r0 + rows_g);
            for (int64_t p0 = 0; p0 < last; p0 += span) {
                const int64_t p1 = std::min(last, p0 + span);
                prefetch_rows(val, a.val_stride, p1, std::min(last, p1 + span), c0 * elt, c1 * elt);
                for (int64_t i = 0; i < rows_g; ++i) n_span[i] = std::clamp<int64_t>(n_seen[r0 + i] - p0, 0, p1 - p0);
                const MixRows m{a.type, val + p0 * a.val_stride, a.val_stride, R, rows_g, n_span.data(),
                                s1.data() + r0 * S + p0, static_cast<size_t>(S), outs.data() + r0};
                mix_rows(m, k % slices, isa);
            }
        });
    }
}

}  // namespace

void mla_attention(ThreadPool& pool, int64_t H, int64_t T, int64_t S, int64_t R, int64_t Dr, const float* q_lat,
                   const float* q_pe, GgmlType cache_type, const uint8_t* c_kv, const uint8_t* k_pe, float scale,
                   float* o_lat, Isa isa) {
    const size_t kv_stride = row_size(cache_type, R), pe_stride = row_size(cache_type, Dr);
    attend(pool, Attend{1, H, T, S, R, Dr, q_lat, q_pe, cache_type, c_kv, k_pe, c_kv, kv_stride, pe_stride, kv_stride,
                        0, 0, 0, scale, o_lat}, isa);
}

void gqa_attention(ThreadPool& pool, int64_t H, int64_t G, int64_t T, int64_t S, int64_t Dh, const float* q,
                   GgmlType cache_type, const uint8_t* k, const uint8_t* v, float scale, float* out, Isa isa) {
    const size_t stride = row_size(cache_type, G * Dh), group = row_size(cache_type, Dh);
    attend(pool, Attend{G, H / G, T, S, Dh, 0, q, nullptr, cache_type, k, nullptr, v, stride, 0, stride, group, 0,
                        group, scale, out}, isa);
}

void rope_rotate(float* x, int64_t d, const float* cos, const float* sin, bool interleaved) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) {
        float* a = interleaved ? x + 2 * i : x + i;
        float* b = interleaved ? x + 2 * i + 1 : x + i + half;
        const float x0 = *a, x1 = *b;
        *a = x0 * cos[i] - x1 * sin[i];
        *b = x0 * sin[i] + x1 * cos[i];
    }
}

const float* heads_to_tokens(ThreadPool& pool, const float* src, int64_t H, int64_t T, int64_t D,
                             std::vector<float>& buf) {
    if (T == 1) return src;
    buf.resize(static_cast<size_t>(T * H * D));
    pool.parallel_for(T, [&](int64_t t, int) {
        for (int64_t h = 0; h < H; ++h)
            std::memcpy(buf.data() + (t * H + h) * D, src + (h * T + t) * D, sizeof(float) * static_cast<size_t>(D));
    });
    return buf.data();
}

void store_cache_row(GgmlType type, const float* x, int64_t n, uint8_t* dst) {
    if (type == GgmlType::F32) {
        std::memcpy(dst, x, sizeof(float) * static_cast<size_t>(n));
        return;
    }
    auto* h = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) h[i] = type == GgmlType::F16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
}

}  // namespace tandem
