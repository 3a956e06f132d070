#include "gqa.h"

#include <cstring>

#include "attention.h"

namespace tandem {

void gqa_forward(ThreadPool& pool, const GqaLayer& L, const float* x, int64_t T, const float* cos, const float* sin,
                 GgmlType cache_type, uint8_t* k_cache, uint8_t* v_cache, int64_t start, float* out, Isa isa) {
    const int64_t H = L.H, G = L.G, Dh = L.Dh;
    // scratch kept per calling thread, as mla_forward's (a prefill chunk's fresh buffers page-faulted in on
    // every layer cost more than the block's arithmetic)
    struct Scratch {
        std::vector<float> q, k, v, heads_q, heads_o, o;
    };
    thread_local Scratch scratch;
    auto &q = scratch.q, &k = scratch.k, &v = scratch.v, &heads_q = scratch.heads_q, &heads_o = scratch.heads_o;
    auto& o = scratch.o;
    q.resize(T * H * Dh), k.resize(T * G * Dh), v.resize(T * G * Dh);
    heads_q.resize(H * T * Dh), heads_o.resize(H * T * Dh);
    // 1. the three projections of x in one pass (x quantized once per activation format)
    const Weight ws[3] = {L.q, L.k, L.v};
    float* ys[3] = {q.data(), k.data(), v.data()};
    linear_group(pool, ws, 3, x, T, ys, isa);
    // 2. per new token: q and k normed per head and rotated (q [T, H, Dh] -> [H, T, Dh]); k and v into the cache
    const size_t stride = row_size(cache_type, G * Dh);
    pool.parallel_for(T, [&](int64_t t, int) {
        const float *c = cos + t * (Dh / 2), *s = sin + t * (Dh / 2);
        for (int64_t h = 0; h < H; ++h) {
            const float* src = q.data() + (t * H + h) * Dh;
            float* dst = heads_q.data() + (h * T + t) * Dh;
            if (L.q_norm.empty()) {
                std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(Dh));
            } else {
                rms_norm_rows(src, 1, Dh, L.q_norm.data(), L.eps, dst);
            }
            rope_rotate(dst, Dh, c, s, L.rope_interleaved);
        }
        float* kt = k.data() + t * G * Dh;
        for (int64_t g = 0; g < G; ++g) {
            if (!L.k_norm.empty()) rms_norm_rows(kt + g * Dh, 1, Dh, L.k_norm.data(), L.eps, kt + g * Dh);
            rope_rotate(kt + g * Dh, Dh, c, s, L.rope_interleaved);
        }
        store_cache_row(cache_type, kt, G * Dh, k_cache + (start + t) * stride);
        store_cache_row(cache_type, v.data() + t * G * Dh, G * Dh, v_cache + (start + t) * stride);
    });
    // 3. attention over the cache, every KV head's query heads together
    gqa_attention(pool, H, G, T, start + T, Dh, heads_q.data(), cache_type, k_cache, v_cache, L.scale,
                  heads_o.data(), isa);
    // 4. the output projection, of [H, T, Dh] as [T, H*Dh]
    linear(pool, L.o, heads_to_tokens(pool, heads_o.data(), H, T, Dh, o), T, out, isa);
}

}  // namespace tandem
