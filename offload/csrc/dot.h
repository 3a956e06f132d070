// Quantized dot products of one weight row against up to 8 activation rows, and the single-threaded
// row-range matmul built on them. Weight blocks are llama.cpp's (ggml-common.h); each weight type is
// multiplied by the activation type llama.cpp pairs it with (`vec_dot_type`):
//
//   weight            activation   per-block product
//   Q4_0 Q5_0 Q8_0    Q8_0         d_w d_a sum(q_w q_a)              (q_w - 8 / - 16 for Q4_0 / Q5_0)
//   Q4_1 Q5_1         Q8_1         d_w d_a sum(q_w q_a) + m_w s_a     (s_a = f16(d_a sum q_a))
//   Q4_K Q5_K Q6_K    Q8_K         d_a (d sum_k sc_k sum q_w q_a - dmin sum_k m_k S_k), S_k from bsums
//   F16 / BF16 / F32  F16 / BF16 / F32
//
// Every kernel has a scalar reference; AVX2, AVX-512 (F/BW/VL/DQ) and AVX-512-VNNI variants are
// compiled with target attributes (dot_avx2.cpp, dot_avx512.cpp, dot_avx512_vnni.cpp) and chosen by
// the Isa argument. The SIMD variants unpack each weight block once and reuse it for every activation
// row (ik_llama.cpp's nrc_y), which is what makes prefill fast. Integer block sums are exact in every
// variant; only the order of float additions differs between them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu_features.h"
#include "quantize.h"

namespace tandem {

// GGUF / ggml type ids of the formats the kernels handle.
enum class GgmlType : int32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
    // the engine's own row-interleaved layouts (repack.h), built at load; never in a file
    Q4_0_R16 = 1002, Q4_1_R16 = 1003, Q5_0_R16 = 1006, Q5_1_R16 = 1007, Q8_0_R16 = 1008,
    Q4_K_R16 = 1012, Q5_K_R16 = 1013, Q6_K_R16 = 1014,
};

struct TypeInfo {
    const char* name;    // "Q4_K"
    int block_size;      // values per block (1 for F32/F16/BF16)
    int type_size;       // bytes per block
    bool is_weight;      // a weight type the dot kernels take (Q8_1 and Q8_K are activation-only)
    GgmlType act_type;   // the activation format it is multiplied by (llama.cpp's vec_dot_type)
};

// nullptr for ids this module does not handle.
const TypeInfo* type_info(int32_t type_id);
// Bytes of one row of n values (n a multiple of the block size).
size_t row_size(GgmlType type, int64_t n);

// ----------------------------------------------------------------------------------------- blocks
// The weight blocks and Q8_K are quantize.h's (llama.cpp's ggml-common.h layouts). Q8_1 is only ever
// an activation format, so it lives here.

// x = d q; s = d * sum(q), both f16: Q4_1/Q5_1 add m_w * s_a per block instead of touching their mins.
struct block_q8_1 {
    ggml_half d;
    ggml_half s;
    int8_t qs[qk::QK8_0];
};
static_assert(sizeof(block_q8_1) == 4 + qk::QK8_0, "wrong q8_1 block size/padding");

// IEEE conversions, round to nearest even (NaN stays NaN, made quiet), no hardware needed.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
uint16_t float_to_bf16(float f);

// ----------------------------------------------------------------------------------------- kernels

// Quantize one row of n floats to an activation format (Q8_0, Q8_1, Q8_K, F16, BF16 or F32):
//   Q8_0  as llama.cpp's x86 quantize_row_q8_0: d = amax/127 (f16), q = round-half-even(x * 127/amax);
//   Q8_1  the same plus s = f16(d * sum q) (x86 quantize_row_q8_1);
//   Q8_K  quantize_row_q8_K_ref: iscale = -127/max (signed max), q = min(127, nearest_int(iscale x)),
//         d = 1/iscale (f32), bsums; an all-zero block gives d = 0, qs = 0, bsums = 0;
//   F16 / BF16  round to nearest even. dst holds row_size(fmt, n) bytes.
// isa: from Avx2 the Q8 formats are quantized 8 lanes at a time, from Avx512 16, to the same bytes.
void quantize_activation_row(GgmlType fmt, const float* x, void* dst, int64_t n, Isa isa = best_isa());

// h[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i], SwiGLU's product (an expert's gate and up).
// Below Avx2 the scalar reference (libm's expf); from Avx2 8 lanes at a time with a Cephes-style exp
// (both within 4 ulp of float64 silu(g) * u, as tests/test_dot_kernels.py checks; NaN propagates; exp's argument clamped to [-87, 88], so silu(-inf) is -inf,
// not NaN). h may alias g or u.
void swiglu(const float* g, const float* u, float* h, int64_t n, Isa isa = best_isa());

// y[i] += w * x[i] for i < n: a product, then a sum, on every ISA (no fused multiply-add), so the
// floats do not depend on the ISA (the MoE op's weighted sum of its experts' outputs).
void axpy(float w, const float* x, float* y, int64_t n, Isa isa = best_isa());

// out[j] = dot(w_row, act_row_j) for j < n_act (1..8); act row j starts act_row_stride bytes after
// row j-1. n values per row, a multiple of the block size (any n for F32/F16/BF16).
using DotKernel = void (*)(int64_t n, const void* w_row, const void* act_rows, size_t act_row_stride,
                           int n_act, float* out);

constexpr int kMaxActRows = 8;

// The kernel for a weight type at an ISA level (nullptr if wtype is not a weight type). The level
// must be supported by this CPU (isa_supported); at Avx512Vnni, BF16 uses _mm512_dpbf16_ps when the
// CPU has AVX512_BF16.
DotKernel dot_kernel(GgmlType wtype, Isa isa);
// std::invalid_argument unless this CPU runs the level.
void require_isa(Isa isa);

void dot(GgmlType wtype, int64_t n, const void* w_row, const void* act_rows, size_t act_row_stride,
         int n_act, float* out, Isa isa);

// Y[t * y_stride + r] = dot(W row r, A row t) for r in [row_begin, row_end), t in [0, n_tokens).
// W row r starts at W + r * w_row_stride bytes, A row t (already quantize_activation_row'ed to the
// weight type's act_type) at A + t * a_stride bytes; y_stride is in floats. Single-threaded: walks
// the rows in L2-sized chunks and the tokens in tiles of kMaxActRows, so each weight block is
// unpacked once per tile.
void matmul_rows(GgmlType wtype, int64_t n, const void* W, size_t w_row_stride, int64_t row_begin,
                 int64_t row_end, const void* A, size_t a_stride, int64_t n_tokens, float* Y,
                 size_t y_stride, Isa isa);

}  // namespace tandem
