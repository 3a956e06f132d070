// The CPU engine's ops on top of the dot kernels and the thread pool:
//   linear:  Y[T, N] = X[T, K] W[N, K]^T, activations quantized as llama.cpp does for W's type;
//   moe:     out[T, H] = sum_a w[t,a] expert_{id[t,a]}(x[t]) + sum_s shared_s(x[t]),
//            expert(x) = down(silu(gate(x)) * up(x)), tokens grouped per expert so each expert's
//            weights stream once per call.
// Legend: T tokens, H hidden, I expert width, E experts, A active per token (top-k).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "dot.h"
#include "threadpool.h"

namespace tandem {

// One weight matrix in a GGUF block layout: `rows` rows of `cols` values, row r at data + r*row_stride.
struct Weight {
    GgmlType type = GgmlType::F32;
    const uint8_t* data = nullptr;
    int64_t rows = 0;
    int64_t cols = 0;
    size_t row_stride = 0;
};

struct Expert {
    Weight gate, up, down;  // gate/up [I, H], down [H, I]
};

// Y row t = rmsnorm(X row t) * w for t < T, rows of n values, the statistic in double (torch.rms_norm's
// float accumulation differs in the last bits); Y may be X.
void rms_norm_rows(const float* X, int64_t T, int64_t n, const float* w, float eps, float* Y);

// Y row t = W x_t for t < T. X is float32 [T, K] (K = w.cols), Y float32 [T, N] (N = w.rows).
void linear(ThreadPool& pool, const Weight& w, const float* X, int64_t T, float* Y, Isa isa);

// B independent products: Y[b] [T, N] = X[b] [T, K] W_b^T, for a stack of B matrices of one type and
// shape (MLA's per-head W_UK / W_UV). X float32 [B, T, K], Y float32 [B, T, N].
void linear_batched(ThreadPool& pool, const Weight* ws, int64_t B, const float* X, int64_t T, float* Y, Isa isa);

// Products of one input with several matrices in one pass over the pool, Ys[i] [T, N_i] = X W_i^T (MLA's
// q and kv_a, an MLP's gate and up): X is quantized once per activation format and no thread waits
// between the matrices. All ws[i].cols equal K = X's width.
void linear_group(ThreadPool& pool, const Weight* ws, int n, const float* X, int64_t T, float* const* Ys, Isa isa);

// ids [T, A] (-1 = skip this slot), weights [T, A]; experts[E]; `shared` run on every token with
// weight 1; skip[e] != 0 leaves routed expert e out (it lives on the GPU). out [T, H] is overwritten.
void moe(ThreadPool& pool, const float* X, int64_t T, int64_t H, const int64_t* ids, const float* weights,
         int A, const Expert* experts, int64_t E, const Expert* shared, int n_shared, const uint8_t* skip,
         float* out, Isa isa);

}  // namespace tandem
