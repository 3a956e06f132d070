// MLA's attention core in latent space (DeepSeek decode, llama.cpp's `-mla` path), on the engine's pool:
//   scores[h,t,s] = scale * (q_lat[h,t] . c_kv[s] + q_pe[h,t] . k_pe[s]),  s < S - T + t + 1 (causal)
//   p = softmax(scores) over s;   o_lat[h,t] = sum_s p[s] c_kv[s]
// The cache rows (c_kv [S, R], k_pe [S, Dr]) are F32, F16 or BF16. As llama.cpp does with a cache in
// lower precision, the queries are rounded to the cache's type for the dot products and p is rounded
// to it for the mix; every sum is in float32. All the heads of up to 8 new tokens go through the cache
// together, so it is read once for their scores and once for their mix.
#pragma once

#include <cstdint>
#include <vector>

#include "dot.h"
#include "threadpool.h"

namespace tandem {

void mla_attention(ThreadPool& pool, int64_t H, int64_t T, int64_t S, int64_t R, int64_t Dr, const float* q_lat,
                   const float* q_pe, GgmlType cache_type, const uint8_t* c_kv, const uint8_t* k_pe, float scale,
                   float* o_lat, Isa isa);

// Grouped-query attention (Qwen3-MoE) over caches of keys and values [S, G, Dh] in the same way:
//   scores[h,t,s] = scale * q[h,t] . k[s, g],  p = softmax (causal),  out[h,t] = sum_s p[s] v[s, g]
// for query head h of KV head g = h / (H / G) (the heads of a KV head adjacent, as HF's repeat_kv has them).
// q and out are float32 [H, T, Dh]. Every KV head's queries of a tile go through its rows together.
void gqa_attention(ThreadPool& pool, int64_t H, int64_t G, int64_t T, int64_t S, int64_t Dh, const float* q,
                   GgmlType cache_type, const uint8_t* k, const uint8_t* v, float scale, float* out, Isa isa);

// x[0:d] rotated by the angles whose cos/sin [d/2] are given: pairs (x0, x1) (interleaved, DeepSeek) or the
// halves (x_i, x_{i+d/2}) (NEOX, Qwen)
void rope_rotate(float* x, int64_t d, const float* cos, const float* sin, bool interleaved);

// Per-head rows [H, T, D] as per-token rows [T, H*D] (an output projection's input): src itself for one token
// (the same layout), else copied into `buf` over the pool
const float* heads_to_tokens(ThreadPool& pool, const float* src, int64_t H, int64_t T, int64_t D,
                             std::vector<float>& buf);

// n floats into a cache row of `type` (F32, F16 or BF16)
void store_cache_row(GgmlType type, const float* x, int64_t n, uint8_t* dst);

// The mix of many rows of probabilities at once: out[i][0:R] += sum_{s < n[i]} p[i][s] row_s[0:R] for i <
// n_rows, the cache rows `stride` bytes apart in `type` (F32 / F16 / BF16), p[i] at p + i * p_stride. Each
// output value sums its products in position order, one fused multiply-add each (a scalar loop below AVX2).
struct MixRows {
    GgmlType type;
    const uint8_t* rows;
    size_t stride;
    int64_t R, n_rows;
    const int64_t* n;
    const float* p;
    size_t p_stride;
    float* const* out;
};
// Positions a mix task takes at a time (attention.cpp), prefetching the next span's rows while it works; each
// row loads and stores its accumulators once a span. From 16 positions to 48, when the SIMD mix converted each
// span to float first, the whole attention call of V2-Lite's 16 heads took 0.83-0.90x the time with an f32
// cache (1 and 64 tokens, 1088-4160 positions; the same floats), 0.70-0.84x with bf16. Since the mix reads
// the rows themselves, 16 to 192 were within the noise of 48 (Qwen3's and V2-Lite's heads, f32 and f16). The
// bf16 mix (dot_avx512_vnni.cpp) keeps a span as bf16 pairs (64 x 128 x 2 bytes).
constexpr int64_t kMixBlock = 48, kMixBlockBf16 = 64;
// mix_rows does column slice `slice` of mix_slices(R, isa): slices are independent (tasks of a pool), each
// reads every position's share of the cache once for all the rows.
int64_t mix_slices(int64_t R, Isa isa);
void mix_rows(const MixRows& m, int64_t slice, Isa isa);

}  // namespace tandem
