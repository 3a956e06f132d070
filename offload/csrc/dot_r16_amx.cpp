// AMX kernels for prefill. First AMX-INT8 for the row-interleaved Q4_K and Q5_K layouts (repack.h): one group of
// 16 weight rows against many activation rows. The VNNI kernel (dot_r16_vnni.cpp) spends two instructions per 64
// multiply-adds; a tile product does 16 x 16 x 64 of them, but a tile result must go through memory
// and a Q4_K super-block has 8 sub-block scales per row, so a tile product per 32-value sub-block
// would store and reload a tile every 8192 multiply-adds. Instead the 6-bit sub-block scales are folded
// into the weights: sc = 16 h + l (h <= 3, l <= 15), so q * l and q * h (q <= 15) are bytes, and
//   sum_j sc_j isum_j = 16 C_h + C_l,   C_x = sum over the super-block of (q * x) . a
// two int32 tiles a super-block, exact. (q * l is one vpmullw on the byte pairs: q_even * l < 256
// never carries into the odd byte.) The mins go through vpdpwssd as integers, per token:
//   acc += d_a (d_w * (16 C_h + C_l) - dmin * sum_j m_j S_j)
// which is the VNNI kernel's result wherever its float sums are exact (partial sums below 2^24, as in
// practice); beyond, this one is the exact integers rounded once. Q5_K (q <= 31, its fifth bits added
// while unpacking) splits its scales sc = 8 h + l instead (h, l <= 7: q * 7 = 217 still a byte), and sums
// 8 C_h + C_l.
//
// Measured on a Sapphire Rapids class core: a tile product takes ~16 cycles (5.3 ns), a tile store
// ~3 cycles a row, a tile load from L2 several times one from L1. 512-bit vector instructions do not
// run beside the tile products (128 independent vmulps / vpmullw / vpmaddwd zmm took their own time
// plus the products', the ymm forms about the products' alone), and vector work far from the tile
// products in the instruction stream waits for them: 16 products then a 32-token epilogue took longer
// than the two apart (210 vs 104 + 72 ns), the same split in four rounds 145 ns. So the kernel keeps
// the tile traffic low: the activation quants are packed by super-block (prep_q4k: each tile row one
// aligned cache line, a super-block's rows one run), each unpacked super-block (8 KiB) stays in L1
// while every token tile uses it, two token tiles share each B tile load (C_l 0 / 2, C_h 1 / 3, A 4 / 5,
// B 6-7), and the vector work goes between rounds of tile products (gemm_k). At 64 tokens one item's
// epilogue (~7 cycles a token) plus the unpacking still take about as long as its tile work, and with
// the activations from L2 (as here) rather than L1 the whole is ~15% slower: where to look next.
// On a later machine (AMX under KVM, ~3.3 GHz) microbenchmarks put the limit elsewhere. Work that stays
// in registers does run beside the tile unit: 128 zmm vpmullw cost nothing next to a round of 4 tile
// loads and 4 products (21 ns with them or without). Memory work does not. The round's 4 tile loads (64
// lines, ~10 ns) hold the load ports, and vector loads and stores placed beside them add their own
// time. In gemm_k, at 64 tokens (4096 x 7168, one thread, ~180 ns per group, super-block and token
// tile), taking one part out at a time saved: tile loads and products 57 ns, epilogue 61 ns, unpacking
// 55 ns, tile stores 10 ns. The parts nearly add up. With only the loops and the tile stores left it ran
// at 30 ns. Tried with no gain: ymm unpacking, the 4 broadcasts of a token's sub-block sums as one
// load, and other prefetch hints and distances. Serving A from L1 saved ~10%, but the practical way to
// do it, two groups' super-block b in turn (the second's A tiles still in L1), gained 1-3% here at 32-128
// tokens and nothing in a V3-shaped MoE at T=128 (65.4 vs 65.3 ms); prefetching the next super-block's A
// into L1 beside the rounds cost 4-9%. Keeping acc in registers instead of memory would save 3-4% at most
// (measured by dropping its load and store). Running each item's epilogue one item later, so its C loads
// are further from the tile stores (three C buffers, four mins), cost ~5%.
// AMX-BF16 instead, not exact but with no epilogue per super-block: the weights dequantized to bf16 a sub-block
// at a time, the activations in bf16, and the C tiles of 4 token tiles kept over the whole K. In a microbenchmark
// (64 tokens, 4096 x 7168, one thread), its tile work alone took 77-83 ns a unit, because its activations are
// twice int8's bytes and come from L2. The dequantizing (cvt, fma, vcvtne2ps2bf16 and vpermw per 32 weights)
// added ~100 ns more, so 190-300 ns in all against this kernel's ~180.
//
// BF16 weights (gemm_bf16) need no unpacking: AMX-BF16 tiles take 16 rows of 32 values straight from the
// row-major weights as the A operand (the rows' last partial 32 values from a zero-padded copy), the
// activations are packed once per call as the B operand (pack_bf16: pairs of values per token, transposed),
// and four C tiles (two row groups by two token tiles) accumulate in f32 over all of K.
//
// Q6_K (gemm_r16_q6k): its int8 sub-block scales cannot fold into bytes beside 6-bit quants, so each is split
// into three base-7 digits, three B tiles and three C tiles a step, exact (the comment at unpack_q6k). Against
// the VNNI kernel, 2 threads: 4096 x 4096 at 64 tokens 4.51 -> 2.16-2.19 ms, at 128 tokens 8.72 -> 3.52-3.66
// ms (Q4_K: 1.37 and 2.61 ms); a V3-shaped MoE layer with Q6_K down experts at T=128 115.5 -> 78.2 ms. With 7 of the 8
// tiles holding C, A and B, no B tile alternates between steps, and one token tile goes per item. At 64 tokens
// (7168 x 2048, one thread) a unit takes ~270 ns: tile loads, products and stores ~165 (the 12 products alone
// would be ~62), the epilogue ~55, the unpacking ~50; at 8-16 tokens the unpacking (~170 ns a super-block,
// its 48 vpmullw among them) is what keeps it behind the VNNI kernel below kAmxMinTokensQ6. (To time parts by
// dropping them, keep the tile loads: a product on tiles never loaded since the configuration took ~8 ns in a
// microbenchmark, on loaded ones 5.5 ns with random bytes and 4.9 ns with zeros.)
//
// Q4_0 / Q5_0 / Q8_0 (32-value blocks, an f16 scale per row and block) cannot fold their scales, so
// every block is one tile product with K = 32 whose tile is stored and scaled per token, as the VNNI
// kernel does per block: acc += float(C) * (d_w * d_a), the same value as the VNNI kernel's C + seed.
// Blocks go in pairs, two pairs in flight (tiles 0-1 and 6-7 C, 2-3 A with 32 bytes a row, 4-5 B of 8
// rows). The quants go to
// the tiles signed (signed x signed products): Q8_0's as stored, Q4_0 / Q5_0's unpacked less their
// offset, so no per-token offset correction is needed.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "r16_prefetch.h"
#include "repack.h"

#if defined(__clang__)
#pragma clang attribute push(                                                                                   \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8,amx-bf16"))), \
    apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8,amx-bf16")
#endif

namespace tandem::detail::amx {
namespace {

// The tile intrinsics are asm statements the compiler cannot see into: order the vector stores that
// build B before the tile loads that read them, and the tile stores before the vector loads of C.
#define TANDEM_MEMORY_BARRIER asm volatile("" ::: "memory")

// One super-block of the group: Q4_K's, or Q5_K's (Q5)
template <bool Q5>
constexpr size_t kUnit = (Q5 ? 176 : 144) * kR16;
// The scale split sc = kSplit h + l (l < kSplit) that keeps q * l and q * h bytes: 16 for Q4_K's q <= 15,
// 8 for Q5_K's q <= 31 (31 * 7 = 217)
template <bool Q5>
constexpr int kShift = Q5 ? 3 : 4;
constexpr size_t kPairBytes = 1024;            // one B tile: 16 x 64 bytes
constexpr size_t kSuperBytes = 8 * kPairBytes; // B_l and B_h of the 4 pairs

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void load_config(const TileConfig& c) {
    // GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the 64: without this the other
    // stores may be dropped as dead, and the tile products fault on the garbage shapes
    asm volatile("" : : "r"(&c) : "memory");
    _tile_loadconfig(&c);
}

// The Q4_K tiles for work items of Ma tokens (one token tile: C_l 0, C_h 1, A 4 / 5 in alternate pairs,
// B_l / B_h 6-7 / 2-3) or Ma + Mb tokens (two token tiles: C_l 0 / 2, C_h 1 / 3, A 4 / 5, B 6-7);
// `configured` becomes 1000 + 32 Ma + Mb.
void configure_q4k(int Ma, int Mb, int& configured) {
    if (configured == 1000 + 32 * Ma + Mb) return;
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    c.rows[0] = c.rows[1] = c.rows[4] = static_cast<uint8_t>(Ma);
    if (Mb > 0) c.rows[2] = c.rows[3] = c.rows[5] = static_cast<uint8_t>(Mb);
    else c.rows[5] = static_cast<uint8_t>(Ma);
    load_config(c);
    configured = 1000 + 32 * Ma + Mb;
}

// An unpacked super-block: the 8 B tiles (pair i: B_l at 2i, B_h at 2i + 1). Its mins go apart (kMinBytes:
// each row's, two sub-blocks to a dword, m_2i + 65536 m_2i+1, a lane per row, for vpdpwssd).
constexpr size_t kMinBytes = 4 * 64;

// Pair i (sub-blocks 2i, 2i + 1) of super-block u of the group -> its B_l and B_h tiles in B, and for
// i = 3 the mins of all four pairs -> mins. In parts so the tile products of another item can run
// between them (gemm_k).
template <bool Q5>
inline __attribute__((always_inline)) void unpack_pair(const uint8_t* u, int i, uint8_t* B, uint8_t* mins) {
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15), two = _mm512_set1_epi32(3);
    const __m512i low = _mm512_set1_epi32((1 << kShift<Q5>) - 1), sixteen = _mm512_set1_epi8(16);
    const __m512i nib = _mm512_set1_epi8(0x0F);
    auto both = [](__m512i v) { return _mm512_or_si512(v, _mm512_slli_epi32(v, 16)); };  // in both 16-bit halves
    // get_scale_min_k4, one row per lane: sub-block j < 4 from v0 (scales) / v1 (mins), j >= 4 from v2
    // and the top bits of v0 / v1
    const __m512i v0 = _mm512_loadu_si512(u + 64), v1 = _mm512_loadu_si512(u + 128);
    const __m512i v2 = _mm512_loadu_si512(u + 192);
    auto scale = [&](int j) {
        if (j < 4) return _mm512_and_si512(_mm512_srli_epi32(v0, 8 * j), six);
        const __m512i hs = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v0, 8 * (j - 4) + 6), two), 4);
        return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(v2, 8 * (j - 4)), four), hs);
    };
    auto min = [&](int j) {
        if (j < 4) return _mm512_and_si512(_mm512_srli_epi32(v1, 8 * j), six);
        const __m512i hm = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v1, 8 * (j - 4) + 6), two), 4);
        return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(v2, 8 * (j - 4) + 4), four), hm);
    };
    if (i == 3) {
        for (int p = 0; p < 4; ++p)
            _mm512_store_si512(mins + 64 * p, _mm512_or_si512(min(2 * p), _mm512_slli_epi32(min(2 * p + 1), 16)));
    }
    const uint8_t* qs = u + 256;
    prefetch_share<kUnit<Q5>, 4, kAheadAmx, Prefetch::OneLevel>(u, i);  // the weights stream from memory
    // l and h of sub-blocks 2i and 2i + 1 in both 16-bit halves of each row's dword
    constexpr int s = kShift<Q5>;
    const __m512i sc0 = scale(2 * i), sc1 = scale(2 * i + 1);
    const __m512i l0 = both(_mm512_and_si512(sc0, low)), h0 = both(_mm512_srli_epi32(sc0, s));
    const __m512i l1 = both(_mm512_and_si512(sc1, low)), h1 = both(_mm512_srli_epi32(sc1, s));
    uint8_t* bl = B + (2 * i) * kPairBytes;
    uint8_t* bh = B + (2 * i + 1) * kPairBytes;
    for (int k = 0; k < 8; ++k) {  // B rows 0..7: sub-block 2i (low nibbles), 8..15: 2i + 1 (high)
        const __m512i x = _mm512_loadu_si512(qs + 512 * i + 64 * k);
        __m512i lo = _mm512_and_si512(x, nib), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), nib);
        if constexpr (Q5) {  // the fifth bits (repack.h): q = nibble + 16 under the masks
            uint64_t bits[2];
            std::memcpy(bits, u + 2304 + 128 * i + 16 * k, sizeof(bits));
            lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(bits[0]), lo, sixteen);
            hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(bits[1]), hi, sixteen);
        }
        _mm512_store_si512(bl + 64 * k, _mm512_mullo_epi16(lo, l0));
        _mm512_store_si512(bh + 64 * k, _mm512_mullo_epi16(lo, h0));
        _mm512_store_si512(bl + 512 + 64 * k, _mm512_mullo_epi16(hi, l1));
        _mm512_store_si512(bh + 512 + 64 * k, _mm512_mullo_epi16(hi, h1));
    }
}

// Round i of an item's tile products over a super-block (unpacked at B; ab: its activation bytes in
// the item's first token row, as: from one token row to the next). One token tile of Ma rows (Two =
// false): C_l (tile 0) += A . B_l, C_h (tile 1) += A . B_h for pair i, in alternate A / B tiles (4, 6-7
// and 5, 2-3) so a round's loads need not wait for the last round's products. Two token tiles (Ma rows,
// then the rest): C_l 0 / 2, C_h 1 / 3, A 4 / 5, B_l / B_h 6-7, each B tile load serving both.
// GCC's tile intrinsics paste their tile numbers into the instruction text, so they must be literals.
template <bool Two>
inline __attribute__((always_inline)) void products(int i, int Ma, const uint8_t* B, const char* ab, size_t as) {
    const uint8_t* bl = B + 2 * i * kPairBytes;
    if constexpr (Two) {
        _tile_loadd(4, ab + 64 * i, as);
        _tile_loadd(6, bl, 64);
        _tile_loadd(7, bl + kPairBytes, 64);
        _tile_loadd(5, ab + Ma * as + 64 * i, as);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
    } else if (i % 2 == 0) {
        _tile_loadd(4, ab + 64 * i, as);
        _tile_loadd(6, bl, 64);
        _tile_loadd(7, bl + kPairBytes, 64);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
    } else {
        _tile_loadd(5, ab + 64 * i, as);
        _tile_loadd(2, bl, 64);
        _tile_loadd(3, bl + kPairBytes, 64);
        _tile_dpbsud(0, 5, 2);
        _tile_dpbsud(1, 5, 3);
    }
}

using CTiles = int32_t[4][16][16];  // C_l, C_h of the first token tile, then of the second

// acc[t] += token t's share of the super-block for tokens [t0, t1), from its stored tiles C_l, C_h:
//   d_a (d_w (2^Shift C_h + C_l) - dmin sum_j m_j S_j)
// dw / dm the rows' scales, mp the mins in pairs (kMinBytes), tok the tokens' records (prep_q4k).
template <int Shift>
inline __attribute__((always_inline)) void epilogue(int t0, int t1, __m512 dw, __m512 dm, const uint8_t* mp,
                                                     const int32_t (*Cl)[16], const int32_t (*Ch)[16],
                                                     const int32_t (*tok)[16], __m512* acc) {
    const __m512i m0 = _mm512_load_si512(mp), m1 = _mm512_load_si512(mp + 64);
    const __m512i m2 = _mm512_load_si512(mp + 128), m3 = _mm512_load_si512(mp + 192);
    for (int t = t0; t < t1; ++t) {  // one index for the four arrays of 64-byte rows
        const __m512i isum =
            _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(Ch[t]), Shift), _mm512_load_si512(Cl[t]));
        __m512i msum = _mm512_madd_epi16(m0, _mm512_set1_epi32(tok[t][0]));
        msum = _mm512_dpwssd_epi32(msum, m1, _mm512_set1_epi32(tok[t][1]));
        msum = _mm512_dpwssd_epi32(msum, m2, _mm512_set1_epi32(tok[t][2]));
        msum = _mm512_dpwssd_epi32(msum, m3, _mm512_set1_epi32(tok[t][3]));
        const __m512 v = _mm512_fmsub_ps(dw, _mm512_cvtepi32_ps(isum), _mm512_mul_ps(dm, _mm512_cvtepi32_ps(msum)));
        float da;
        std::memcpy(&da, &tok[t][4], sizeof da);
        acc[t] = _mm512_fmadd_ps(v, _mm512_set1_ps(da), acc[t]);
    }
}

uint8_t* aligned_buffer(size_t bytes) {
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < bytes + 64) buf.resize(bytes + 64);
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
}

}  // namespace

void prep_q4k(const void* act, size_t as, int64_t n_tokens, int64_t nb, int8_t* aq, int32_t* tok) {
    for (int64_t t = 0; t < n_tokens; ++t) {
        const auto* y = reinterpret_cast<const block_q8_K*>(static_cast<const char*>(act) + t * as);
        for (int64_t b = 0; b < nb; ++b) {
            int32_t* r = tok + (b * n_tokens + t) * 16;
            const int16_t* bs = y[b].bsums;
            for (int i = 0; i < 4; ++i) {
                const auto lo = static_cast<uint16_t>(bs[4 * i] + bs[4 * i + 1]);  // |S| <= 32 * 127
                const auto hi = static_cast<uint16_t>(bs[4 * i + 2] + bs[4 * i + 3]);
                r[i] = static_cast<int32_t>(lo | static_cast<uint32_t>(hi) << 16);
            }
            std::memcpy(&r[4], &y[b].d, sizeof(float));
            int8_t* dst = aq + (b * n_tokens + t) * 256;
            for (int i = 0; i < 4; ++i) _mm512_store_si512(dst + 64 * i, _mm512_loadu_si512(y[b].qs + 64 * i));
        }
    }
}

namespace {

// The schedule of the K-quant kernels' work items (an item: a super-block b and some token tiles): per
// super-block, its items k < items in alternate order (make(b, p) builds item p), each in 4 rounds of tile
// products (round(it, r); round 0 starts from zeroed C tiles), and after each round a quarter of the last
// item's epilogue (finish(prev, its stored C, r)) and unpack(b + 1, k, r), the kernel's share of the next
// super-block's unpacking; then the item's C tiles stored (store(it, C)), in alternate buffers of Cbuf. The
// tile unit runs beside the vector work only when the two are close in the instruction stream.
template <class Item, class CT, class Make, class Round, class Store, class Finish, class Unpack>
inline __attribute__((always_inline)) void run_items(int64_t nb, int64_t items, CT* Cbuf, Make make, Round round,
                                                      Store store, Finish finish, Unpack unpack) {
    Item prev;
    int64_t n_done = 0;
    for (int64_t b = 0; b < nb; ++b) {
        for (int64_t k = 0; k < items; ++k) {
            const Item it = make(b, (b & 1) ? items - 1 - k : k);
            for (int r = 0; r < 4; ++r) {
                TANDEM_MEMORY_BARRIER;
                round(it, r);
                TANDEM_MEMORY_BARRIER;
                if (prev.b >= 0) finish(prev, Cbuf[(n_done - 1) & 1], r);
                if (b + 1 < nb) unpack(b + 1, k, r);
            }
            TANDEM_MEMORY_BARRIER;
            store(it, Cbuf[n_done & 1]);
            TANDEM_MEMORY_BARRIER;
            prev = it;
            ++n_done;
        }
    }
    for (int r = 0; r < 4; ++r) finish(prev, Cbuf[(n_done - 1) & 1], r);
}

// Q4_K (or Q5_K: Q5) tile products for a group, the body of gemm_r16_q4k / gemm_r16_q5k.
template <bool Q5>
void gemm_k(int64_t nb, const uint8_t* group, const int8_t* aq, const int32_t* tok, int64_t n_tokens, float* Y,
            size_t y_stride, int& configured) {
    // Work items: per super-block, the tokens in full items of 32 (two token tiles of 16), then the rest
    // in one item (two tiles when over 16 tokens, else one), taken in alternate order per super-block.
    // With more than one item the tiles are configured 16 rows high throughout (a last tile's rows past
    // the tokens are computed from the padding after aq, and never read): a tile product of 1 row costs
    // nearly as much as one of 16, and a configuration change as much as several. Near-equal items of
    // exact heights (65 tokens as 3 x 2 tiles of 10-11 rows, two shapes a super-block) ran 13-17%
    // slower at 65, 70 and 80 tokens, 20% at 33 (1024 x 7168, one thread). A single item keeps its
    // exact heights (16 rows for 9 tokens: 4% slower). Item i's tile products run beside the vector
    // work of item i - 1's epilogue and of the next super-block's unpacking (other buffers).
    const int64_t full = n_tokens / 32, rest = n_tokens % 32, items = full + (rest > 0);
    const int one = static_cast<int>(n_tokens);
    if (items == 1) configure_q4k(one > 16 ? one / 2 : one, one > 16 ? one - one / 2 : 0, configured);
    else configure_q4k(16, 16, configured);
    uint8_t* Bs =
        aligned_buffer(2 * kSuperBytes + 3 * kMinBytes + 2 * sizeof(CTiles) + static_cast<size_t>(n_tokens) * 64);
    uint8_t* Bbuf[2] = {Bs, Bs + kSuperBytes};
    uint8_t* Mbuf = Bs + 2 * kSuperBytes;  // the mins of super-block b at b % 3: an item's epilogue may
                                           // run beside the unpacking of the super-block after next
    auto* Cbuf = reinterpret_cast<CTiles*>(Mbuf + 3 * kMinBytes);
    auto* acc = reinterpret_cast<__m512*>(Cbuf + 2);
    for (int64_t t = 0; t < n_tokens; ++t) acc[t] = _mm512_setzero_ps();
    struct Item { int64_t b = -1, t0 = 0; int Ma = 0, Mb = 0; };
    // Part r of 4 of item it's epilogue (its tokens [r n / 4, (r + 1) n / 4)), from its stored tiles C
    auto finish = [&](const Item& it, const CTiles& C, int r) {
        const uint8_t* u = group + it.b * kUnit<Q5>;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)));
        const __m512 dm = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 32)));
        const uint8_t* mp = Mbuf + (it.b % 3) * kMinBytes;
        const auto* rec = reinterpret_cast<const int32_t(*)[16]>(tok + (it.b * n_tokens + it.t0) * 16);
        const int n = it.Ma + it.Mb, lo = r * n / 4, hi = (r + 1) * n / 4;
        if (lo < it.Ma)
            epilogue<kShift<Q5>>(lo, std::min(hi, it.Ma), dw, dm, mp, C[0], C[1], rec, acc + it.t0);
        if (hi > it.Ma)
            epilogue<kShift<Q5>>(std::max(lo, it.Ma) - it.Ma, hi - it.Ma, dw, dm, mp, C[2], C[3], rec + it.Ma,
                                 acc + it.t0 + it.Ma);
    };
    for (int i = 0; i < 4; ++i) unpack_pair<Q5>(group, i, Bbuf[0], Mbuf);
    // The next super-block's unpacking a pair a round beside its first item (run_items). Against the tile
    // products of a whole item, then its vector work: 1024 x 7168 Q4_K at 32 tokens
    // 9-11% faster, 64 tokens 1.00-1.01x; V3-shaped MoE at T=128 76.4 -> 72.5 ms, V2-Lite 25.0 -> 24.4 ms
    // (in-process A/B, 2 threads).
    auto make = [&](int64_t b, int64_t p) {
        Item it;
        it.b = b;
        it.t0 = 32 * p;
        const int n = p < full ? 32 : static_cast<int>(rest);
        it.Ma = items == 1 && n > 16 ? n / 2 : std::min(n, 16);
        it.Mb = n - it.Ma;
        return it;
    };
    auto round = [&](const Item& it, int r) {
        const uint8_t* B = Bbuf[it.b & 1];
        const char* ab = reinterpret_cast<const char*>(aq + (it.b * n_tokens + it.t0) * 256);
        if (r == 0) {
            _tile_zero(0);
            _tile_zero(1);
            if (it.Mb > 0) {
                _tile_zero(2);
                _tile_zero(3);
            }
        }
        if (it.Mb > 0) products<true>(r, it.Ma, B, ab, 256);
        else products<false>(r, it.Ma, B, ab, 256);
    };
    auto store = [&](const Item& it, CTiles& C) {
        if (it.Mb > 0) {
            _tile_stored(2, C[2], 64);
            _tile_stored(3, C[3], 64);
        }
        _tile_stored(0, C[0], 64);
        _tile_stored(1, C[1], 64);
    };
    auto unpack = [&](int64_t b, int64_t k, int r) {  // beside the rounds of a super-block's first item
        if (k == 0) unpack_pair<Q5>(group + b * kUnit<Q5>, r, Bbuf[b & 1], Mbuf + (b % 3) * kMinBytes);
    };
    run_items<Item>(nb, items, Cbuf, make, round, store, finish, unpack);
    for (int64_t t = 0; t < n_tokens; ++t) _mm512_storeu_ps(Y + t * y_stride, acc[t]);
}

}  // namespace

void gemm_r16_q4k(int64_t nb, const uint8_t* group, const int8_t* aq, const int32_t* tok, int64_t n_tokens, float* Y,
                  size_t y_stride, int& configured) {
    gemm_k<false>(nb, group, aq, tok, n_tokens, Y, y_stride, configured);
}

void gemm_r16_q5k(int64_t nb, const uint8_t* group, const int8_t* aq, const int32_t* tok, int64_t n_tokens, float* Y,
                  size_t y_stride, int& configured) {
    gemm_k<true>(nb, group, aq, tok, n_tokens, Y, y_stride, configured);
}

namespace {

// Q6_K: 6-bit quants q with an int8 scale per 16-value sub-block, value = d sc (q - 32). Its scales do not
// fold into bytes beside q - 32 (up to 32 x 128), so each is split into three balanced base-7 digits,
// sc = e0 + 7 e1 + 49 e2 (|e| <= 3), and (q - 32) e, within +-96, is a signed byte: three B tiles a K step,
// three C tiles a token tile, summed as C0 + 7 (C1 + 7 C2), exact. The signed products need no offset
// correction; the digit products take one vpmullw and one vpsubb a digit per 64 bytes (unpack_q6k).
constexpr size_t kUnitQ6 = 210 * kR16;
constexpr size_t kStepQ6 = 3 * kPairBytes;  // a K step's B tiles, one a digit
constexpr size_t kSuperQ6 = 4 * kStepQ6;
using CTiles3 = int32_t[3][16][16];

// C 0-2, A 3 / 4 (alternate K steps), B 5-7, token tiles of M rows; `configured` becomes 3000 + M (apart
// from the other kernels' shape ids: gemm_k's 1000 + 32 Ma + Mb, gemm32's 100 + M, gemm_bf16's 2000)
void configure_q6k(int M, int& configured) {
    if (configured == 3000 + M) return;
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    for (int t = 0; t < 5; ++t) c.rows[t] = static_cast<uint8_t>(M);
    load_config(c);
    configured = 3000 + M;
}

// K step i (values 64 i .. 64 i + 63) of super-block u of the group -> its B tiles at B: B_x row r (values
// 64 i + 4 r .. + 3), lane j = (q - 32) e_x of row j's sub-block 4 i + r / 4.
// The byte products: for a word v = (q_e + 1) + 256 q_o (q_e + 1 in 1..64) and a digit e in -3..3,
// (v e) mod 2^16 has low byte (q_e + 1) e and high byte q_o e - [e < 0] (the low product's borrow, always
// there for e < 0 and never for e >= 0), mod 256; less the bytes of 8225 e mod 2^16 (low 33 e, high
// 32 e - [e < 0]), byte by byte, they are (q_e - 32) e and (q_o - 32) e.
// Rows k and 8 + k for k in [4 half, 4 half + 4): sub-blocks 4 i + half and 4 i + 2 + half.
inline __attribute__((always_inline)) void unpack_q6k(const uint8_t* u, int i, int half, uint8_t* B) {
    prefetch_share<kUnitQ6, 8, kAheadAmx, Prefetch::OneLevel>(u, 2 * i + half);
    const __m512i seven = _mm512_set1_epi16(7), inv7 = _mm512_set1_epi16(4681), k8225 = _mm512_set1_epi16(8225);
    const __m512i words = _mm512_set4_epi32(0x0d0c0d0c, 0x09080908, 0x05040504, 0x01000100);
    const __m512i nib = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x30), one = _mm512_set1_epi16(1);
    // per sub-block g of the step, digit x: E the digit (a word, twice in each row's dword), C 8225 e
    __m512i E[4][3], C[4][3];
    for (int g = half; g < 4; g += 2) {
        const __m512i sc = _mm512_shuffle_epi8(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 32 + 16 * (4 * i + g)))),
            words);
        const __m512i s1 = _mm512_mulhrs_epi16(sc, inv7);  // round(sc / 7): |sc| <= 128, exact
        const __m512i s2 = _mm512_mulhrs_epi16(s1, inv7);
        E[g][0] = _mm512_sub_epi16(sc, _mm512_mullo_epi16(s1, seven));
        E[g][1] = _mm512_sub_epi16(s1, _mm512_mullo_epi16(s2, seven));
        E[g][2] = s2;
        for (int x = 0; x < 3; ++x) C[g][x] = _mm512_mullo_epi16(E[g][x], k8225);
    }
    const int h = i / 2;
    const uint8_t* ql = u + 288 + 64 * 16 * h;
    const uint8_t* qh = u + 2336 + 64 * 8 * h;
    // rows k (ql vector 16 h + k) and 8 + k (ql vector 16 h + 8 + k), both with qh vector 8 h + k
    for (int k = 4 * half; k < 4 * half + 4; ++k) {
        const __m512i l0 = _mm512_loadu_si512(ql + 64 * k), l1 = _mm512_loadu_si512(ql + 64 * (8 + k));
        const __m512i hb = _mm512_loadu_si512(qh + 64 * k);
        __m512i qa, qb;  // (q_l & 15) | (2 bits of qh) << 4
        if (i % 2 == 0) {
            qa = _mm512_ternarylogic_epi32(l0, _mm512_and_si512(_mm512_slli_epi16(hb, 4), two), nib, 0xEC);
            qb = _mm512_ternarylogic_epi32(l1, _mm512_and_si512(_mm512_slli_epi16(hb, 2), two), nib, 0xEC);
        } else {
            qa = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l0, 4), _mm512_and_si512(hb, two), nib, 0xEC);
            qb = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l1, 4), _mm512_and_si512(_mm512_srli_epi16(hb, 2), two),
                                           nib, 0xEC);
        }
        qa = _mm512_add_epi16(qa, one);
        qb = _mm512_add_epi16(qb, one);
        for (int x = 0; x < 3; ++x) {
            uint8_t* bx = B + x * kPairBytes;
            _mm512_store_si512(bx + 64 * k, _mm512_sub_epi8(_mm512_mullo_epi16(qa, E[k / 4][x]), C[k / 4][x]));
            _mm512_store_si512(bx + 64 * (8 + k),
                               _mm512_sub_epi8(_mm512_mullo_epi16(qb, E[2 + k / 4][x]), C[2 + k / 4][x]));
        }
    }
}

// A K step's tile products for a token tile: C_x (tile x) += A . B_x, A in tile 3 or 4 (Alt)
template <bool Alt>
inline __attribute__((always_inline)) void products_q6k(const uint8_t* B, const char* ab) {
    if constexpr (Alt) _tile_loadd(4, ab, 256);
    else _tile_loadd(3, ab, 256);
    _tile_loadd(5, B, 64);
    _tile_loadd(6, B + kPairBytes, 64);
    _tile_loadd(7, B + 2 * kPairBytes, 64);
    if constexpr (Alt) {
        _tile_dpbssd(0, 4, 5);
        _tile_dpbssd(1, 4, 6);
        _tile_dpbssd(2, 4, 7);
    } else {
        _tile_dpbssd(0, 3, 5);
        _tile_dpbssd(1, 3, 6);
        _tile_dpbssd(2, 3, 7);
    }
}

// acc[t] += d_a d_w (C0 + 7 (C1 + 7 C2)) for tokens [t0, t1) of a token tile, from its stored tiles
inline __attribute__((always_inline)) void epilogue_q6k(int t0, int t1, __m512 dw, const CTiles3& C,
                                                         const int32_t (*tok)[16], __m512* acc) {
    for (int t = t0; t < t1; ++t) {
        const __m512i c2 = _mm512_load_si512(C[2][t]);
        const __m512i x = _mm512_add_epi32(_mm512_load_si512(C[1][t]), _mm512_sub_epi32(_mm512_slli_epi32(c2, 3), c2));
        const __m512i isum = _mm512_add_epi32(_mm512_load_si512(C[0][t]), _mm512_sub_epi32(_mm512_slli_epi32(x, 3), x));
        float da;
        std::memcpy(&da, &tok[t][4], sizeof da);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(da)), acc[t]);
    }
}

}  // namespace

void gemm_r16_q6k(int64_t nb, const uint8_t* group, const int8_t* aq, const int32_t* tok, int64_t n_tokens, float* Y,
                  size_t y_stride, int& configured) {
    // Work items (run_items): one token tile of a super-block each, its 4 rounds the K steps; with more
    // than one, all 16 rows high (as gemm_k).
    const int64_t items = (n_tokens + 15) / 16;
    configure_q6k(items == 1 ? static_cast<int>(n_tokens) : 16, configured);
    uint8_t* Bs = aligned_buffer(2 * kSuperQ6 + 2 * sizeof(CTiles3) + static_cast<size_t>(n_tokens) * 64);
    uint8_t* Bbuf[2] = {Bs, Bs + kSuperQ6};
    auto* Cbuf = reinterpret_cast<CTiles3*>(Bs + 2 * kSuperQ6);
    auto* acc = reinterpret_cast<__m512*>(Cbuf + 2);
    for (int64_t t = 0; t < n_tokens; ++t) acc[t] = _mm512_setzero_ps();
    struct Item { int64_t b = -1, t0 = 0; int n = 0; };
    auto finish = [&](const Item& it, const CTiles3& C, int r) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + it.b * kUnitQ6)));
        const auto* rec = reinterpret_cast<const int32_t(*)[16]>(tok + (it.b * n_tokens + it.t0) * 16);
        epilogue_q6k(r * it.n / 4, (r + 1) * it.n / 4, dw, C, rec, acc + it.t0);
    };
    for (int i = 0; i < 8; ++i) unpack_q6k(group, i / 2, i % 2, Bbuf[0] + i / 2 * kStepQ6);
    auto make = [&](int64_t b, int64_t p) {
        Item it;
        it.b = b;
        it.t0 = 16 * p;
        it.n = static_cast<int>(std::min<int64_t>(16, n_tokens - it.t0));
        return it;
    };
    auto round = [&](const Item& it, int r) {
        const uint8_t* B = Bbuf[it.b & 1] + r * kStepQ6;
        const char* ab = reinterpret_cast<const char*>(aq + (it.b * n_tokens + it.t0) * 256) + 64 * r;
        if (r == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
        }
        if (r & 1) products_q6k<true>(B, ab);
        else products_q6k<false>(B, ab);
    };
    auto store = [&](const Item&, CTiles3& C) {
        _tile_stored(0, C[0], 64);
        _tile_stored(1, C[1], 64);
        _tile_stored(2, C[2], 64);
    };
    // the next super-block's unpacking, in half-steps (unpack_q6k's digit registers for two sub-blocks
    // instead of four: 1.15-1.2x faster at 8-16 tokens): a step's two halves beside each round of the first
    // item, or with more items, its 8 halves one a round over the first two items
    const int split = items > 1 ? 2 : 1;
    auto unpack = [&](int64_t b, int64_t k, int r) {
        if (k >= split) return;
        const uint8_t* u = group + b * kUnitQ6;
        uint8_t* B = Bbuf[b & 1];
        if (split == 1) {
            unpack_q6k(u, r, 0, B + r * kStepQ6);
            unpack_q6k(u, r, 1, B + r * kStepQ6);
        } else {
            const int h = 4 * static_cast<int>(k) + r;  // half-step h of 8
            unpack_q6k(u, h / 2, h % 2, B + h / 2 * kStepQ6);
        }
    };
    run_items<Item>(nb, items, Cbuf, make, round, store, finish, unpack);
    for (int64_t t = 0; t < n_tokens; ++t) _mm512_storeu_ps(Y + t * y_stride, acc[t]);
}

namespace {

constexpr size_t kBlockB = 512;  // one 32-value block of the 16 rows as a B tile: 8 x 64 bytes

void configure32(int M) {
    TileConfig c;
    for (int t : {0, 1, 6, 7}) c.rows[t] = static_cast<uint8_t>(M), c.colsb[t] = 64;   // C, two pairs
    for (int t = 2; t < 4; ++t) c.rows[t] = static_cast<uint8_t>(M), c.colsb[t] = 32;  // A
    for (int t = 4; t < 6; ++t) c.rows[t] = 8, c.colsb[t] = 64;                        // B
    load_config(c);
}

// Block b's quants of the 16 rows as a B tile of signed values (Q4_0: q - 8, Q5_0: q - 16), so the
// products need no offset correction, as Q8_0's.
template <GgmlType Base>
inline __attribute__((always_inline)) void unpack32(const uint8_t* u, uint8_t* B) {
    const uint8_t* qs = u + 2 * kR16;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512i off = _mm512_set1_epi8(Base == GgmlType::Q5_0 ? 16 : 8);
    for (int m = 0; m < 4; ++m) {
        const __m512i x = _mm512_loadu_si512(qs + 64 * m);
        __m512i lo = _mm512_and_si512(x, nib), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), nib);
        if constexpr (Base == GgmlType::Q5_0) {  // the fifth bit: q = lo + 16 * bit, so q - 16 = lo - 16 * !bit
            uint64_t bl, bh;
            std::memcpy(&bl, qs + 256 + 8 * m, 8);
            std::memcpy(&bh, qs + 256 + 8 * (m + 4), 8);
            lo = _mm512_mask_sub_epi8(lo, _knot_mask64(_cvtu64_mask64(bl)), lo, off);
            hi = _mm512_mask_sub_epi8(hi, _knot_mask64(_cvtu64_mask64(bh)), hi, off);
        } else {
            lo = _mm512_sub_epi8(lo, off);
            hi = _mm512_sub_epi8(hi, off);
        }
        _mm512_store_si512(B + 64 * m, lo);
        _mm512_store_si512(B + 64 * (m + 4), hi);
    }
}

// The products of blocks b and b + 1 (n = 2) or b alone (n = 1) for a token tile into the C tiles P, Q
// (ab: block b's packed activation rows, as: the bytes from one block's to the next's), and their
// store to C. Macros: GCC's tile intrinsics paste their tile numbers into the instruction text, so they
// must be literals.
#define TANDEM_PRODUCTS32(P, Q, n, ab, as, B0, B1) \
    do {                                           \
        _tile_zero(P);                             \
        _tile_loadd(2, ab, 32);                    \
        _tile_loadd(4, B0, 64);                    \
        _tile_dpbssd(P, 2, 4);                     \
        if ((n) == 2) {                            \
            _tile_zero(Q);                         \
            _tile_loadd(3, (ab) + (as), 32);       \
            _tile_loadd(5, B1, 64);                \
            _tile_dpbssd(Q, 3, 5);                 \
        }                                          \
    } while (0)
#define TANDEM_STORE32(P, Q, n, C)                      \
    do {                                                \
        _tile_stored(P, (C)[0], 64);                    \
        if ((n) == 2) _tile_stored(Q, (C)[1], 64);      \
    } while (0)

// acc[t] += float(C) * (d_w * d_a) for blocks [b, b + n) of M tokens from their stored tiles C
template <GgmlType Base>
inline __attribute__((always_inline)) void epilogue32(int M, int64_t nb, int64_t b, int n, const uint8_t* group,
                                                       const int32_t (*C)[16][16], const float* ad, __m512* acc) {
    constexpr size_t unit = (Base == GgmlType::Q8_0 ? 34 : Base == GgmlType::Q5_0 ? 22 : 18) * kR16;
    auto scale = [&](int64_t blk) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + blk * unit)));
    };
    const __m512 dw0 = scale(b);
    if (n == 2) {
        const __m512 dw1 = scale(b + 1);
        for (int t = 0; t < M; ++t) {
            const __m512 x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(C[0][t])),
                                             _mm512_mul_ps(dw0, _mm512_set1_ps(ad[t * nb + b])), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(C[1][t])),
                                     _mm512_mul_ps(dw1, _mm512_set1_ps(ad[t * nb + b + 1])), x);
        }
    } else {
        for (int t = 0; t < M; ++t)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(C[0][t])),
                                     _mm512_mul_ps(dw0, _mm512_set1_ps(ad[t * nb + b])), acc[t]);
    }
}

template <GgmlType Base>
void gemm32(int64_t nb, const uint8_t* group, const int8_t* aq, const float* ad, int64_t n_tokens, float* Y,
            size_t y_stride, int& configured) {
    constexpr size_t unit = (Base == GgmlType::Q8_0 ? 34 : Base == GgmlType::Q5_0 ? 22 : 18) * kR16;
    const auto* a = reinterpret_cast<const char*>(aq);
    const size_t as = static_cast<size_t>(n_tokens) * 32;
    const int64_t tiles = (n_tokens + 15) / 16;
    // the B tile of block b: Q8_0's stored quants in place, else unpacked (all blocks once when several
    // token tiles share them, else two at a time)
    auto stored = [&](int64_t b) { return group + b * unit + 2 * kR16; };
    uint8_t* Bs = nullptr;
    if constexpr (Base != GgmlType::Q8_0) {
        Bs = aligned_buffer((tiles > 1 ? static_cast<size_t>(nb) : 4) * kBlockB);
        if (tiles > 1) {
            for (int64_t b = 0; b < nb; ++b) {
                prefetch_share<unit, 1, kAheadAmx, Prefetch::OneLevel>(group + b * unit, 0);
                unpack32<Base>(group + b * unit, Bs + b * kBlockB);
            }
            TANDEM_MEMORY_BARRIER;
        }
    }
    // Blocks in pairs, the pairs in alternate C tiles (0-1, 6-7), so pair p's products run beside pair
    // p - 1's scaling into acc and pair p + 1's unpacking. Against each pair's products, store and
    // scaling in turn: 2048 x 1408 Q5_0 1.15-1.30x at 9-64 tokens, 2048 x 7168 Q8_0 1.05-1.31x and Q4_0
    // 1.07-1.21x at 9-128 (one thread).
    alignas(64) int32_t C[2][2][16][16];
    __m512 acc[16];
    for (int64_t tile = 0, t0 = 0; tile < tiles; ++tile) {
        const int M = static_cast<int>((n_tokens - t0) / (tiles - tile));
        if (configured != 100 + M) configure32(M), configured = 100 + M;
        for (int t = 0; t < M; ++t) acc[t] = _mm512_setzero_ps();
        const char* act = a + t0 * 32;
        const float* adt = ad + t0 * nb;
        int64_t prev = -1;
        int prev_n = 0;
        // with one token tile, each pair of blocks is unpacked while the pair before's products run
        auto unpack_pair = [&](int64_t b, int64_t p) {
            uint8_t* Bp = Bs + (p & 1) * 2 * kBlockB;
            for (int64_t i = b; i < std::min(nb, b + 2); ++i) {
                prefetch_share<unit, 1, kAheadAmx, Prefetch::OneLevel>(group + i * unit, 0);
                unpack32<Base>(group + i * unit, Bp + (i - b) * kBlockB);
            }
        };
        if (Base != GgmlType::Q8_0 && tiles == 1) unpack_pair(0, 0);
        for (int64_t b = 0, p = 0; b < nb; b += 2, ++p) {
            const int n = nb - b >= 2 ? 2 : 1;
            const uint8_t *B0, *B1;
            if constexpr (Base == GgmlType::Q8_0) {
                prefetch_share<unit, 1, kAheadAmx, Prefetch::OneLevel>(group + b * unit, 0);
                B0 = stored(b), B1 = stored(b + n - 1);
            } else if (tiles > 1) {
                B0 = Bs + b * kBlockB, B1 = Bs + (b + n - 1) * kBlockB;
            } else {
                B0 = Bs + (p & 1) * 2 * kBlockB, B1 = B0 + kBlockB;
            }
            TANDEM_MEMORY_BARRIER;
            if (p & 1) TANDEM_PRODUCTS32(6, 7, n, act + b * as, as, B0, B1);
            else TANDEM_PRODUCTS32(0, 1, n, act + b * as, as, B0, B1);
            TANDEM_MEMORY_BARRIER;
            if (Base != GgmlType::Q8_0 && tiles == 1 && b + 2 < nb) unpack_pair(b + 2, p + 1);
            if (prev >= 0) epilogue32<Base>(M, nb, prev, prev_n, group, C[(p - 1) & 1], adt, acc);
            if (p & 1) TANDEM_STORE32(6, 7, n, C[p & 1]);
            else TANDEM_STORE32(0, 1, n, C[p & 1]);
            TANDEM_MEMORY_BARRIER;
            prev = b, prev_n = n;
        }
        epilogue32<Base>(M, nb, prev, prev_n, group, C[((nb + 1) / 2 - 1) & 1], adt, acc);
        for (int t = 0; t < M; ++t) _mm512_storeu_ps(Y + (t0 + t) * y_stride, acc[t]);
        t0 += M;
    }
}

}  // namespace

void pack32(const void* act, size_t act_stride, int64_t n_tokens, int64_t nb, float* ad, int8_t* aq) {
    for (int64_t t = 0; t < n_tokens; ++t) {
        const auto* y = reinterpret_cast<const block_q8_0*>(static_cast<const char*>(act) + t * act_stride);
        for (int64_t b = 0; b < nb; ++b) {
            ad[t * nb + b] = _cvtsh_ss(y[b].d);
            _mm256_store_si256(reinterpret_cast<__m256i*>(aq + (b * n_tokens + t) * 32),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs)));
        }
    }
}

void gemm_r16(GgmlType base, int64_t nb, const uint8_t* group, const int8_t* aq, const float* ad, int64_t n_tokens,
              float* Y, size_t y_stride, int& configured) {
    switch (base) {
        case GgmlType::Q4_0: return gemm32<GgmlType::Q4_0>(nb, group, aq, ad, n_tokens, Y, y_stride, configured);
        case GgmlType::Q5_0: return gemm32<GgmlType::Q5_0>(nb, group, aq, ad, n_tokens, Y, y_stride, configured);
        case GgmlType::Q8_0: return gemm32<GgmlType::Q8_0>(nb, group, aq, ad, n_tokens, Y, y_stride, configured);
        default: return;
    }
}

namespace {

// r[i] <- column i of the 16 x 16 dwords r[0..15] (row i in r[i])
inline __attribute__((always_inline)) void transpose16(__m512i* r) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {  // in each 128-bit lane L: rows 2i, 2i + 1 of columns 4L..4L + 3
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: rows 4i..4i + 3 of column 4L + c
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // lane L of u[c], u[4 + c], u[8 + c], u[12 + c] -> column 4L + c
        const __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
        const __m512i e = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i f = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_i32x4(a, e, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(b, f, 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(a, e, 0xDD);
        r[12 + c] = _mm512_shuffle_i32x4(b, f, 0xDD);
    }
}

}  // namespace

void pack_bf16(const void* act, size_t act_stride, int64_t n_tokens, int64_t n, uint16_t* packed) {
    const int64_t steps = (n + 31) / 32, tiles = (n_tokens + 15) / 16;
    // Per token tile and step: the 16 tokens' 32 values (16 dwords of pairs each) transposed in registers, so
    // tile row p holds pair p of every token. (Gathering each tile row from the 16 tokens' rows took a third
    // of the products' time at 128 tokens of 4096 values, rows 8 KiB apart sharing an L1 set; scattering
    // each token's dwords, twice that.)
    for (int64_t j = 0; j < tiles; ++j) {
        const int64_t nt = std::min<int64_t>(16, n_tokens - 16 * j);
        const char* a = static_cast<const char*>(act) + 16 * j * act_stride;
        for (int64_t s = 0; s < steps; ++s) {
            const int64_t left = std::min<int64_t>(32, n - 32 * s);
            const auto m = static_cast<__mmask32>(left >= 32 ? ~0u : (1u << left) - 1);  // zeros past n
            __m512i r[16];
            for (int t = 0; t < 16; ++t)  // zeros past n_tokens
                r[t] = t < nt ? _mm512_maskz_loadu_epi16(m, a + t * act_stride + 64 * s) : _mm512_setzero_si512();
            transpose16(r);
            uint16_t* dst = packed + (s * tiles + j) * kBf16Tile;
            for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + 32 * p, r[p]);
        }
    }
}

namespace {

// Products over all of K for rows a (and b: Two rows) of 16 and token tiles j (and j + 1: Two tokens),
// into C tiles 0 / 1 (row group a, tokens j / j + 1) and 2 / 3 (b); A tiles 4 / 5, B tiles 6 / 7.
// Steps past `full` (a partial last one) read the rows from the zero-padded copies in tail.
template <bool TwoRows, bool TwoTok>
void bf16_block(const uint8_t* wa, const uint8_t* wb, size_t ws, int64_t full, int64_t steps, const uint16_t* pk,
                int64_t tiles, const uint8_t* tail, float (*C)[16][16]) {
    _tile_zero(0);
    if (TwoTok) _tile_zero(1);
    if (TwoRows) _tile_zero(2);
    if (TwoRows && TwoTok) _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
        const bool in = s < full;
        const uint16_t* b = pk + s * tiles * kBf16Tile;
        _tile_loadd(4, in ? wa + 64 * s : tail, in ? ws : 64);
        _tile_loadd(6, b, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (TwoTok) {
            _tile_loadd(7, b + kBf16Tile, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (TwoRows) {
            _tile_loadd(5, in ? wb + 64 * s : tail + 1024, in ? ws : 64);
            _tile_dpbf16ps(2, 5, 6);
            if (TwoTok) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, C[0], 64);
    if (TwoTok) _tile_stored(1, C[1], 64);
    if (TwoRows) _tile_stored(2, C[2], 64);
    if (TwoRows && TwoTok) _tile_stored(3, C[3], 64);
}

}  // namespace

void gemm_bf16(int64_t n, const uint8_t* W, size_t w_stride, int64_t groups, const uint16_t* packed,
               int64_t n_tokens, float* Y, size_t y_stride, int& configured) {
    if (configured != 2000) {
        TileConfig c;
        for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
        load_config(c);
        configured = 2000;
    }
    const int64_t full = n / 32, steps = (n + 31) / 32, tiles = (n_tokens + 15) / 16;
    alignas(64) uint8_t tail[2][16][64];
    alignas(64) float C[4][16][16];
    for (int64_t g = 0; g < groups; g += 2) {
        const bool two_rows = g + 1 < groups;
        const uint8_t* wa = W + g * 16 * w_stride;
        const uint8_t* wb = wa + 16 * w_stride;
        if (steps > full) {  // the rows' last partial 32 values, zero-padded
            std::memset(tail, 0, sizeof tail);
            const size_t bytes = static_cast<size_t>(n - 32 * full) * 2;
            for (int r = 0; r < 16; ++r) {
                std::memcpy(tail[0][r], wa + r * w_stride + 64 * full, bytes);
                if (two_rows) std::memcpy(tail[1][r], wb + r * w_stride + 64 * full, bytes);
            }
        }
        for (int64_t j = 0; j < tiles; j += 2) {
            const bool two_tok = j + 1 < tiles;
            const uint16_t* pk = packed + j * kBf16Tile;
            TANDEM_MEMORY_BARRIER;
            if (two_rows && two_tok) bf16_block<true, true>(wa, wb, w_stride, full, steps, pk, tiles, tail[0][0], C);
            else if (two_rows) bf16_block<true, false>(wa, wb, w_stride, full, steps, pk, tiles, tail[0][0], C);
            else if (two_tok) bf16_block<false, true>(wa, wb, w_stride, full, steps, pk, tiles, tail[0][0], C);
            else bf16_block<false, false>(wa, wb, w_stride, full, steps, pk, tiles, tail[0][0], C);
            TANDEM_MEMORY_BARRIER;
            // C[2 rb + tt][r][t]: row r of group g + rb, token 16 (j + tt) + t
            for (int rb = 0; rb < (two_rows ? 2 : 1); ++rb)
                for (int tt = 0; tt < (two_tok ? 2 : 1); ++tt) {
                    const int64_t t0 = 16 * (j + tt), nt = std::min<int64_t>(16, n_tokens - t0);
                    float* y = Y + t0 * y_stride + (g + rb) * 16;
                    for (int64_t t = 0; t < nt; ++t)
                        for (int r = 0; r < 16; ++r) y[t * y_stride + r] = C[2 * rb + tt][r][t];
                }
        }
    }
}

void release_tiles() { _tile_release(); }

}  // namespace tandem::detail::amx

#if defined(__clang__)
#pragma clang attribute pop
#endif
