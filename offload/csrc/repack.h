// Row-interleaved ("R16") layouts of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K, built once at load
// (ik_llama.cpp's _R4/_R8 idea): 16 rows go together, and block b of all 16 rows is stored as one unit, so a SIMD
// kernel puts one row per int32 lane, broadcasts 4 activation bytes to every lane, and needs no
// transpose, no horizontal sum and no per-row scale gathering; the 16 results land contiguous in Y.
// A group holds exactly the bytes of its 16 rows (same row_size), so tensors keep their size.
//
// Unit for block b of rows j = 0..15 (type_size * 16 bytes), in this order:
//   d      [16] f16                  row j's block scale
//   Q4_0 / Q5_0: qs [4][16][4] u8    vector m, lane j, byte l = qs_j[4m + l]: low nibbles are quants
//                                    4m + l, high nibbles 16 + 4m + l
//   Q5_0:  qh [8] u64                word k bit 4j + l = fifth bit of quant 4k + l of row j
//   Q8_0:  qs [8][16][4] i8          vector k, lane j, byte l = qs_j[4k + l]
//   Q4_1 / Q5_1: d [16], then m [16] f16 (row j's block min), then Q4_0's / Q5_0's qs (and qh)
// and for Q4_K, per super-block b:
//   d [16] f16 | dmin [16] f16 | scales [3][16][4] (vector v, lane j = scales_j[4v..4v+3]) |
//   qs [4][8][16][4]                 pair i, vector k, lane j, byte l = qs_j[32i + 4k + l]: low nibbles
//                                    are sub-block 2i's value 4k + l, high nibbles sub-block 2i + 1's
// and for Q5_K, per super-block b, Q4_K's unit followed by
//   qh [4][8][2] u64                 pair i, vector k, half h: bit 4j + l = the fifth bit of lane j, byte l
//                                    of the low (h = 0) or high (h = 1) nibbles of qs vector (i, k)
// and for Q6_K, per super-block b:
//   d [16] f16 | scales [16][16] i8 (sub-block s, lane j = scales_j[s]) |
//   ql [32][16][4] (vector m, lane j, byte l = ql_j[4m + l]) | qh [16][16][4] (the same for qh_j)
// Only matrices whose row count is a multiple of 16 are repacked.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dot.h"

namespace tandem {

constexpr int kR16 = 16;
// From this many tokens the AMX kernels beat the VNNI ones (single thread; Q4_K, 1408 x 2048: 0.9x at
// 6 tokens, 1.1x at 7, 1.4x at 8, 1.6x at 12, where a tile product is mostly empty below; the 32-value
// block types, with a tile stored per block, 2048 x 1408-7168: 0.75-0.87x at 6, 0.84-1.02x at 8,
// 1.03-1.23x at 9 - the VNNI kernel takes 8 tokens a pass). Q5_K shares Q4_K's
// threshold (1408 x 2048: 1.36x at 8 tokens, 1.6-1.75x at 10-16). Q6_K, with three tiles a step (7168 x 2048
// and 2048 x 7168, one thread): 0.85-0.9x at 8 tokens, 1.15-1.2x at 9, 1.2-1.5x at 16, 1.6-1.8x at 32.
constexpr int64_t kAmxMinTokens = 8, kAmxMinTokens32 = 9, kAmxMinTokensQ6 = 9;

// Q4_0 -> Q4_0_R16 etc.; the same type for a type without a row-interleaved layout.
GgmlType r16_of(GgmlType base);
// Q4_0_R16 -> Q4_0; the same type for a type that is not row-interleaved.
GgmlType base_of(GgmlType type);
inline bool is_r16(GgmlType t) { return base_of(t) != t; }

// rows (a multiple of 16) rows of n values in `base`, row r at src + r * row_size -> dst (same size), on up to
// `threads` threads (the caller's and new ones; one for a few MiB).
void repack_r16(GgmlType base, const uint8_t* src, int64_t rows, int64_t n, uint8_t* dst, int threads = 1);
// One group (16 interleaved rows of n values) back to 16 plain rows of `base` at dst (row_size apart).
void unpack_r16(GgmlType base, const uint8_t* group, int64_t n, uint8_t* dst);

// Y[t * y_stride + r] = W row r . A row t for r in [row_begin, row_end), as matmul_rows, for a
// row-interleaved W (`type` is an _R16 type; rows r at group r / 16). The VNNI kernel takes whole
// groups (at Isa::Amx, Q4_K / Q5_K from kAmxMinTokens tokens, Q6_K from kAmxMinTokensQ6 and Q4_0 / Q5_0 /
// Q8_0 from kAmxMinTokens32 go to the AMX kernels), at Avx2 / Avx512 the AVX2 kernels; at Scalar, and for
// groups cut by the row range, the group is unpacked for the plain kernels.
void matmul_rows_r16(GgmlType type, int64_t n, const void* W, int64_t row_begin, int64_t row_end, const void* A,
                     size_t a_stride, int64_t n_tokens, float* Y, size_t y_stride, Isa isa);

namespace detail::avx512_vnni {
// The token-tile kernels take ng = 1 or 2 whole groups, the second right after the first, their rows
// at Y[.. + j] for j < 16 ng. Two groups are read side by side, block by block: two streams from memory
// per thread read 8-23% faster than one (512 MiB matrices, 1-4 tokens, 2 threads).
// 16 rows (one group, nb blocks) x nt <= 8 activation rows (Q8_0 blocks, act_stride bytes apart):
// Y[t * y_stride + j] for j < 16. ad [nt][nb] activation scales in f32, seed [nt][nb] the per-block
// int32 offset correction (-off * sum of the block's activation quants).
void gemm_r16(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride,
              const float* ad, const int32_t* seed, int nt, float* Y, size_t y_stride);
// Q4_K: 16 rows x nt <= 8 Q8_K activation rows; ad [nt][nb] the activation scales, sub_sums
// [nt][nb][8] the sums of each 32-value sub-block's activation quants (from the bsums), for the mins.
void gemm_r16_q4k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride);
// Q5_K_R16: as gemm_r16_q4k (the same ad and sub_sums from prep_r16_q4k), the fifth bits from qh.
void gemm_r16_q5k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride);
void prep_r16_q4k(const void* act, size_t act_stride, int nt, int64_t nb, float* ad, float* sub_sums);
// Q6_K: 16 rows x nt <= 8 Q8_K activation rows; seed [nt][nb][16] = -32 * the activation sum of each
// 16-value sub-block (the quants' bias), from the bsums.
void gemm_r16_q6k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride, const float* ad,
                  const int32_t* seed, int nt, float* Y, size_t y_stride);
void prep_r16_q6k(const void* act, size_t act_stride, int nt, int64_t nb, float* ad, int32_t* seed);
// Q4_1 / Q5_1: 16 rows x nt <= 8 Q8_1 activation rows; ad [nt][nb] their scales, sa [nt][nb] their
// d_a * sum of quants, from prep_r16_min.
void gemm_r16_min(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride,
                  const float* ad, const float* sa, int nt, float* Y, size_t y_stride);
void prep_r16_min(const void* act, size_t act_stride, int nt, int64_t nb, float* ad, float* sa);
// ad and seed for nt activation rows of nb Q8_0 blocks (see gemm_r16); off = 8, 16 or 128.
void prep_r16(const void* act, size_t act_stride, int nt, int64_t nb, int off, float* ad, int32_t* seed);
}  // namespace detail::avx512_vnni

namespace detail::avx2 {
#include "r16_256_kernels.h"
}  // namespace detail::avx2
namespace detail::avx_vnni {
#include "r16_256_kernels.h"
}  // namespace detail::avx_vnni

namespace detail::amx {
// Q4_K on AMX-INT8 tiles (dot_r16_amx.cpp), as avx512_vnni::gemm_r16_q4k but for all n_tokens activation
// rows at once (each super-block of the group unpacked once for all of them); aq and tok from prep_q4k,
// aq followed by kQ4kPadBytes of readable memory (its token tiles always load 16 rows).
// Needs Isa::Amx (the process granted the tile state).
// `configured`: the shape the thread's tiles are configured for (-1 at first: configures them);
// release_tiles() when done, so the next user (oneDNN's kernels, say) configures its own.
void gemm_r16_q4k(int64_t nb, const uint8_t* group, const int8_t* aq, const int32_t* tok, int64_t n_tokens, float* Y,
                  size_t y_stride, int& configured);
// From n_tokens Q8_K activation rows (nb blocks, act_stride bytes apart), by super-block: aq
// [nb][n_tokens][256] the quants (64-byte aligned: a tile row is one cache line, and a super-block's
// rows one contiguous run); tok [nb][n_tokens][16] a 64-byte record per token: the sums of the 32-value
// sub-blocks' quants (from the bsums) two to a dword as int16 (S_2i + 65536 S_2i+1, i < 4), then the
// block's scale (float bits).
void prep_q4k(const void* act, size_t act_stride, int64_t n_tokens, int64_t nb, int8_t* aq, int32_t* tok);
// Q5_K on AMX-INT8 tiles: as gemm_r16_q4k (the same aq and tok), the scales split 8 h + l.
void gemm_r16_q5k(int64_t nb, const uint8_t* group, const int8_t* aq, const int32_t* tok, int64_t n_tokens, float* Y,
                  size_t y_stride, int& configured);
constexpr size_t kQ4kPadBytes = 16 * 256;
// Q6_K on AMX-INT8 tiles: as gemm_r16_q4k (the same aq and tok; of tok only the scales), for Q6_K_R16
void gemm_r16_q6k(int64_t nb, const uint8_t* group, const int8_t* aq, const int32_t* tok, int64_t n_tokens, float* Y,
                  size_t y_stride, int& configured);
// Q4_0 / Q5_0 / Q8_0 on AMX-INT8 tiles: as avx512_vnni::gemm_r16 for all n_tokens rows at once (ad and
// aq from pack32; the quants are signed in the tiles, so no seed).
void gemm_r16(GgmlType base, int64_t nb, const uint8_t* group, const int8_t* aq, const float* ad, int64_t n_tokens,
              float* Y, size_t y_stride, int& configured);
// From n_tokens Q8_0 activation rows (nb blocks, act_stride bytes apart): ad [n_tokens][nb] the scales;
// aq [nb][n_tokens][32] the quants by block, 32-byte aligned, so a tile row never straddles a cache line.
void pack32(const void* act, size_t act_stride, int64_t n_tokens, int64_t nb, float* ad, int8_t* aq);
// BF16 weights on AMX-BF16 tiles (needs Isa::Amx and cpu_features().amx_bf16): Y[t * y_stride + r] =
// dot(W row r, activation row t) for the rows of `groups` whole 16-row groups from W (row-major bf16, w_stride
// bytes apart, read in place as the tiles' A operand: no repacked copy) and n_tokens activation rows of n
// values, packed by pack_bf16 as the B operand: [ceil(n / 32) steps][ceil(n_tokens / 16) token tiles]
// kBf16Tile values (16 pairs of k, each for 16 tokens), zeros past n and n_tokens. Accumulates in f32 over
// all of K, so there is no epilogue but the store.
constexpr size_t kBf16Tile = 512;
constexpr int64_t kAmxBf16MinTokens = 8;
void pack_bf16(const void* act, size_t act_stride, int64_t n_tokens, int64_t n, uint16_t* packed);
void gemm_bf16(int64_t n, const uint8_t* W, size_t w_stride, int64_t groups, const uint16_t* packed,
               int64_t n_tokens, float* Y, size_t y_stride, int& configured);
void release_tiles();
}  // namespace detail::amx

}  // namespace tandem
