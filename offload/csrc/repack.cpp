// Row-interleaved layouts (repack.h): repacking, its inverse, and matmul_rows over them. Compiled for
// baseline x86-64; the VNNI kernel is in dot_r16_vnni.cpp.
#include "repack.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "r16_prefetch.h"

namespace tandem {

GgmlType r16_of(GgmlType base) {
    switch (base) {
        case GgmlType::Q4_0: return GgmlType::Q4_0_R16;
        case GgmlType::Q4_1: return GgmlType::Q4_1_R16;
        case GgmlType::Q5_0: return GgmlType::Q5_0_R16;
        case GgmlType::Q5_1: return GgmlType::Q5_1_R16;
        case GgmlType::Q8_0: return GgmlType::Q8_0_R16;
        case GgmlType::Q4_K: return GgmlType::Q4_K_R16;
        case GgmlType::Q5_K: return GgmlType::Q5_K_R16;
        case GgmlType::Q6_K: return GgmlType::Q6_K_R16;
        default: return base;
    }
}

GgmlType base_of(GgmlType type) {
    switch (type) {
        case GgmlType::Q4_0_R16: return GgmlType::Q4_0;
        case GgmlType::Q4_1_R16: return GgmlType::Q4_1;
        case GgmlType::Q5_0_R16: return GgmlType::Q5_0;
        case GgmlType::Q5_1_R16: return GgmlType::Q5_1;
        case GgmlType::Q8_0_R16: return GgmlType::Q8_0;
        case GgmlType::Q4_K_R16: return GgmlType::Q4_K;
        case GgmlType::Q5_K_R16: return GgmlType::Q5_K;
        case GgmlType::Q6_K_R16: return GgmlType::Q6_K;
        default: return type;
    }
}

namespace {

// size bytes between a unit and a row, in the direction to_unit says
inline void move_bytes(bool to_unit, void* unit_bytes, const void* row_bytes, size_t size) {
    if (to_unit) std::memcpy(unit_bytes, row_bytes, size);
    else std::memcpy(const_cast<void*>(row_bytes), unit_bytes, size);
}

// Block b of 16 rows (rows[j] = row j's first block) <-> the interleaved unit at u. to_unit picks the
// direction, so both share one description of the layout.
template <class Block>
void convert_unit(Block* const* rows, int64_t b, uint8_t* u, bool to_unit) {
    auto move = [&](void* unit_bytes, const void* row_bytes, size_t size) {
        move_bytes(to_unit, unit_bytes, row_bytes, size);
    };
    constexpr bool with_min = std::is_same_v<Block, block_q4_1> || std::is_same_v<Block, block_q5_1>;
    for (int j = 0; j < kR16; ++j) move(u + 2 * j, &rows[j][b].d, 2);
    if constexpr (with_min)
        for (int j = 0; j < kR16; ++j) move(u + 2 * kR16 + 2 * j, &rows[j][b].m, 2);
    uint8_t* q = u + 2 * kR16 * (with_min ? 2 : 1);
    if constexpr (std::is_same_v<Block, block_q8_0>) {
        for (int k = 0; k < 8; ++k)
            for (int j = 0; j < kR16; ++j) move(q + 64 * k + 4 * j, rows[j][b].qs + 4 * k, 4);
    } else {
        for (int m = 0; m < 4; ++m)
            for (int j = 0; j < kR16; ++j) move(q + 64 * m + 4 * j, rows[j][b].qs + 4 * m, 4);
        if constexpr (std::is_same_v<Block, block_q5_0> || std::is_same_v<Block, block_q5_1>) {
            uint64_t* words = reinterpret_cast<uint64_t*>(q + 256);  // memcpy'd below: no aliasing access
            uint64_t w[8] = {};
            uint32_t qh[kR16];
            if (!to_unit) std::memcpy(w, words, sizeof(w));
            for (int j = 0; j < kR16; ++j) {
                if (to_unit) std::memcpy(&qh[j], rows[j][b].qh, 4);
                else qh[j] = 0;
            }
            for (int k = 0; k < 8; ++k)  // bits 4k..4k+3 of qh[j] are nibble j of w[k]
                for (int j = 0; j < kR16; ++j) {
                    if (to_unit) w[k] |= static_cast<uint64_t>((qh[j] >> 4 * k) & 0xFu) << 4 * j;
                    else qh[j] |= static_cast<uint32_t>((w[k] >> 4 * j) & 0xFu) << 4 * k;
                }
            if (to_unit) std::memcpy(words, w, sizeof(w));
            else
                for (int j = 0; j < kR16; ++j) std::memcpy(rows[j][b].qh, &qh[j], 4);
        }
    }
}

// Q4_K: d[16] f16 | dmin[16] f16 | scales [3][16][4] (vector v, lane j = scales_j[4v..4v+3]) |
// qs [4][8][16][4] (pair i, vector k, lane j, byte l = qs_j[32i + 4k + l]: low nibbles sub-block 2i,
// high nibbles sub-block 2i + 1, value 4k + l); Q5_K the same, then
// qh [4][8][2] u64 (pair i, vector k, half h: bit 4j + l = bit 2i + h of qh_j[4k + l], the fifth bit of
// the value of lane j, byte l in the low (h = 0) or high (h = 1) nibbles of qs vector (i, k))
template <class Block>
void convert_unit_k(Block* const* rows, int64_t b, uint8_t* u, bool to_unit) {
    auto move = [&](void* unit_bytes, const void* row_bytes, size_t size) {
        move_bytes(to_unit, unit_bytes, row_bytes, size);
    };
    for (int j = 0; j < kR16; ++j) {
        move(u + 2 * j, &rows[j][b].d, 2);
        move(u + 32 + 2 * j, &rows[j][b].dmin, 2);
        for (int v = 0; v < 3; ++v) move(u + 64 + 64 * v + 4 * j, rows[j][b].scales + 4 * v, 4);
        for (int i = 0; i < 4; ++i)
            for (int k = 0; k < 8; ++k) move(u + 256 + 512 * i + 64 * k + 4 * j, rows[j][b].qs + 32 * i + 4 * k, 4);
    }
    if constexpr (std::is_same_v<Block, block_q5_K>) {
        // nibble j of word (i, k, h) holds bit 2i + h of qh_j's bytes 4k..4k+3 (byte l at bit l): gathered from
        // the four bytes of a u32 by one multiply (0x01020408 moves the bits at 0, 8, 16, 24 to 24..27, and no two
        // of its partial products meet, so nothing carries), scattered back by another (0x00204081)
        uint8_t* words = u + 256 + 2048;
        uint64_t w[4][8][2] = {};
        uint32_t qh[kR16][8] = {};
        if (to_unit)
            for (int j = 0; j < kR16; ++j) std::memcpy(qh[j], rows[j][b].qh, sizeof(qh[j]));
        else
            std::memcpy(w, words, sizeof(w));
        for (int i = 0; i < 4; ++i)
            for (int k = 0; k < 8; ++k)
                for (int h = 0; h < 2; ++h) {
                    const int src = 2 * i + h;
                    for (int j = 0; j < kR16; ++j) {
                        if (to_unit) {
                            const uint32_t nibble = (((qh[j][k] >> src) & 0x01010101u) * 0x01020408u) >> 24;
                            w[i][k][h] |= static_cast<uint64_t>(nibble & 0xFu) << 4 * j;
                        } else {
                            const uint32_t nibble = static_cast<uint32_t>(w[i][k][h] >> 4 * j) & 0xFu;
                            qh[j][k] |= ((nibble * 0x00204081u) & 0x01010101u) << src;
                        }
                    }
                }
        if (to_unit)
            std::memcpy(words, w, sizeof(w));
        else
            for (int j = 0; j < kR16; ++j) std::memcpy(rows[j][b].qh, qh[j], sizeof(qh[j]));
    }
}
void convert_unit(block_q4_K* const* rows, int64_t b, uint8_t* u, bool to_unit) { convert_unit_k(rows, b, u, to_unit); }
void convert_unit(block_q5_K* const* rows, int64_t b, uint8_t* u, bool to_unit) { convert_unit_k(rows, b, u, to_unit); }

// Q6_K: d[16] f16 | scales [16][16] (sub-block s, lane j = scales_j[s]) | ql [32][16][4] (vector m, lane j,
// byte l = ql_j[4m + l]) | qh [16][16][4] (vector m, lane j, byte l = qh_j[4m + l])
void convert_unit(block_q6_K* const* rows, int64_t b, uint8_t* u, bool to_unit) {
    auto move = [&](void* unit_bytes, const void* row_bytes, size_t size) {
        move_bytes(to_unit, unit_bytes, row_bytes, size);
    };
    for (int j = 0; j < kR16; ++j) {
        move(u + 2 * j, &rows[j][b].d, 2);
        for (int s = 0; s < 16; ++s) move(u + 32 + 16 * s + j, &rows[j][b].scales[s], 1);
        for (int m = 0; m < 32; ++m) move(u + 288 + 64 * m + 4 * j, rows[j][b].ql + 4 * m, 4);
        for (int m = 0; m < 16; ++m) move(u + 2336 + 64 * m + 4 * j, rows[j][b].qh + 4 * m, 4);
    }
}

template <class Block>
void convert_group(uint8_t* plain, size_t row_bytes, uint8_t* group, int64_t nb, bool to_unit) {
    Block* rows[kR16];
    for (int j = 0; j < kR16; ++j) rows[j] = reinterpret_cast<Block*>(plain + j * row_bytes);
    for (int64_t b = 0; b < nb; ++b) convert_unit(rows, b, group + b * kR16 * sizeof(Block), to_unit);
}

void convert(GgmlType base, uint8_t* plain, int64_t n, uint8_t* group, bool to_unit) {
    const size_t rb = row_size(base, n);
    const int64_t nb = n / type_info(static_cast<int32_t>(base))->block_size;
    switch (base) {
        case GgmlType::Q4_K: return convert_group<block_q4_K>(plain, rb, group, nb, to_unit);
        case GgmlType::Q5_K: return convert_group<block_q5_K>(plain, rb, group, nb, to_unit);
        case GgmlType::Q6_K: return convert_group<block_q6_K>(plain, rb, group, nb, to_unit);
        case GgmlType::Q4_0: return convert_group<block_q4_0>(plain, rb, group, nb, to_unit);
        case GgmlType::Q5_0: return convert_group<block_q5_0>(plain, rb, group, nb, to_unit);
        case GgmlType::Q4_1: return convert_group<block_q4_1>(plain, rb, group, nb, to_unit);
        case GgmlType::Q5_1: return convert_group<block_q5_1>(plain, rb, group, nb, to_unit);
        case GgmlType::Q8_0: return convert_group<block_q8_0>(plain, rb, group, nb, to_unit);
        default:
            throw std::invalid_argument(std::string("no row-interleaved layout for ") +
                                        type_info(static_cast<int32_t>(base))->name);
    }
}

// The bias each weight type's unsigned quants carry (w = q - off), which the kernel takes off per block.
int offset_of(GgmlType base) { return base == GgmlType::Q4_0 ? 8 : base == GgmlType::Q5_0 ? 16 : 128; }

}  // namespace

void repack_r16(GgmlType base, const uint8_t* src, int64_t rows, int64_t n, uint8_t* dst, int threads) {
    if (rows % kR16) throw std::invalid_argument("repack_r16: the row count must be a multiple of 16");
    if (r16_of(base) == base)
        throw std::invalid_argument(std::string("no row-interleaved layout for ") + type_info(static_cast<int32_t>(base))->name);
    const size_t group = row_size(base, n) * kR16;
    const int64_t groups = rows / kR16;
    auto run = [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g)
            convert(base, const_cast<uint8_t*>(src + g * group), n, dst + g * group, true);  // src only read
    };
    // a thread per 4 MiB at least: the threads fault in the source's pages and the new copy's as they go
    const int64_t most = std::max<int64_t>(1, static_cast<int64_t>(groups * group >> 22));
    const int64_t t = std::clamp<int64_t>(threads, 1, std::min(groups, most));
    std::vector<std::thread> helpers;
    for (int64_t i = 1; i < t; ++i) helpers.emplace_back(run, groups * i / t, groups * (i + 1) / t);
    run(0, groups / t);
    for (auto& h : helpers) h.join();
}

void unpack_r16(GgmlType base, const uint8_t* group, int64_t n, uint8_t* dst) {
    convert(base, dst, n, const_cast<uint8_t*>(group), false);  // group only read
}

namespace {

// The token-tile kernels of one ISA family for whole groups (dot_r16_avx2.cpp, dot_r16_vnni.cpp: the same
// signatures), with their activation preparation.
struct TileKernels {
    decltype(&detail::avx2::prep_r16_q4k) prep_q4k;  // Q4_K / Q5_K
    decltype(&detail::avx2::prep_r16_q6k) prep_q6k;
    decltype(&detail::avx2::prep_r16_min) prep_min;  // Q4_1 / Q5_1
    decltype(&detail::avx2::prep_r16) prep32;        // Q4_0 / Q5_0 / Q8_0
    decltype(&detail::avx2::gemm_r16_q4k) q4k, q5k;
    decltype(&detail::avx2::gemm_r16_q6k) q6k;
    decltype(&detail::avx2::gemm_r16_min) min;
    decltype(&detail::avx2::gemm_r16) k32;
    int q8_0_offset;  // what prep32 takes off Q8_0's quants: 0 where the kernel takes them signed
};

// below VNNI: AVX2 (and AVX-512 F/BW)
constexpr TileKernels kAvx2Tiles = {
    detail::avx2::prep_r16_q4k, detail::avx2::prep_r16_q6k, detail::avx2::prep_r16_min, detail::avx2::prep_r16,
    detail::avx2::gemm_r16_q4k, detail::avx2::gemm_r16_q5k, detail::avx2::gemm_r16_q6k, detail::avx2::gemm_r16_min,
    detail::avx2::gemm_r16,     0};
// AVX2 with AVX-VNNI: the same kernels, vpdpbusd in 256 bits
constexpr TileKernels kAvxVnniTiles = {
    detail::avx_vnni::prep_r16_q4k, detail::avx_vnni::prep_r16_q6k, detail::avx_vnni::prep_r16_min,
    detail::avx_vnni::prep_r16,     detail::avx_vnni::gemm_r16_q4k, detail::avx_vnni::gemm_r16_q5k,
    detail::avx_vnni::gemm_r16_q6k, detail::avx_vnni::gemm_r16_min, detail::avx_vnni::gemm_r16,
    0};
constexpr TileKernels kVnniTiles = {
    detail::avx512_vnni::prep_r16_q4k, detail::avx512_vnni::prep_r16_q6k, detail::avx512_vnni::prep_r16_min,
    detail::avx512_vnni::prep_r16,     detail::avx512_vnni::gemm_r16_q4k, detail::avx512_vnni::gemm_r16_q5k,
    detail::avx512_vnni::gemm_r16_q6k, detail::avx512_vnni::gemm_r16_min, detail::avx512_vnni::gemm_r16,
    128};

// The first lines of a decode call's two streams (its first pair of whole groups, `groups` <= 2 of them),
// into the L2 before the kernel starts. On AMD the kernels prefetch into the L2 `ahead` bytes ahead of
// their loads (the AVX-512 ones kFarL2, Q8_0's kFarL2Q8_0; the AVX2 ones kAhead: r16_prefetch.h), so each
// call otherwise read its first that many bytes a stream with no prefetch, and a MoE layer at T=1 makes a
// call per expert matrix and slab. Zen 4, 2 threads, in alternation with no burst in one process (three
// runs, 80-250 rounds a regime), read at 42-55 GB/s: MoE layers at T=1 (routed experts, cold) 0.98-1.0x
// the time on V2-Lite, 0.96-0.975x on Qwen3-30B-A3B; 256 MiB Q4_K GEMVs (1 MiB tasks, a call each) 1-3%
// faster; at 31-34 GB/s 0.98-1.0x. Twice the bytes, the burst's first 2 KiB into the L1, or the MoE tasks
// prefetching the start of their next call instead gained less (0.97-1.0x). The AVX2 kernels (TANDEM_ISA
// avx2, the same machine, 31-49 GB/s): MoE layers at T=1 0.986-0.993x, GEMVs 1-1.6% faster (6 KiB: the same).
void prefetch_call_start(const uint8_t* first_group, int64_t groups, size_t group_bytes, size_t ahead) {
    const size_t bytes = std::min(ahead, group_bytes);
    for (int64_t g = 0; g < groups; ++g)
        for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(first_group + g * group_bytes + o, 0, 2);
}

}  // namespace

void matmul_rows_r16(GgmlType type, int64_t n, const void* W, int64_t row_begin, int64_t row_end, const void* A,
                     size_t a_stride, int64_t n_tokens, float* Y, size_t y_stride, Isa isa) {
    const GgmlType base = base_of(type);
    const size_t rb = row_size(base, n), group_bytes = rb * kR16;
    const bool q4k = base == GgmlType::Q4_K, q5k = base == GgmlType::Q5_K, q6k = base == GgmlType::Q6_K;
    const bool with_min = base == GgmlType::Q4_1 || base == GgmlType::Q5_1;  // against Q8_1, no AMX kernel
    const int64_t nb = n / type_info(static_cast<int32_t>(base))->block_size;
    const auto* w = static_cast<const uint8_t*>(W);
    // whole groups go to the AMX kernels (all tokens at once), or else from AVX2 up to the token-tile
    // kernels of the ISA's family; the rest to the plain kernels, a group unpacked at a time
    // (an AMX kernel for Q4_1 / Q5_1, with the min added per block and token, was 0.8-1.1x the VNNI one)
    const bool amx = isa == Isa::Amx && !with_min &&
                     n_tokens >= (q4k || q5k ? kAmxMinTokens : q6k ? kAmxMinTokensQ6 : kAmxMinTokens32);
    const bool tiles = !amx && isa >= Isa::Avx2;
    const TileKernels& k = isa >= Isa::Avx512Vnni ? kVnniTiles : isa == Isa::AvxVnni ? kAvxVnniTiles : kAvx2Tiles;
    // the activations' scales and, per block, the offset correction (32-value types, and Q6_K's 16
    // sub-blocks), the 8 sub-block sums the mins multiply (Q4_K / Q5_K) or d_a times the sum (Q4_1 /
    // Q5_1, from Q8_1); for the AMX kernels, the quants packed by block instead (they need no offset
    // correction): once for all the groups
    thread_local std::vector<float> ad;
    thread_local std::vector<int32_t> seed;
    thread_local std::vector<float> sub_sums;
    thread_local std::vector<uint8_t> packed;
    auto packed_bytes = [&](size_t bytes) {  // 64-byte aligned
        packed.resize(bytes + 64);
        return reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(packed.data()) + 63) & ~uintptr_t{63});
    };
    int8_t* aq = nullptr;
    int32_t* tok = nullptr;
    const size_t blocks = static_cast<size_t>(n_tokens * nb);
    if (amx) {
        require_isa(isa);
        if (q4k || q5k || q6k) {
            aq = packed_bytes(blocks * (256 + 64) + detail::amx::kQ4kPadBytes);
            tok = reinterpret_cast<int32_t*>(aq + blocks * 256 + detail::amx::kQ4kPadBytes);
            detail::amx::prep_q4k(A, a_stride, n_tokens, nb, aq, tok);
        } else {
            ad.resize(blocks);
            aq = packed_bytes(blocks * 32);
            detail::amx::pack32(A, a_stride, n_tokens, nb, ad.data(), aq);
        }
    } else if (tiles) {
        require_isa(isa);
        const int nt = static_cast<int>(n_tokens);
        ad.resize(blocks);
        if (q4k || q5k) {
            sub_sums.resize(blocks * 8);
            k.prep_q4k(A, a_stride, nt, nb, ad.data(), sub_sums.data());
        } else if (with_min) {
            sub_sums.resize(blocks);  // s_a
            k.prep_min(A, a_stride, nt, nb, ad.data(), sub_sums.data());
        } else if (q6k) {
            seed.resize(blocks * 16);
            k.prep_q6k(A, a_stride, nt, nb, ad.data(), seed.data());
        } else {
            seed.resize(blocks);
            k.prep32(A, a_stride, nt, nb, base == GgmlType::Q8_0 ? k.q8_0_offset : offset_of(base), ad.data(),
                     seed.data());
        }
    }
    // groups in chunks of ~256 KiB (L2), an even number of them: each chunk is reused by every token tile,
    // and the token-tile kernels take the groups in pairs
    const int64_t chunk = std::max<int64_t>(2, static_cast<int64_t>((size_t{256} << 10) / group_bytes) / 2 * 2);
    const int64_t g_begin = row_begin / kR16, g_end = (row_end + kR16 - 1) / kR16;
    const int64_t whole_begin = (row_begin + kR16 - 1) / kR16, whole_end = row_end / kR16;  // the whole groups in range
    thread_local std::vector<uint8_t> plain;
    const auto* a = static_cast<const char*>(A);
    if (tiles && n_tokens <= 2 && detail::g_stream_prefetch_l2) {
        const uintptr_t ahead = isa < Isa::Avx512Vnni ? detail::kAhead
                                : base == GgmlType::Q8_0 ? detail::kFarL2Q8_0
                                                         : detail::kFarL2;
        prefetch_call_start(w + whole_begin * group_bytes, std::min<int64_t>(whole_end - whole_begin, 2), group_bytes,
                            ahead);
    }
    for (int64_t c0 = g_begin; c0 < g_end; c0 += chunk) {
        const int64_t c1 = std::min(g_end, c0 + chunk);
        for (int64_t g = c0; g < c1; ++g) {
            const int64_t r0 = g * kR16, lo = std::max(row_begin, r0), hi = std::min(row_end, r0 + kR16);
            if ((amx || tiles) && lo == r0 && hi == r0 + kR16) continue;  // below
            plain.resize(group_bytes);
            unpack_r16(base, w + g * group_bytes, n, plain.data());
            matmul_rows(base, n, plain.data(), rb, lo - r0, hi - r0, A, a_stride, n_tokens, Y + r0, y_stride, isa);
        }
        if (amx) {
            int configured = -1;
            for (int64_t g = c0; g < c1; ++g) {
                const int64_t r0 = g * kR16;
                if (r0 < row_begin || r0 + kR16 > row_end) continue;
                if (q4k)
                    detail::amx::gemm_r16_q4k(nb, w + g * group_bytes, aq, tok,
                                              n_tokens, Y + r0, y_stride, configured);
                else if (q5k)
                    detail::amx::gemm_r16_q5k(nb, w + g * group_bytes, aq, tok, n_tokens, Y + r0, y_stride, configured);
                else if (q6k)
                    detail::amx::gemm_r16_q6k(nb, w + g * group_bytes, aq, tok, n_tokens, Y + r0, y_stride, configured);
                else
                    detail::amx::gemm_r16(base, nb, w + g * group_bytes, aq, ad.data(), n_tokens,
                                          Y + r0, y_stride, configured);
            }
            if (configured >= 0) detail::amx::release_tiles();
            continue;
        }
        if (!tiles) continue;
        for (int64_t t0 = 0; t0 < n_tokens; t0 += kMaxActRows) {
            const int nt = static_cast<int>(std::min<int64_t>(kMaxActRows, n_tokens - t0));
            const int64_t f0 = std::max(c0, whole_begin), f1 = std::min(c1, whole_end);
            for (int64_t g = f0; g < f1; g += 2) {  // the whole groups, two at a time while two are left
                const int ng = g + 1 < f1 ? 2 : 1;
                const int64_t r0 = g * kR16;
                const uint8_t* grp = w + g * group_bytes;
                const void* at = a + t0 * a_stride;
                float* y = Y + t0 * y_stride + r0;
                if (q6k)
                    k.q6k(nb, grp, ng, at, a_stride, ad.data() + t0 * nb, seed.data() + t0 * nb * 16, nt, y, y_stride);
                else if (with_min)
                    k.min(base, nb, grp, ng, at, a_stride, ad.data() + t0 * nb, sub_sums.data() + t0 * nb, nt, y,
                          y_stride);
                else if (q4k || q5k)
                    (q5k ? k.q5k : k.q4k)(nb, grp, ng, at, a_stride, ad.data() + t0 * nb,
                                          sub_sums.data() + t0 * nb * 8, nt, y, y_stride);
                else
                    k.k32(base, nb, grp, ng, at, a_stride, ad.data() + t0 * nb, seed.data() + t0 * nb, nt, y,
                          y_stride);
            }
        }
    }
}

}  // namespace tandem
