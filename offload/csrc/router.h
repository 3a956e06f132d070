// The MoE router on the CPU engine, as local/models/moe.py's Router computes it (DeepSeek-V2/V3, Qwen3):
//   logits = W x (float32), scores = softmax(logits) or sigmoid(logits);
//   greedy: top-k scores; group_limited_greedy (V2): keep the topk_group groups with the best single
//   score; noaux_tc (V3): rank groups by the sum of their top-2 biased scores, pick by biased score,
//   weigh by the unbiased one; then optionally renormalise the k weights and scale them.
// Legend: T tokens, E experts, A = top_k, H hidden.
#pragma once

#include <cstdint>
#include <vector>

#include "engine.h"

namespace tandem {

struct Router {
    enum class Scoring { Softmax, Sigmoid };
    enum class Method { Greedy, GroupLimited, NoAuxTc };
    Weight w;                 // [E, H]
    std::vector<float> bias;  // [E] for noaux_tc (the correction bias), else empty
    int top_k = 1, n_group = 1, topk_group = 1;
    Scoring scoring = Scoring::Softmax;
    Method method = Method::Greedy;
    bool norm_topk = false;
    float scaling = 1.0f;
};

// ids [T, A] int64 (best first) and weights [T, A] for x [T, H].
void route(ThreadPool& pool, const Router& r, const float* X, int64_t T, int64_t* ids, float* weights, Isa isa);

}  // namespace tandem
