#include "mla.h"

#include <cmath>
#include <cstring>

#include "attention.h"

namespace tandem {

void mla_forward(ThreadPool& pool, const MlaLayer& L, const float* x, int64_t T, const float* cos, const float* sin,
                 GgmlType cache_type, uint8_t* c_kv, uint8_t* k_pe, int64_t start, float* out, Isa isa) {
    const int64_t H = L.H, Dn = L.Dn, Dr = L.Dr, R = L.R, Dv = L.Dv, Dq = Dn + Dr;
    // scratch kept per calling thread: a prefill chunk's fresh buffers (~60 MB at T=512) page-faulted
    // in on every layer cost more than the block's arithmetic
    // (the pool's threads reach them through these references: a thread_local named in a lambda would be theirs)
    struct Scratch {
        std::vector<float> q, latent, qa, q_nope, q_pe, q_lat, o_lat, v, heads;
    };
    thread_local Scratch scratch;
    auto &q = scratch.q, &latent = scratch.latent, &qa = scratch.qa, &q_nope = scratch.q_nope, &q_pe = scratch.q_pe;
    auto &q_lat = scratch.q_lat, &o_lat = scratch.o_lat, &v = scratch.v, &heads = scratch.heads;
    q.resize(T * H * Dq), latent.resize(T * (R + Dr)), q_nope.resize(H * T * Dn), q_pe.resize(H * T * Dr);
    q_lat.resize(H * T * R), o_lat.resize(H * T * R), v.resize(H * T * Dv);
    // 1. projections of x: q (through the q LoRA when there is one) and the latent, in one pass
    if (L.q_a.rows) {
        qa.resize(T * L.q_a.rows);
        const Weight ws[2] = {L.q_a, L.kv_a};
        float* ys[2] = {qa.data(), latent.data()};
        linear_group(pool, ws, 2, x, T, ys, isa);
        rms_norm_rows(qa.data(), T, L.q_a.rows, L.q_a_norm.data(), L.eps, qa.data());
        linear(pool, L.q, qa.data(), T, q.data(), isa);
    } else {
        const Weight ws[2] = {L.q, L.kv_a};
        float* ys[2] = {q.data(), latent.data()};
        linear_group(pool, ws, 2, x, T, ys, isa);
    }
    // 2. per new token: its latent normed and rotated into the cache, its queries split by head and the
    // rope part rotated (q [T, H, Dq] -> q_nope [H, T, Dn], q_pe [H, T, Dr])
    const size_t kv_stride = row_size(cache_type, R), pe_stride = row_size(cache_type, Dr);
    pool.parallel_for(T, [&](int64_t t, int) {
        const float *c = cos + t * (Dr / 2), *s = sin + t * (Dr / 2);
        float* lat = latent.data() + t * (R + Dr);
        rms_norm_rows(lat, 1, R, L.kv_a_norm.data(), L.eps, lat);
        rope_rotate(lat + R, Dr, c, s, L.rope_interleaved);
        store_cache_row(cache_type, lat, R, c_kv + (start + t) * kv_stride);
        store_cache_row(cache_type, lat + R, Dr, k_pe + (start + t) * pe_stride);
        for (int64_t h = 0; h < H; ++h) {
            const float* qh = q.data() + (t * H + h) * Dq;
            float* pe = q_pe.data() + (h * T + t) * Dr;
            std::memcpy(q_nope.data() + (h * T + t) * Dn, qh, sizeof(float) * static_cast<size_t>(Dn));
            std::memcpy(pe, qh + Dn, sizeof(float) * static_cast<size_t>(Dr));
            rope_rotate(pe, Dr, c, s, L.rope_interleaved);
        }
    });
    // 3. absorbed attention: W_UK into the query, the latent mix, W_UV out of it
    linear_batched(pool, L.uk.data(), H, q_nope.data(), T, q_lat.data(), isa);
    mla_attention(pool, H, T, start + T, R, Dr, q_lat.data(), q_pe.data(), cache_type, c_kv, k_pe, L.scale,
                  o_lat.data(), isa);
    linear_batched(pool, L.uv.data(), H, o_lat.data(), T, v.data(), isa);
    // 4. the output projection, of [H, T, Dv] as [T, H*Dv]
    linear(pool, L.o, heads_to_tokens(pool, v.data(), H, T, Dv, heads), T, out, isa);
}

}  // namespace tandem
