// MLA's attention core in latent space (DeepSeek decode, llama.cpp's `-mla` path), on the engine's pool:
//   scores[h,t,s] = scale * (q_lat[h,t] . c_kv[s] + q_pe[h,t] . k_pe[s]),  s < S - T + t + 1 (causal)
//   p = softmax(scores) over s;   o_lat[h,t] = sum_s p[s] c_kv[s]
// The cache rows (c_kv [S, R], k_pe [S, Dr]) are F32, F16 or BF16. As llama.cpp does with a cache in
// lower precision, the queries are rounded to the cache's type for the dot products and p is rounded
// to it for the mix; every sum is in float32.
#pragma once

#include <cstdint>

#include "dot.h"
#include "threadpool.h"

namespace tandem {

void mla_attention(ThreadPool& pool, int64_t H, int64_t T, int64_t S, int64_t R, int64_t Dr, const float* q_lat,
                   const float* q_pe, GgmlType cache_type, const uint8_t* c_kv, const uint8_t* k_pe, float scale,
                   float* o_lat, Isa isa);

// out[0:R] += sum_{s < n} p[s] * row_s[0:R], rows `stride` bytes apart in `type` (F32 / F16 / BF16).
void axpy_rows(GgmlType type, const uint8_t* rows, size_t stride, int64_t n, int64_t R, const float* p, float* out,
               Isa isa);

}  // namespace tandem
