// One layer's MLA block (DeepSeek-V2/V3) on the CPU engine, absorbed as llama.cpp's `-mla` path runs it,
// in one call from Python (a decode step's dozen small ops and their hand-offs cost more than the
// weights they read). Legend: T new tokens, H heads, D hidden, Rq q_lora_rank, R kv_lora_rank,
// Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.
//   q      = q_b(rmsnorm(q_a x)) [T, H, Dn+Dr]   (or q_proj x without a q LoRA)
//   latent = kv_a x [T, R+Dr]: c_kv = rmsnorm(latent[:R]), k_pe = rope(latent[R:]) -> cache rows start..
//   q_lat  = W_UK_h q_nope_h [H, T, R];  o_lat = mla_attention(q_lat, rope(q_pe), cache)   (attention.h)
//   out    = o_proj( W_UV_h o_lat_h ) [T, D]
#pragma once

#include <cstdint>
#include <vector>

#include "engine.h"

namespace tandem {

struct MlaLayer {
    int64_t H = 0, Dn = 0, Dr = 0, R = 0, Dv = 0;
    Weight q_a;                  // [Rq, D]; rows == 0 without a q LoRA
    std::vector<float> q_a_norm; // [Rq]
    Weight q;                    // q_b [H*(Dn+Dr), Rq], or q_proj [H*(Dn+Dr), D]
    Weight kv_a;                 // [R+Dr, D]
    std::vector<float> kv_a_norm;  // [R]
    std::vector<Weight> uk, uv;  // per head: W_UK [R, Dn], W_UV [Dv, R]
    Weight o;                    // [D, H*Dv]
    float eps = 1e-6f;           // the latent norms' epsilon
    float scale = 1.0f;          // softmax scale
    bool rope_interleaved = true;  // rotate pairs (x0, x1) (DeepSeek); false: halves (NEOX)
};

// x [T, D] float32 (the normed layer input) -> out [T, D]. cos/sin [T, Dr/2] (magnitude included);
// the cache rows 0..start hold the earlier positions and rows start..start+T get the new ones
// (c_kv [>= start+T, R], k_pe [>= start+T, Dr], both F32, F16 or BF16).
void mla_forward(ThreadPool& pool, const MlaLayer& layer, const float* x, int64_t T, const float* cos,
                 const float* sin, GgmlType cache_type, uint8_t* c_kv, uint8_t* k_pe, int64_t start, float* out,
                 Isa isa);

}  // namespace tandem
