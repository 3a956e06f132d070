// One layer's grouped-query attention block (Qwen3-MoE) on the CPU engine, in one call from Python (the
// dozen small torch ops of a decode step and their hand-offs took as long as the weights they read).
// Legend: T new tokens, H query heads, G KV heads, Dh head dim, D hidden.
//   q = q_proj x [T, H, Dh], k = k_proj x, v = v_proj x [T, G, Dh]
//   q, k per head rmsnorm'd (where q_norm / k_norm are given), then rotated (rope over all Dh dims)
//   k, v -> cache rows start..start+T;  o = gqa_attention(q, cache) (attention.h);  out = o_proj(o) [T, D]
#pragma once

#include <cstdint>
#include <vector>

#include "engine.h"

namespace tandem {

struct GqaLayer {
    int64_t H = 0, G = 0, Dh = 0;
    Weight q, k, v;                    // [H*Dh, D], [G*Dh, D], [G*Dh, D]
    Weight o;                          // [D, H*Dh]
    std::vector<float> q_norm, k_norm;  // [Dh] each, or empty (no per-head norm)
    float eps = 1e-6f;                 // the per-head norms' epsilon
    float scale = 1.0f;                // softmax scale
    bool rope_interleaved = false;     // false: rotate halves (NEOX, Qwen); true: pairs (x0, x1)
};

// x [T, D] float32 (the normed layer input) -> out [T, D]. cos/sin [T, Dh/2] (magnitude included); the
// caches k, v [>= start+T, G, Dh] (F32, F16 or BF16) hold the earlier positions in rows 0..start and get
// the new ones in rows start..start+T.
void gqa_forward(ThreadPool& pool, const GqaLayer& layer, const float* x, int64_t T, const float* cos,
                 const float* sin, GgmlType cache_type, uint8_t* k_cache, uint8_t* v_cache, int64_t start, float* out,
                 Isa isa);

}  // namespace tandem
