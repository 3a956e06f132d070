#include "router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace tandem {
namespace {

// indices of the k largest v[i] (i < n), largest first; ties go to the lower index, as torch.topk on CPU
void top_k(const float* v, int64_t n, int k, int64_t* out) {
    thread_local std::vector<int64_t> order;
    order.resize(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
        return v[a] > v[b] || (v[a] == v[b] && a < b);
    });
    std::copy(order.begin(), order.begin() + k, out);
}

}  // namespace

void route(ThreadPool& pool, const Router& r, const float* X, int64_t T, int64_t* ids, float* weights, Isa isa) {
    const int64_t E = r.w.rows, G = r.n_group, per_group = E / G;
    const int A = r.top_k;
    std::vector<float> logits(static_cast<size_t>(T * E));
    linear(pool, r.w, X, T, logits.data(), isa);
    std::vector<float> choice(static_cast<size_t>(E)), group_score(static_cast<size_t>(G));
    std::vector<int64_t> groups(static_cast<size_t>(r.topk_group));
    for (int64_t t = 0; t < T; ++t) {
        float* s = logits.data() + t * E;  // -> scores in place
        if (r.scoring == Router::Scoring::Sigmoid) {
            for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + std::exp(-s[e]));
        } else {
            const float mx = *std::max_element(s, s + E);
            float sum = 0;
            for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(s[e] - mx));
            for (int64_t e = 0; e < E; ++e) s[e] /= sum;
        }
        int64_t* id = ids + t * A;
        float* w = weights + t * A;
        if (r.method == Router::Method::Greedy) {
            top_k(s, E, A, id);
        } else {
            const bool noaux = r.method == Router::Method::NoAuxTc;
            for (int64_t e = 0; e < E; ++e) choice[e] = noaux ? s[e] + r.bias[e] : s[e];
            for (int64_t g = 0; g < G; ++g) {
                const float* c = choice.data() + g * per_group;
                if (noaux) {  // the sum of the group's two best
                    int64_t best[2];
                    top_k(c, per_group, 2, best);
                    group_score[g] = c[best[0]] + c[best[1]];
                } else {
                    group_score[g] = *std::max_element(c, c + per_group);
                }
            }
            top_k(group_score.data(), G, r.topk_group, groups.data());
            // experts outside the kept groups: -inf (noaux_tc) or 0 (V2's masked_fill), as the reference
            const float fill = noaux ? -std::numeric_limits<float>::infinity() : 0.0f;
            std::vector<bool> keep(static_cast<size_t>(G), false);
            for (int64_t g : groups) keep[g] = true;
            for (int64_t e = 0; e < E; ++e)
                if (!keep[e / per_group]) choice[e] = fill;
            top_k(choice.data(), E, A, id);
        }
        for (int a = 0; a < A; ++a) w[a] = s[id[a]];
        if (r.norm_topk && A > 1) {
            float sum = 0;
            for (int a = 0; a < A; ++a) sum += w[a];
            for (int a = 0; a < A; ++a) w[a] /= sum + 1e-20f;
        }
        for (int a = 0; a < A; ++a) w[a] *= r.scaling;
    }
}

}  // namespace tandem
