// GGUF block quantizers of the CPU engine: float32 rows -> llama.cpp's block layouts.
//
// Every type has a scalar reference that is bit-exact with quant/formats.py (itself bit-exact with
// llama.cpp's quantize_row_*_ref, and with gguf-py for the 32-value blocks); the AVX2 / AVX-512
// variants give the same bytes (same float32 operations in the same order, no FMA contraction).
// Checked for finite values of every magnitude, infinities and NaN (tests/test_quantize_engine.py).
// Two corners have no portable answer and are not promised: a Q4_1/Q5_1 block whose min or max is
// +0 and -0 at once (numpy's pick depends on its SIMD path; here the first one wins, as in llama.cpp),
// and NaNs with distinct payloads (which payload survives depends on operand order).
// Blocks are independent, so a [nrows, n_per_row] matrix is simply nrows * n_per_row / block_size
// consecutive blocks.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace tandem {

using ggml_half = uint16_t;  // IEEE binary16 bits

// Block sizes, in a namespace of their own (dot.h has its own QK_K in tandem::).
namespace qk {
constexpr int QK4_0 = 32;
constexpr int QK4_1 = 32;
constexpr int QK5_0 = 32;
constexpr int QK5_1 = 32;
constexpr int QK8_0 = 32;
constexpr int QK_K = 256;
constexpr int K_SCALE_SIZE = 12;
}  // namespace qk

// ggml type ids (ggml.h / gguf GGMLQuantizationType) of the types quantize_rows handles.
enum class QuantType : int {
    Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
    Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
};

// ---- 32-value blocks (ggml-common.h)

// x = d * q, q in -128..127
struct block_q8_0 {
    ggml_half d;        // delta
    int8_t qs[qk::QK8_0];   // quants
};
static_assert(sizeof(block_q8_0) == 2 + qk::QK8_0, "wrong q8_0 block size/padding");

// x = d * (q - 8); value j in the low nibble of qs[j], value j+16 in its high nibble
struct block_q4_0 {
    ggml_half d;          // delta
    uint8_t qs[qk::QK4_0 / 2];  // nibbles / quants
};
static_assert(sizeof(block_q4_0) == 2 + qk::QK4_0 / 2, "wrong q4_0 block size/padding");

// x = d * q + m, q in 0..15; nibbles as q4_0
struct block_q4_1 {
    ggml_half d;          // delta
    ggml_half m;          // min
    uint8_t qs[qk::QK4_1 / 2];  // nibbles / quants
};
static_assert(sizeof(block_q4_1) == 4 + qk::QK4_1 / 2, "wrong q4_1 block size/padding");

// x = d * (q - 16); low 4 bits as q4_0, bit j of the little-endian u32 qh = 5th bit of value j
struct block_q5_0 {
    ggml_half d;          // delta
    uint8_t qh[4];        // 5-th bit of quants
    uint8_t qs[qk::QK5_0 / 2];  // nibbles / quants
};
static_assert(sizeof(block_q5_0) == 2 + 4 + qk::QK5_0 / 2, "wrong q5_0 block size/padding");

// x = d * q + m, q in 0..31; bits as q5_0
struct block_q5_1 {
    ggml_half d;          // delta
    ggml_half m;          // min
    uint8_t qh[4];        // 5-th bit of quants
    uint8_t qs[qk::QK5_1 / 2];  // nibbles / quants
};
static_assert(sizeof(block_q5_1) == 4 + 4 + qk::QK5_1 / 2, "wrong q5_1 block size/padding");

// ---- super-blocks of 256 values

// 8 sub-blocks of 32: x = d*sc[j] * q - dmin*m[j], q in 0..15; 6-bit sc/m packed in scales[12]
// (get_scale_min_k4). qs[32*c + l] holds value 64c + l (low nibble) and 64c + 32 + l (high nibble).
// Effectively 4.5 bits per weight.
struct block_q4_K {
    ggml_half d;                   // super-block scale for quantized scales
    ggml_half dmin;                // super-block scale for quantized mins
    uint8_t scales[qk::K_SCALE_SIZE];  // scales and mins, quantized with 6 bits
    uint8_t qs[qk::QK_K / 2];          // 4-bit quants
};
static_assert(sizeof(block_q4_K) == 4 + qk::K_SCALE_SIZE + qk::QK_K / 2, "wrong q4_K block size/padding");

// As q4_K with q in 0..31: the 5th bit of value 32k + l is bit k of qh[l]. 5.5 bits per weight.
struct block_q5_K {
    ggml_half d;                   // super-block scale for quantized scales
    ggml_half dmin;                // super-block scale for quantized mins
    uint8_t scales[qk::K_SCALE_SIZE];  // scales and mins, quantized with 6 bits
    uint8_t qh[qk::QK_K / 8];          // quants, high bit
    uint8_t qs[qk::QK_K / 2];          // quants, low 4 bits
};
static_assert(sizeof(block_q5_K) == 4 + qk::K_SCALE_SIZE + qk::QK_K / 8 + qk::QK_K / 2, "wrong q5_K block size/padding");

// 16 sub-blocks of 16: x = d * scales[j] * (q - 32), q in 0..63. Per half h of 128 values, l < 32:
// ql[64h + l] = value 128h+l | value 128h+l+64 << 4, ql[64h + 32 + l] = values +32 | +96 << 4,
// qh[32h + l] = the top 2 bits of values +0, +32, +64, +96 at bits 0, 2, 4, 6. 6.5625 bits per weight.
struct block_q6_K {
    uint8_t ql[qk::QK_K / 2];       // quants, lower 4 bits
    uint8_t qh[qk::QK_K / 4];       // quants, upper 2 bits
    int8_t scales[qk::QK_K / 16];   // scales, quantized with 8 bits
    ggml_half d;                // super-block scale
};
static_assert(sizeof(block_q6_K) == qk::QK_K / 2 + qk::QK_K / 4 + qk::QK_K / 16 + 2, "wrong q6_K block size/padding");

// Q4_K / Q5_K sub-block j's 6-bit scale and min (llama.cpp's get_scale_min_k4)
inline void scale_min_k4(const uint8_t* s, int j, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63, m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Activations for the K-quant dot products: x = d * q.
struct block_q8_K {
    float d;                    // delta
    int8_t qs[qk::QK_K];            // quants
    int16_t bsums[qk::QK_K / 16];   // sum of quants in groups of 16
};
static_assert(sizeof(block_q8_K) == 4 + qk::QK_K + qk::QK_K / 16 * 2, "wrong q8_K block size/padding");

// ---- kernels

// Quantize nrows rows of n_per_row floats (n_per_row a multiple of the block size) into
// nrows * n_per_row / block consecutive blocks at dst. Single-threaded, no allocation.
using QuantizeRowsFn = void (*)(const float* src, void* dst, int64_t nrows, int64_t n_per_row);

// The best variant for this CPU (best_isa(), so TANDEM_ISA caps it).
void quantize_rows_q8_0(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q4_0(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q5_0(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q4_1(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q5_1(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q4_k(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q5_k(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q6_k(const float* src, void* dst, int64_t nrows, int64_t n_per_row);
void quantize_rows_q8_k(const float* src, void* dst, int64_t nrows, int64_t n_per_row);

// The variant of `type` for SIMD level `isa` (the highest one at or below it that exists);
// nullptr when the type is not one of QuantType.
QuantizeRowsFn quantize_rows_fn(QuantType type, Isa isa);
// The SIMD level that quantize_rows_fn(type, isa) actually runs at.
Isa quantize_variant_isa(QuantType type, Isa isa);

bool is_quant_type(int type_id);
const char* quant_type_name(QuantType type);
int quant_block_size(QuantType type);   // values per block
int quant_type_size(QuantType type);    // bytes per block

// Quantize [nrows, n_per_row] on `threads` std::threads (<= 0: hardware concurrency), each taking a
// contiguous range of blocks. n_per_row must be a multiple of the block size.
void quantize_rows_parallel(QuantType type, const float* src, void* dst, int64_t nrows, int64_t n_per_row,
                            int threads, Isa isa);

// One row of n values of GGML type `type_id` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; n a
// multiple of its block size) -> float32, as quant/formats.py's dequantize computes it (bit for bit; llama.cpp's
// get_rows). False for another type.
bool dequantize_row(int type_id, const void* src, int64_t n, float* y);

}  // namespace tandem
