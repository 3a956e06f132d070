// Internal: the per-ISA kernel tables behind dot_kernel() (dot.cpp). Each SIMD table lives in its
// own translation unit compiled for that ISA (dot_avx2.cpp, dot_avx512.cpp, dot_avx512_vnni.cpp), so
// no instruction beyond the baseline reaches code that runs before the CPU check.
#pragma once

#include "attention.h"
#include "dot.h"

namespace tandem::detail {

// The 32-value block types can also take the activation block scales already converted to f32:
// matmul_rows converts them once per token tile (convert_scales) instead of once per weight row.
// act_d is [n_act][n / 32] (Q8_0 activations) or [n_act][n / 32][2] (Q8_1: d, s).
struct ScaledDotKernel {
    void (*dot)(int64_t n, const void* w_row, const void* act_rows, size_t act_row_stride, const float* act_d,
                int n_act, float* out) = nullptr;
    void (*convert_scales)(const void* act_rows, size_t act_row_stride, int n_act, int64_t n_blocks,
                           float* act_d) = nullptr;
};

// Two weight rows against the same activation rows (n_act 1..2; 1..8 from AVX-512 on): out0[j] = dot(w0,
// act_j), out1[j] = dot(w1, act_j). Decode reads the float types' rows two at a time, far apart: two streams
// side by side keep more of the memory bandwidth busy than one (matmul_rows); from 3 rows on a weight load
// serves twice the activation rows.
using DotKernel2 = void (*)(int64_t n, const void* w0, const void* w1, const void* act_rows, size_t act_row_stride,
                            int n_act, float* out0, float* out1);

// Each returns nullptr (an empty ScaledDotKernel) for a type it has no kernel for.
namespace scalar { DotKernel kernel(GgmlType wtype); }
namespace avx2 {
DotKernel kernel(GgmlType wtype);
DotKernel2 kernel2(GgmlType wtype);  // F32 / F16 / BF16
ScaledDotKernel scaled_kernel(GgmlType wtype);
void swiglu(const float* g, const float* u, float* h, int64_t n);  // swiglu() from Isa::Avx2 (dot_avx2.cpp)
// quantize_activation_row's Q8_0 / Q8_1 (q8_1) and Q8_K rows below AVX-512 (dot_avx2.cpp): the same bytes
void quantize_act_q8_0(const float* x, void* dst, int64_t n, bool q8_1);
void quantize_act_q8_k(const float* x, void* dst, int64_t n);
// attention.cpp's kernels (dot_simd.h): columns [r0, r0 + 8 nv) of a mix, and one row's softmax (pe may be null)
void mix_cols(const MixRows& m, int64_t r0, int nv);
void softmax_row(float* sc, const float* pe, int64_t n, float scale, GgmlType type);
}
namespace avx512 {
DotKernel kernel(GgmlType wtype);
DotKernel2 kernel2(GgmlType wtype);  // F32 / F16 / BF16
ScaledDotKernel scaled_kernel(GgmlType wtype);
// quantize_activation_row's Q8_0 / Q8_1 (q8_1) and Q8_K rows (dot_avx512.cpp): the same bytes
void quantize_act_q8_0(const float* x, void* dst, int64_t n, bool q8_1);
void quantize_act_q8_k(const float* x, void* dst, int64_t n);
void mix_cols(const MixRows& m, int64_t r0, int nv);  // columns [r0, r0 + 16 nv)
void softmax_row(float* sc, const float* pe, int64_t n, float scale, GgmlType type);
// attention scores of cache rows [p0, p1) (`ws` bytes apart, F32 / F16 / BF16) against na query rows (float,
// rounded to the cache's type: round_to_cache_row; `as` bytes apart), n values each: y[r * ys + p] = w_p . a_r,
// as matmul_rows sums them
void score_span(GgmlType type, int64_t n, const uint8_t* w, size_t ws, int64_t p0, int64_t p1, const float* a,
                size_t as, int64_t na, float* y, size_t ys);
void round_to_cache_row(GgmlType type, const float* x, float* y, int64_t n);  // y = x rounded to the type
}
namespace avx512_vnni {
DotKernel kernel(GgmlType wtype);
DotKernel2 kernel2(GgmlType wtype);  // F32 / F16 / BF16
ScaledDotKernel scaled_kernel(GgmlType wtype);
DotKernel bf16_dpbf16_kernel();  // BF16 x BF16 with _mm512_dpbf16_ps: only where the CPU has AVX512_BF16
DotKernel2 bf16_dpbf16_kernel2();
// columns [r0, r0 + 16 nv) of a mix over a BF16 cache, with _mm512_dpbf16_ps: only where the CPU has AVX512_BF16
void mix_cols_bf16(const MixRows& m, int64_t r0, int nv);
// avx512::score_span over a BF16 cache with _mm512_dpbf16_ps, the query rows in bf16 (same condition)
void score_span_bf16(int64_t n, const uint8_t* w, size_t ws, int64_t p0, int64_t p1, const uint16_t* a, size_t as,
                     int64_t na, float* y, size_t ys);
}

}  // namespace tandem::detail
