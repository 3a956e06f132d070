// SIMD dot kernels, one source for three ISAs. Included (once each) by dot_avx2.cpp, dot_avx512.cpp and
// dot_avx512_vnni.cpp after their target pragma, with
//   TANDEM_DOT_LEVEL  2 = AVX2+FMA+F16C, 3 = AVX-512 F/BW/VL/DQ, 4 = AVX-512 + VNNI
//   TANDEM_DOT_NS     the namespace the kernel table goes into.
// Everything is in an anonymous namespace (internal linkage), so no SIMD code can be merged with
// another translation unit's copy.
//
// Shape of every kernel (ik_llama.cpp's nrc_y): for each weight block, unpack it once into registers
// (quants as int8 vectors, scales as int16 vectors), then multiply it against the same block of each
// of the NA activation rows. Integer sums are exact; floats enter once per block (32-value types) or
// super-block (K-quants).
//   32-value blocks: one block per 256-bit vector (AVX2), two per 512-bit vector (AVX-512, the odd
//     last block at 256 bits); signed x signed via |w| x sign(a, w), then maddubs + madd or dpbusd
//     (VNNI). The activation scales d_a (s_a) come as f16 from the blocks, or already in f32 from
//     matmul_rows (run_f32_scales), which converts them once per token tile instead of once per row.
//     On VNNI, Q4_0/Q5_0/Q8_0 go to Gemv32 (one row) and Gemm32 (2..8 rows) on activations prepared
//     once per tile (act_prep); Gemm32 puts one block per int32 lane, 16 blocks per group.
//   K-quants: AVX2 one 32-value sub-block per vector; AVX-512 64 values (two sub-blocks) per vector,
//     maddubs then madd (BW) or dpwssd (VNNI) with the int16 sub-block scales. Q4_K/Q5_K mins come from
//     the Q8_K bsums and never touch the weight quants. On VNNI, Q4_K with 2..8 rows goes to GemmQ4K
//     (Gemm32's scheme, one sub-block per int32 lane: dpbusd on unsigned nibbles, then one fma by the
//     scales and one by the mins per 16 sub-blocks) on activations prepared once per tile.
//     Q6_K quants are made signed (q - 32) and use the |w| x sign(a, w) trick: taking the -32 from the
//     bsums instead leaves every lane biased by 32 * sum(a), and float32 rounding of those large lanes
//     costs ~1e-5 relative accuracy.
//   F32 / F16 / BF16: FMA on f32 (F16 via F16C vcvtph2ps, BF16 by shifting into the high half).

#if !defined(TANDEM_DOT_LEVEL) || !defined(TANDEM_DOT_NS)
#error "dot_simd.h is included by the dot_<isa>.cpp files only"
#endif

#define TANDEM_INLINE inline __attribute__((always_inline))

namespace tandem::detail::TANDEM_DOT_NS {
namespace {

using qk::QK8_0;
using qk::QK_K;

// ---------------------------------------------------------------------------------------- helpers

template <class Block>
TANDEM_INLINE const Block* act_row(const void* a, size_t stride, int r) {
    return reinterpret_cast<const Block*>(static_cast<const char*>(a) + static_cast<size_t>(r) * stride);
}

TANDEM_INLINE float f16(uint16_t h) { return _cvtsh_ss(h); }

TANDEM_INLINE __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
TANDEM_INLINE __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

TANDEM_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 int32 partial sums of u (unsigned bytes) x s (signed bytes) over 32 bytes.
TANDEM_INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
#if TANDEM_DOT_LEVEL >= 4
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

#if TANDEM_DOT_LEVEL >= 3
TANDEM_INLINE __m128i pack_halves(uint16_t a, uint16_t b) {  // two f16 in the low 32 bits, for vcvtph2ps
    return _mm_cvtsi32_si128(static_cast<int>(a | static_cast<uint32_t>(b) << 16));
}

TANDEM_INLINE __m512i dot_u8s8_512(__m512i u, __m512i s) {  // 16 int32 partial sums over 64 bytes
#if TANDEM_DOT_LEVEL >= 4
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
}

#if TANDEM_DOT_LEVEL >= 4
// s + the dpbusd of 8 unsigned weight vectors q[k] with 8 prepared activation vectors aq[k] (int32 lanes,
// exact). Up to 4 activation rows the tile has too little independent work to hide dpbusd's latency,
// so the chain is split in two.
template <int NA>
TANDEM_INLINE __m512i dpbusd8(__m512i s, const __m512i* q, const __m512i* aq) {
    if constexpr (NA <= 4) {
        __m512i s2 = _mm512_setzero_si512();
        for (int k = 0; k < 8; k += 2) {
            s = _mm512_dpbusd_epi32(s, q[k], _mm512_loadu_si512(aq + k));
            s2 = _mm512_dpbusd_epi32(s2, q[k + 1], _mm512_loadu_si512(aq + k + 1));
        }
        return _mm512_add_epi32(s, s2);
    } else {
        for (int k = 0; k < 8; ++k) s = _mm512_dpbusd_epi32(s, q[k], _mm512_loadu_si512(aq + k));
        return s;
    }
}
#endif
#endif

// The activation quantizers' float lanes (dot_avx2.cpp, dot_avx512.cpp): 8 (AVX2) or 16 (AVX-512).
struct Lanes8 {
    static constexpr int N = 8;
    using F = __m256;
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static F abs(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
    static F max(F a, F b) { return _mm256_max_ps(a, b); }  // b when either is NaN
    static F zero() { return _mm256_setzero_ps(); }
    static float hmax(F v) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    }
    static unsigned equal(F a, float b) {
        return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(b), _CMP_EQ_OQ)));
    }
};
#if TANDEM_DOT_LEVEL >= 3
struct Lanes16 {
    static constexpr int N = 16;
    using F = __m512;
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static F abs(F v) { return _mm512_abs_ps(v); }
    static F max(F a, F b) { return _mm512_max_ps(a, b); }  // b when either is NaN
    static F zero() { return _mm512_setzero_ps(); }
    static float hmax(F v) { return _mm512_reduce_max_ps(v); }
    static unsigned equal(F a, float b) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(b), _CMP_EQ_OQ); }
};
#endif

// max |x| over n values (a multiple of L::N), NaN left out (maxps returns its second operand), as the
// scalar quantizers' running max
template <class L>
TANDEM_INLINE float max_magnitude(const float* x, int n) {
    typename L::F acc = L::zero();
    for (int k = 0; k < n; k += L::N) acc = L::max(L::abs(L::load(x + k)), acc);
    return L::hmax(acc);
}

// The signed value of the first of n values whose magnitude is amax (Q8_K's max, as the scalar loop
// keeps it); 0 when there is none
template <class L>
TANDEM_INLINE float first_of_magnitude(const float* x, int n, float amax) {
    for (int k = 0; k < n; k += L::N)
        if (const unsigned hit = L::equal(L::abs(L::load(x + k)), amax)) return x[k + __builtin_ctz(hit)];
    return 0.0f;
}

// Q8_K block y's scale for its 256 values xb: iscale = -127 / the signed value of its first element of
// the largest magnitude, as the scalar quantizer takes it; false, and y all zeros (d = 0, qs = 0, bsums =
// 0), for an all-zero block. A max of +-inf gives iscale -0, still a block to quantize.
template <class L>
TANDEM_INLINE bool q8k_iscale(const float* xb, block_q8_K* y, float& iscale) {
    const float amax = max_magnitude<L>(xb, 256);
    if (amax == 0.0f) {
        std::memset(y, 0, sizeof(*y));
        return false;
    }
    iscale = -127.0f / first_of_magnitude<L>(xb, 256, amax);
    return true;
}

// Block i of a Q8_0 (or Q8_1) row: its d (and s = d * the sum of its quants) written; where its quants go
TANDEM_INLINE int8_t* q8_block_head(void* dst, int64_t i, bool q8_1, float d, int32_t sum) {
    if (q8_1) {
        auto* y = static_cast<block_q8_1*>(dst) + i;
        y->d = float_to_half(d);
        y->s = float_to_half(d * static_cast<float>(sum));
        return y->qs;
    }
    auto* y = static_cast<block_q8_0*>(dst) + i;
    y->d = float_to_half(d);
    return y->qs;
}

// Byte j = 0xFF where bit j of the 32-bit word at p is set.
TANDEM_INLINE __m256i bits_to_bytes(const uint8_t* p) {
    uint32_t bits;
    std::memcpy(&bits, p, 4);
#if TANDEM_DOT_LEVEL >= 3
    return _mm256_movm_epi8(bits);
#else
    const __m256i spread = _mm256_shuffle_epi8(  // byte j <- byte j/8 of the word
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));  // byte j -> bit j%8
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
#endif
}

// Low nibbles of 16 bytes in the low 128 bits, high nibbles in the high 128 bits (values 0..15).
TANDEM_INLINE __m256i nibbles32(const uint8_t* qs) {
    const __m128i raw = load128(qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}

// n_act at run time -> the kernel instantiated for that many activation rows.
template <class K>
void by_rows(int64_t n, const void* w, const void* a, size_t as, int n_act, float* out) {
    switch (n_act) {
        case 1: K::template run<1>(n, w, a, as, out); break;
        case 2: K::template run<2>(n, w, a, as, out); break;
        case 3: K::template run<3>(n, w, a, as, out); break;
        case 4: K::template run<4>(n, w, a, as, out); break;
        case 5: K::template run<5>(n, w, a, as, out); break;
        case 6: K::template run<6>(n, w, a, as, out); break;
        case 7: K::template run<7>(n, w, a, as, out); break;
        case 8: K::template run<8>(n, w, a, as, out); break;
        default: break;
    }
}

// The two-row form (DotKernel2), from a kernel's rows<NA, NW> (NW weight rows against NA activation rows):
// in decode (1-2 activation rows) the two weight rows stream from memory side by side; from AVX-512 on, 3-8
// rows too, where each weight load serves twice the activation rows for the same sums as the one-row form
// (its accumulators per output are the same from 3 rows on): MLA's attention scores, prefill of float
// weights. (On AVX2, in two passes of 4 rows to fit 16 registers, f32 ran 1.4x slower on Zen 4.)
template <class K>
void by_rows2(int64_t n, const void* w0, const void* w1, const void* a, size_t as, int n_act, float* out0,
              float* out1) {
    const void* w[2] = {w0, w1};
    float* out[2] = {out0, out1};
    switch (n_act) {
        case 1: return K::template rows<1, 2>(n, w, a, as, out);
        case 2: return K::template rows<2, 2>(n, w, a, as, out);
#if TANDEM_DOT_LEVEL >= 3
        case 3: return K::template rows<3, 2>(n, w, a, as, out);
        case 4: return K::template rows<4, 2>(n, w, a, as, out);
        case 5: return K::template rows<5, 2>(n, w, a, as, out);
        case 6: return K::template rows<6, 2>(n, w, a, as, out);
        case 7: return K::template rows<7, 2>(n, w, a, as, out);
        case 8: return K::template rows<8, 2>(n, w, a, as, out);
#endif
        default: return;
    }
}

// ---------------------------------------------------------------------------------------- 32-value blocks
// Each unpacker gives the block's 32 quants in element order: signed values for the symmetric types
// (kSigned), unsigned 0..31 for the _1 types, whose min m enters as m_w * s_a.

struct UnpackQ4_0 {
    using W = block_q4_0; using A = block_q8_0;
    static constexpr bool kSigned = true, kMin = false;
    TANDEM_INLINE static __m256i quants(const W& b) { return _mm256_sub_epi8(nibbles32(b.qs), _mm256_set1_epi8(8)); }
};

struct UnpackQ5_0 {
    using W = block_q5_0; using A = block_q8_0;
    static constexpr bool kSigned = true, kMin = false;
    // nibble | 0xF0 where the fifth bit is clear: as int8 that is q - 16.
    TANDEM_INLINE static __m256i quants(const W& b) {
        return _mm256_or_si256(nibbles32(b.qs), _mm256_andnot_si256(bits_to_bytes(b.qh), _mm256_set1_epi8(-16)));
    }
};

struct UnpackQ8_0 {
    using W = block_q8_0; using A = block_q8_0;
    static constexpr bool kSigned = true, kMin = false;
    TANDEM_INLINE static __m256i quants(const W& b) { return load256(b.qs); }
};

struct UnpackQ4_1 {
    using W = block_q4_1; using A = block_q8_1;
    static constexpr bool kSigned = false, kMin = true;
    TANDEM_INLINE static __m256i quants(const W& b) { return nibbles32(b.qs); }
};

struct UnpackQ5_1 {
    using W = block_q5_1; using A = block_q8_1;
    static constexpr bool kSigned = false, kMin = true;
    TANDEM_INLINE static __m256i quants(const W& b) {
        return _mm256_or_si256(nibbles32(b.qs), _mm256_and_si256(bits_to_bytes(b.qh), _mm256_set1_epi8(16)));
    }
};

#if TANDEM_DOT_LEVEL >= 4
// ---- One activation row (decode GEMV) for Q4_0 / Q5_0 / Q8_0, AVX-512 VNNI.
// The activation is prepared once per token tile (act_prep, below) into act_d, after its f32 scales:
//   d[nbp] f32 | qs[nbp][32] (Q8_0: a ^ 0x80, i.e. a + 128 as unsigned) | bias[nbp][8] int32 (Q4_0/Q5_0)
// with nbp = nb rounded up to 16 and zeros in the padding. Then each weight block pair is one zmm of
// unsigned quants against the prepared bytes, with no sign fix-up:
//   Q4_0 / Q5_0: w = n - off (n = 0..15 / 0..31), sum(w a) = dpbusd(-off * sum(a), n, a) per 4 values;
//   Q8_0: sum(w a) = sum((a + 128) w) - 128 sum(w), both by dpbusd.
// Per-lane int32 sums stay exact. The weight scales of 16 blocks are packed in scalar registers (a gather is slow on Zen 4), one vcvtph2ps, are
// multiplied by the activation scales once, and each pair takes its two by one permute.
// act_d is matmul_rows' stack buffer of kActBufFloats floats; rows too long for the layout use Blocks32.
constexpr int64_t kActBufFloats = int64_t{kMaxActRows} * 3 * 1024;  // = dot.cpp kMaxScaleFloats

template <class U> struct Gemv32Traits;  // off: the weight quant offset (0: Q8_0, signed quants)
template <> struct Gemv32Traits<UnpackQ4_0> { static constexpr int off = 8; };
template <> struct Gemv32Traits<UnpackQ5_0> { static constexpr int off = 16; };
template <> struct Gemv32Traits<UnpackQ8_0> { static constexpr int off = 0; };

template <class U>
struct Gemv32 {
    using W = typename U::W;
    static constexpr int kOff = Gemv32Traits<U>::off;
    static constexpr bool kBias = kOff != 0;

    static int64_t padded(int64_t nb) { return (nb + 15) & ~int64_t{15}; }
    static bool fits(int64_t nb) { return padded(nb) * (kBias ? 17 : 9) <= kActBufFloats; }
    // Short rows (MLA's 128-wide W_UK heads: 4 blocks) spend more on the 16-block scale group and the
    // final reduction than on the blocks: measured 2.5-4x slower than Blocks32 there, even at 16 blocks.
    static constexpr int64_t kMinBlocks = 32;
    static bool use(int64_t nb) { return nb >= kMinBlocks && fits(nb); }

    static void prep(const block_q8_0* y, int64_t nb, float* buf) {
        const int64_t nbp = padded(nb);
        auto* aq = reinterpret_cast<uint8_t*>(buf + nbp);
        auto* bias = reinterpret_cast<int32_t*>(buf + 9 * nbp);
        for (int64_t i = 0; i < nbp; ++i) {
            if (i >= nb) {
                buf[i] = 0.0f;
                std::memset(aq + 32 * i, 0, 32);
                if constexpr (kBias) std::memset(bias + 8 * i, 0, 32);
                continue;
            }
            buf[i] = f16(y[i].d);
            for (int l = 0; l < 32; ++l)
                aq[32 * i + l] = static_cast<uint8_t>(y[i].qs[l]) ^ (kBias ? 0 : 0x80);
            if constexpr (kBias)
                for (int l = 0; l < 8; ++l)
                    bias[8 * i + l] = -kOff * (y[i].qs[4 * l] + y[i].qs[4 * l + 1] + y[i].qs[4 * l + 2] + y[i].qs[4 * l + 3]);
        }
    }

    // Blocks b0, b1 (in element order, 256 bits each) against the prepared bytes: 16 int32 sums.
    TANDEM_INLINE static __m512i pair(const W& b0, const W& b1, const uint8_t* aq, const int32_t* bias) {
        const __m512i a = _mm512_loadu_si512(aq);
        if constexpr (!kBias) {
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(load256(b0.qs)), load256(b1.qs), 1);
            return _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), a, w),
                                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), w));
        } else {
            const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(load128(b0.qs))),
                                                 _mm256_broadcastsi128_si256(load128(b1.qs)), 1);
            // low nibbles in 128-bit lanes 0 and 2, high nibbles in 1 and 3
            const __m512i shifts = _mm512_setr_epi64(0, 0, 0x0004000400040004, 0x0004000400040004, 0, 0,
                                                     0x0004000400040004, 0x0004000400040004);
            __m512i q = _mm512_and_si512(_mm512_srlv_epi16(x, shifts), _mm512_set1_epi8(0x0F));
            if constexpr (kOff == 16) {
                uint32_t h0, h1;
                std::memcpy(&h0, b0.qh, 4);
                std::memcpy(&h1, b1.qh, 4);
                q = _mm512_mask_add_epi8(q, _cvtu64_mask64(h0 | static_cast<uint64_t>(h1) << 32), q,
                                         _mm512_set1_epi8(16));
            }
            return _mm512_dpbusd_epi32(_mm512_loadu_si512(bias), q, a);
        }
    }

    static void dot(int64_t n, const void* vw, const float* buf, float* out) {
        const auto* w = static_cast<const W*>(vw);
        const int64_t nb = n / QK8_0, nbp = padded(nb);
        const auto* aq = reinterpret_cast<const uint8_t*>(buf + nbp);
        const auto* bias = reinterpret_cast<const int32_t*>(buf + 9 * nbp);
        const __m512i lo8_hi8 = _mm512_mask_mov_epi32(_mm512_setzero_si512(), 0xFF00, _mm512_set1_epi32(1));
        __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t g = 0; g < nb; g += 16) {
            const int64_t m = nb - g < 16 ? nb - g : 16;
            // the 16 weight scales, packed on the (otherwise idle) scalar ports: 4 per 64-bit word
            uint64_t dq[4] = {0, 0, 0, 0};
            if (m == 16) {
                for (int t = 0; t < 16; ++t) dq[t / 4] |= static_cast<uint64_t>(w[g + t].d) << (16 * (t % 4));
            } else {
                for (int64_t t = 0; t < m; ++t) dq[t / 4] |= static_cast<uint64_t>(w[g + t].d) << (16 * (t % 4));
            }
            const __m256i dh = _mm256_set_epi64x(static_cast<long long>(dq[3]), static_cast<long long>(dq[2]),
                                                 static_cast<long long>(dq[1]), static_cast<long long>(dq[0]));
            const __m512 sc = _mm512_mul_ps(_mm512_cvtph_ps(dh), _mm512_loadu_ps(buf + g));
            auto step = [&](int j) {
                const int64_t i = g + 2 * j;
                const W& b1 = w[i + 1 < nb ? i + 1 : i];  // an odd last block pairs with itself (scale 0)
                const __m512i p = pair(w[i], b1, aq + 32 * i, bias + 8 * i);
                const __m512 s = _mm512_permutexvar_ps(_mm512_add_epi32(lo8_hi8, _mm512_set1_epi32(2 * j)), sc);
                acc[j & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc[j & 1]);
            };
            if (m == 16) {
                for (int j = 0; j < 8; ++j) step(j);
            } else {
                for (int j = 0; 2 * j < m; ++j) step(j);
            }
        }
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    }
};

// ---- 2..8 activation rows (prefill) for Q4_0 / Q5_0 / Q8_0, AVX-512 VNNI.
// Lanes are blocks: a group of 16 weight blocks is unpacked once into 8 vectors, vector k holding in
// int32 lane j the unsigned quants 4k..4k+3 of block j (n = w + off: Q4_0 8, Q5_0 16, Q8_0 128). The
// activation is prepared once per token tile (act_prep) in the same layout, per row and group:
//   d[16] f32 | bias[16] int32 (-off * sum of the block's quants) | qs[8][16 lanes][4] int8
// (zeros past nb), so each row takes 8 dpbusd into one vector of 16 exact block sums, seeded with its
// bias, then one convert and one fma against the 16 products d_w d_a.
template <class U>
struct Gemm32 {
    using W = typename U::W;
    static constexpr int kOff = std::is_same_v<U, UnpackQ8_0> ? 128 : Gemv32Traits<U>::off;
    static constexpr int64_t kGroupFloats = 16 + 16 + 128;

    static int64_t groups(int64_t nb) { return (nb + 15) / 16; }
    static bool fits(int n_act, int64_t nb) { return n_act * groups(nb) * kGroupFloats <= kActBufFloats; }
    // As for Gemv32: on short rows (MLA's 128-wide W_UK, 4 blocks) Blocks32 is ~1.3x faster.
    static constexpr int64_t kMinBlocks = 16;
    static bool use(int n_act, int64_t nb) { return nb >= kMinBlocks && fits(n_act, nb); }

    // 16 blocks with 32 quant bytes each -> t[k], int32 lane j = bytes 4k..4k+3 of block j.
    template <class B>
    TANDEM_INLINE static void transpose16(const B* const* b, __m512i* t) {
        // rows p = [block p, block p + 8], 8 dwords each
        __m512i y[8];
        for (int p = 0; p < 8; ++p)
            y[p] = _mm512_inserti64x4(_mm512_castsi256_si512(load256(b[p]->qs)), load256(b[p + 8]->qs), 1);
        transpose_halves(y, t);
    }

    // y[p] = [block p, block p + 8] (8 dwords each) -> t[k], int32 lane j = dword k of block j:
    // 8x8 dword transposes in each 256-bit half.
    TANDEM_INLINE static void transpose_halves(const __m512i* y, __m512i* t) {
        __m512i u[8];
        for (int h = 0; h < 8; h += 4) {
            const __m512i t0 = _mm512_unpacklo_epi32(y[h], y[h + 1]), t1 = _mm512_unpackhi_epi32(y[h], y[h + 1]);
            const __m512i t2 = _mm512_unpacklo_epi32(y[h + 2], y[h + 3]);
            const __m512i t3 = _mm512_unpackhi_epi32(y[h + 2], y[h + 3]);
            u[h] = _mm512_unpacklo_epi64(t0, t2);
            u[h + 1] = _mm512_unpackhi_epi64(t0, t2);
            u[h + 2] = _mm512_unpacklo_epi64(t1, t3);
            u[h + 3] = _mm512_unpackhi_epi64(t1, t3);
        }
        const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
        const __m512i hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
        for (int m = 0; m < 4; ++m) {
            t[m] = _mm512_permutex2var_epi64(u[m], lo, u[m + 4]);
            t[m + 4] = _mm512_permutex2var_epi64(u[m], hi, u[m + 4]);
        }
    }

    // The 16 f16 scales of blocks b[0..15], in f32.
    template <class B>
    TANDEM_INLINE static __m512 scales16(const B* const* b) {
        uint64_t dq[4] = {0, 0, 0, 0};  // packed on the scalar ports (a gather is slow)
        for (int t = 0; t < 16; ++t) dq[t / 4] |= static_cast<uint64_t>(b[t]->d) << (16 * (t % 4));
        return _mm512_cvtph_ps(_mm256_set_epi64x(static_cast<long long>(dq[3]), static_cast<long long>(dq[2]),
                                                 static_cast<long long>(dq[1]), static_cast<long long>(dq[0])));
    }

    static void prep(const void* act, size_t as, int n_act, int64_t nb, float* buf) {
        const int64_t ng = groups(nb);
        for (int r = 0; r < n_act; ++r) {
            const auto* y = act_row<block_q8_0>(act, as, r);
            for (int64_t g = 0; g < ng; ++g) {
                float* gb = buf + (r * ng + g) * kGroupFloats;
                const block_q8_0* b[16];
                for (int j = 0; j < 16; ++j) b[j] = y + (16 * g + j < nb ? 16 * g + j : nb - 1);
                const int64_t m = nb - 16 * g;
                const __mmask16 valid = m >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << m) - 1);
                __m512i t[8];
                transpose16(b, t);
                __m512i sum = _mm512_setzero_si512();
                for (int k = 0; k < 8; ++k) {
                    t[k] = _mm512_maskz_mov_epi32(valid, t[k]);
                    sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), t[k]);
                    _mm512_storeu_si512(gb + 32 + 16 * k, t[k]);
                }
                _mm512_storeu_ps(gb, _mm512_maskz_mov_ps(valid, scales16(b)));
                _mm512_storeu_si512(gb + 16, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-kOff)));
            }
        }
    }

    // Weight blocks g0 .. g0 + 15 (the last block repeated past nb) -> q[8] as above, and their 16 scales.
    TANDEM_INLINE static void unpack(const W* w, int64_t g0, int64_t nb, __m512i* q, __m512& dw) {
        const W* b[16];
        for (int j = 0; j < 16; ++j) b[j] = w + (g0 + j < nb ? g0 + j : nb - 1);
        dw = scales16(b);
        if constexpr (kOff == 128) {
            transpose16(b, q);
            const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
            for (int k = 0; k < 8; ++k) q[k] = _mm512_xor_si512(q[k], flip);
        } else {
            // z[c] = the qs of blocks c, c + 4, c + 8, c + 12; 4x4 dword transposes in each 128-bit lane
            __m512i z[4];
            for (int c = 0; c < 4; ++c) {
                z[c] = _mm512_castsi128_si512(load128(b[c]->qs));
                z[c] = _mm512_inserti32x4(z[c], load128(b[c + 4]->qs), 1);
                z[c] = _mm512_inserti32x4(z[c], load128(b[c + 8]->qs), 2);
                z[c] = _mm512_inserti32x4(z[c], load128(b[c + 12]->qs), 3);
            }
            const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
            const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
            const __m512i x[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                                  _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
            const __m512i nib = _mm512_set1_epi8(0x0F);
            for (int m = 0; m < 4; ++m) {  // low nibbles: quants 4m.., high: 16 + 4m.. = 4 (m + 4)..
                q[m] = _mm512_and_si512(x[m], nib);
                q[m + 4] = _mm512_and_si512(_mm512_srli_epi16(x[m], 4), nib);
            }
            if constexpr (kOff == 16) {
                // fifth bit of quant 4k + l: bit 4 (k & 1) + l of qh byte k >> 1
                alignas(64) uint32_t qh[16];
                for (int j = 0; j < 16; ++j) std::memcpy(qh + j, b[j]->qh, 4);
                const __m512i h = _mm512_load_si512(qh);
                const __m512i base = _mm512_broadcast_i32x4(_mm_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C));
                const __m512i sixteen = _mm512_set1_epi8(16);
                for (int k = 0; k < 8; ++k) {  // hb: qh byte k >> 1 in each of the lane's 4 bytes
                    const __m512i hb =
                        _mm512_shuffle_epi8(h, _mm512_add_epi8(base, _mm512_set1_epi8(static_cast<char>(k >> 1))));
                    const __m512i pat = _mm512_set1_epi32(k & 1 ? static_cast<int>(0x80402010u) : 0x08040201);
                    q[k] = _mm512_mask_add_epi8(q[k], _mm512_test_epi8_mask(hb, pat), q[k], sixteen);
                }
            }
        }
    }

    template <int NA>
    static void dot(int64_t n, const void* vw, const float* buf, float* out) {
        const auto* w = static_cast<const W*>(vw);
        const int64_t nb = n / QK8_0, ng = groups(nb);
        __m512 acc[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; ++g) {
            __m512i q[8];
            __m512 dw;
            unpack(w, 16 * g, nb, q, dw);
            for (int r = 0; r < NA; ++r) {
                const float* gb = buf + (r * ng + g) * kGroupFloats;
                const auto* aq = reinterpret_cast<const __m512i*>(gb + 32);
                const __m512i s = dpbusd8<NA>(_mm512_loadu_si512(gb + 16), q, aq);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_loadu_ps(gb)), acc[r]);
            }
        }
        for (int r = 0; r < NA; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    }
};

#endif

// act_d, when given: the activation block scales already in f32 (ScaledDotKernel, dot_kernels.h), which
// saves the f16 conversion of d_a (and s_a) for every weight row.
template <class U>
struct Blocks32 {
    template <int NA>
    static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        body<NA, false>(n, vw, va, as, nullptr, out);
    }
    template <int NA>
    static void run_f32_scales(int64_t n, const void* vw, const void* va, size_t as, const float* act_d, float* out) {
#if TANDEM_DOT_LEVEL >= 4
        if constexpr (NA == 1 && !U::kMin) {  // act_d as act_prep left it
            if (Gemv32<U>::use(n / QK8_0)) return Gemv32<U>::dot(n, vw, act_d, out);
        } else if constexpr (!U::kMin) {
            if (Gemm32<U>::use(NA, n / QK8_0)) return Gemm32<U>::template dot<NA>(n, vw, act_d, out);
        }
#endif
        body<NA, true>(n, vw, va, as, act_d, out);
    }

    // Block i against the NA activation rows, into 8-lane accumulators (and the scalar m_w s_a sums).
    template <int NA, bool kF32Scales>
    TANDEM_INLINE static void block(const typename U::W& b, int64_t i, int64_t nb, const void* va, size_t as,
                                    const float* act_d, __m256* acc, float* accm) {
        using A = typename U::A;
        constexpr int kS = U::kMin ? 2 : 1;  // floats per block in act_d: d (and s)
        const __m256i q = U::quants(b);
        const __m256i u = U::kSigned ? _mm256_sign_epi8(q, q) : q;  // |w| for the signed types
        const __m256 dw = _mm256_set1_ps(f16(b.d));
        for (int r = 0; r < NA; ++r) {
            const A& y = act_row<A>(va, as, r)[i];
            const float* yd = act_d + (r * nb + i) * kS;
            __m256i yq = load256(y.qs);
            if (U::kSigned) yq = _mm256_sign_epi8(yq, q);  // a * sign(w): |w| * that = w * a
            const __m256i p = dot_u8s8(u, yq);
            const __m256 dy = _mm256_set1_ps(kF32Scales ? yd[0] : f16(y.d));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, dy), acc[r]);
            if constexpr (U::kMin) accm[r] += f16(b.m) * (kF32Scales ? yd[1] : f16(y.s));
        }
    }

#if TANDEM_DOT_LEVEL >= 3
    // AVX-512: two blocks per 512-bit vector; scales as [block i x 8 lanes, block i+1 x 8 lanes].
    template <int NA, bool kF32Scales>
    TANDEM_INLINE static void body(int64_t n, const void* vw, const void* va, size_t as, const float* act_d,
                                   float* out) {
        using A = typename U::A;
        constexpr int kS = U::kMin ? 2 : 1;
        const auto* w = static_cast<const typename U::W*>(vw);
        const int64_t nb = n / QK8_0;
        const __m512i lo8_hi8 = _mm512_mask_mov_epi32(_mm512_setzero_si512(), 0xFF00, _mm512_set1_epi32(1));
        // where the two blocks' d sit in the activation scales: [d0, d1] or [d0, s0, d1, s1]
        const __m512i act_idx = kS == 2 ? _mm512_slli_epi32(lo8_hi8, 1) : lo8_hi8;
        __m512 acc[NA];
        __m128 accm[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm512_setzero_ps(), accm[r] = _mm_setzero_ps();
        int64_t i = 0;
        for (; i + 2 <= nb; i += 2) {
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(U::quants(w[i])), U::quants(w[i + 1]), 1);
            const __m512i u = U::kSigned ? _mm512_abs_epi8(q) : q;
            const __mmask64 neg = U::kSigned ? _mm512_movepi8_mask(q) : 0;
            const __m512 dw = _mm512_permutexvar_ps(
                lo8_hi8, _mm512_castps128_ps512(_mm_cvtph_ps(pack_halves(w[i].d, w[i + 1].d))));
            __m128 m = _mm_setzero_ps();  // [0, m0, 0, m1], against [d0, s0, d1, s1]
            if constexpr (U::kMin) m = _mm_cvtph_ps(_mm_setr_epi16(0, w[i].m, 0, w[i + 1].m, 0, 0, 0, 0));
            for (int r = 0; r < NA; ++r) {
                const A* y = act_row<A>(va, as, r) + i;
                __m512i yq = _mm512_inserti64x4(_mm512_castsi256_si512(load256(y[0].qs)), load256(y[1].qs), 1);
                if (U::kSigned) yq = _mm512_mask_sub_epi8(yq, neg, _mm512_setzero_si512(), yq);
                const __m512i p = dot_u8s8_512(u, yq);
                __m128 ys;
                if constexpr (kF32Scales && kS == 2) {
                    ys = _mm_loadu_ps(act_d + (r * nb + i) * 2);
                } else if constexpr (kF32Scales) {
                    ys = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(act_d + r * nb + i)));
                } else if constexpr (kS == 2) {
                    ys = _mm_cvtph_ps(_mm_setr_epi16(y[0].d, y[0].s, y[1].d, y[1].s, 0, 0, 0, 0));
                } else {
                    ys = _mm_cvtph_ps(pack_halves(y[0].d, y[1].d));
                }
                const __m512 scale = _mm512_mul_ps(dw, _mm512_permutexvar_ps(act_idx, _mm512_castps128_ps512(ys)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[r]);
                if constexpr (U::kMin) accm[r] = _mm_fmadd_ps(m, ys, accm[r]);
            }
        }
        __m256 tail[NA];
        float tailm[NA];
        for (int r = 0; r < NA; ++r) tail[r] = _mm256_setzero_ps(), tailm[r] = 0.0f;
        if (i < nb) block<NA, kF32Scales>(w[i], i, nb, va, as, act_d, tail, tailm);
        for (int r = 0; r < NA; ++r) {
            const __m128 m2 = _mm_add_ps(accm[r], _mm_movehl_ps(accm[r], accm[r]));
            out[r] = _mm512_reduce_add_ps(acc[r]) + hsum(tail[r]) + _mm_cvtss_f32(_mm_add_ss(m2, _mm_movehdup_ps(m2))) +
                     tailm[r];
        }
    }
#else
    template <int NA, bool kF32Scales>
    TANDEM_INLINE static void body(int64_t n, const void* vw, const void* va, size_t as, const float* act_d,
                                   float* out) {
        const auto* w = static_cast<const typename U::W*>(vw);
        const int64_t nb = n / QK8_0;
        __m256 acc[NA];
        float accm[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm256_setzero_ps(), accm[r] = 0.0f;
        for (int64_t i = 0; i < nb; ++i) block<NA, kF32Scales>(w[i], i, nb, va, as, act_d, acc, accm);
        for (int r = 0; r < NA; ++r) out[r] = hsum(acc[r]) + accm[r];
    }
#endif
};

template <class K>
void by_rows_f32_scales(int64_t n, const void* w, const void* a, size_t as, const float* act_d, int n_act,
                        float* out) {
    switch (n_act) {
        case 1: K::template run_f32_scales<1>(n, w, a, as, act_d, out); break;
        case 2: K::template run_f32_scales<2>(n, w, a, as, act_d, out); break;
        case 3: K::template run_f32_scales<3>(n, w, a, as, act_d, out); break;
        case 4: K::template run_f32_scales<4>(n, w, a, as, act_d, out); break;
        case 5: K::template run_f32_scales<5>(n, w, a, as, act_d, out); break;
        case 6: K::template run_f32_scales<6>(n, w, a, as, act_d, out); break;
        case 7: K::template run_f32_scales<7>(n, w, a, as, act_d, out); break;
        case 8: K::template run_f32_scales<8>(n, w, a, as, act_d, out); break;
        default: break;
    }
}

// Q8_0 rows -> d as f32 [n_act][nb]; Q8_1 rows -> (d, s) [n_act][nb][2].
template <class A>
void act_scales_f32(const void* act, size_t as, int n_act, int64_t nb, float* out) {
    for (int r = 0; r < n_act; ++r) {
        const A* y = act_row<A>(act, as, r);
        for (int64_t i = 0; i < nb; ++i) {
            if constexpr (std::is_same_v<A, block_q8_1>) {
                *out++ = f16(y[i].d);
                *out++ = f16(y[i].s);
            } else {
                *out++ = f16(y[i].d);
            }
        }
    }
}

#if TANDEM_DOT_LEVEL >= 4
template <class U>
void act_prep(const void* act, size_t as, int n_act, int64_t nb, float* out) {
    if (n_act == 1 && Gemv32<U>::use(nb))
        Gemv32<U>::prep(static_cast<const block_q8_0*>(act), nb, out);
    else if (n_act >= 2 && Gemm32<U>::use(n_act, nb))
        Gemm32<U>::prep(act, as, n_act, nb, out);
    else
        act_scales_f32<block_q8_0>(act, as, n_act, nb, out);
}
#endif

// ---------------------------------------------------------------------------------------- K-quants

// Q4_K/Q5_K 6-bit scales and mins: 12 packed bytes -> 16 bytes sc[0..7], m[0..7].
TANDEM_INLINE __m128i unpack_scales_mins(const uint8_t* packed) {
    uint32_t u[3], s[4];
    std::memcpy(u, packed, 12);
    s[0] = u[0] & 0x3F3F3F3Fu;                                                 // sc 0..3
    s[1] = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);       // sc 4..7
    s[2] = u[1] & 0x3F3F3F3Fu;                                                 // m 0..3
    s[3] = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4); // m 4..7
    return load128(s);
}

// Each min twice as int16, to pair with bsums[2k], bsums[2k+1] (sub-block k = 2 bsums groups).
TANDEM_INLINE __m256i mins_for_bsums(__m128i scales_mins) {
    return _mm256_cvtepu8_epi16(
        _mm_shuffle_epi8(scales_mins, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15)));
}

#if TANDEM_DOT_LEVEL >= 3
// ---- AVX-512: 64 values (two 32-value sub-blocks, or four 16-value Q6_K groups) per vector.

// Sum of int16 pair products of p (maddubs output) with the scales, accumulated into int32.
TANDEM_INLINE __m512i add_scaled(__m512i acc, __m512i p, __m512i scales) {
#if TANDEM_DOT_LEVEL >= 4
    return _mm512_dpwssd_epi32(acc, p, scales);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, scales));
#endif
}

// int16 lanes: 16 x word 2j of the source, then 16 x word 2j+1 (a pair of sub-block scales).
TANDEM_INLINE __m512i pair_index(int j) {
    return _mm512_mask_mov_epi16(_mm512_set1_epi16(static_cast<short>(2 * j)), 0xFFFF0000u,
                                 _mm512_set1_epi16(static_cast<short>(2 * j + 1)));
}

// Chunk j of Q4_K/Q5_K quants: the 32 bytes' low nibbles (sub-block 2j), then their high nibbles.
TANDEM_INLINE __m512i nibbles64(const uint8_t* qs) {
    const __m512i raw = _mm512_broadcast_i64x4(load256(qs));
    return _mm512_and_si512(_mm512_mask_srli_epi16(raw, 0xFFFF0000u, raw, 4), _mm512_set1_epi8(0x0F));
}

template <bool kFifthBit>
struct QxK {  // Q4_K (kFifthBit false) and Q5_K
    using W = std::conditional_t<kFifthBit, block_q5_K, block_q4_K>;
    template <int NA>
    static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        const auto* w = static_cast<const W*>(vw);
        const int64_t nb = n / QK_K;
        __m512 acc[NA];
        __m256 accm[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm512_setzero_ps(), accm[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < nb; ++i) {
            const W& x = w[i];
            const __m128i sm = unpack_scales_mins(x.scales);
            const __m512i sm16 = _mm512_zextsi256_si512(_mm256_cvtepu8_epi16(sm));
            const __m256i mins = mins_for_bsums(sm);
            __m512i q[4], sc[4];
            for (int j = 0; j < 4; ++j) {
                q[j] = nibbles64(x.qs + 32 * j);
                sc[j] = _mm512_permutexvar_epi16(pair_index(j), sm16);
            }
            if constexpr (kFifthBit) {
                const __m512i qh = _mm512_broadcast_i64x4(load256(x.qh));
                const __m512i bit = _mm512_mask_mov_epi8(_mm512_set1_epi8(1), 0xFFFFFFFF00000000ull, _mm512_set1_epi8(2));
                for (int j = 0; j < 4; ++j) {  // sub-block 2j uses bit 2j of qh, 2j+1 bit 2j+1
                    const __mmask64 hi = _mm512_test_epi8_mask(qh, _mm512_slli_epi16(bit, 2 * j));
                    q[j] = _mm512_mask_add_epi8(q[j], hi, q[j], _mm512_set1_epi8(16));
                }
            }
            const __m512 d = _mm512_set1_ps(f16(x.d));
            const __m256 mdmin = _mm256_set1_ps(-f16(x.dmin));
            for (int r = 0; r < NA; ++r) {
                const block_q8_K& y = act_row<block_q8_K>(va, as, r)[i];
                __m512i sumi = _mm512_setzero_si512();
                for (int j = 0; j < 4; ++j)
                    sumi = add_scaled(sumi, _mm512_maddubs_epi16(q[j], _mm512_loadu_si512(y.qs + 64 * j)), sc[j]);
                const __m256i summ = _mm256_madd_epi16(load256(y.bsums), mins);
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(y.d)), _mm512_cvtepi32_ps(sumi), acc[r]);
                accm[r] = _mm256_fmadd_ps(_mm256_mul_ps(mdmin, _mm256_set1_ps(y.d)), _mm256_cvtepi32_ps(summ), accm[r]);
            }
        }
        for (int r = 0; r < NA; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + hsum(accm[r]);
    }
};

struct Q6K {
    template <int NA>
    static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        const auto* w = static_cast<const block_q6_K*>(vw);
        const int64_t nb = n / QK_K;
        const __m512i m4 = _mm512_set1_epi8(0x0F), m3 = _mm512_set1_epi8(3), m32 = _mm512_set1_epi8(32);
        // qh bits for the low / high 32 bytes: 0-1 / 2-3 (values 0..63 of a half), 4-5 / 6-7 (64..127)
        const __m512i shift_a = _mm512_mask_mov_epi16(_mm512_setzero_si512(), 0xFFFF0000u, _mm512_set1_epi16(2));
        const __m512i shift_b = _mm512_mask_mov_epi16(_mm512_set1_epi16(4), 0xFFFF0000u, _mm512_set1_epi16(6));
        __m512 acc[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < nb; ++i) {
            const block_q6_K& x = w[i];
            const __m256i s16 = _mm256_cvtepi8_epi16(load128(x.scales));  // group scales, int16
            const __m512i s512 = _mm512_zextsi256_si512(s16);
            __m512i q[4], sc[4];
            for (int h = 0; h < 2; ++h) {
                const __m512i l = _mm512_loadu_si512(x.ql + 64 * h);
                const __m512i qh = _mm512_broadcast_i64x4(load256(x.qh + 32 * h));
                const __m512i ha = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_a), m3), 4);
                const __m512i hb = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_b), m3), 4);
                q[2 * h] = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(l, m4), ha), m32);
                q[2 * h + 1] = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4), hb), m32);
            }
            __m512i u[4];
            __mmask64 neg[4];
            for (int j = 0; j < 4; ++j) u[j] = _mm512_abs_epi8(q[j]), neg[j] = _mm512_movepi8_mask(q[j]);
            for (int j = 0; j < 4; ++j) {  // vector j covers groups 4j..4j+3, 8 int16 lanes each
                const __m512i idx = _mm512_add_epi16(_mm512_set1_epi16(static_cast<short>(4 * j)),
                                                     _mm512_srli_epi16(_mm512_set_epi16(
                                                         31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                         15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3));
                sc[j] = _mm512_permutexvar_epi16(idx, s512);
            }
            const __m512 d = _mm512_set1_ps(f16(x.d));
            for (int r = 0; r < NA; ++r) {
                const block_q8_K& y = act_row<block_q8_K>(va, as, r)[i];
                __m512i sumi = _mm512_setzero_si512();
                for (int j = 0; j < 4; ++j) {  // |q - 32| x (a with the sign of q - 32)
                    const __m512i a = _mm512_loadu_si512(y.qs + 64 * j);
                    const __m512i sa = _mm512_mask_sub_epi8(a, neg[j], _mm512_setzero_si512(), a);
                    sumi = add_scaled(sumi, _mm512_maddubs_epi16(u[j], sa), sc[j]);
                }
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(y.d)), _mm512_cvtepi32_ps(sumi), acc[r]);
            }
        }
        for (int r = 0; r < NA; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    }
};

#if TANDEM_DOT_LEVEL >= 4
// ---- 2..8 activation rows (prefill) for Q4_K, AVX-512 VNNI: Gemm32's scheme with sub-blocks as lanes.
// A group is two super-blocks A, B (16 sub-blocks); int32 lane j holds sub-block 2c of super-block
// j / 4 (j < 8, c = j % 4) or sub-block 2c + 1 of super-block (j - 8) / 4 (j >= 8, c = j % 4): the low
// and high nibbles of quant chunk c, so each weight chunk is one nibbles64 and the group one
// transpose_halves into q[8] (vector k: quants 4k..4k+3 of each lane's sub-block, unsigned 0..15).
// The activation is prepared once per token tile (act_prep) in the same lane order, per row and group:
//   d[16] f32 (the lane's Q8_K d) | bsum[16] f32 (d x sum of the sub-block's quants) | qs[8][16][4] int8
// (zeros for a missing B). Each row takes 8 dpbusd into 16 exact sub-block sums, then one fma with
// d_w sc_j d_a and one with -dmin_w m_j against the prepared d_a bsum_j.
struct GemmQ4K {
    using W = block_q4_K;
    static constexpr int64_t kGroupFloats = 16 + 16 + 128;

    static int64_t groups(int64_t nsb) { return (nsb + 1) / 2; }
    static bool fits(int n_act, int64_t nsb) { return n_act * groups(nsb) * kGroupFloats <= kActBufFloats; }

    static void prep(const void* act, size_t as, int n_act, int64_t nsb, float* buf) {
        const int64_t ng = groups(nsb);
        for (int r = 0; r < n_act; ++r) {
            const auto* y = act_row<block_q8_K>(act, as, r);
            for (int64_t g = 0; g < ng; ++g) {
                float* gb = buf + (r * ng + g) * kGroupFloats;
                const bool has_b = 2 * g + 1 < nsb;
                const block_q8_K& ya = y[2 * g];
                const block_q8_K& yb = y[has_b ? 2 * g + 1 : 2 * g];
                __m512i v[8], t[8];
                for (int p = 0; p < 8; ++p) {
                    const block_q8_K& s = p < 4 ? ya : yb;
                    v[p] = p < 4 || has_b ? _mm512_loadu_si512(s.qs + 64 * (p % 4)) : _mm512_setzero_si512();
                }
                Gemm32<UnpackQ4_0>::transpose_halves(v, t);
                __m512i sum = _mm512_setzero_si512();
                for (int k = 0; k < 8; ++k) {
                    sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), t[k]);
                    _mm512_storeu_si512(gb + 32 + 16 * k, t[k]);
                }
                const __m512 da = _mm512_mask_mov_ps(_mm512_set1_ps(ya.d), 0xF0F0, _mm512_set1_ps(has_b ? yb.d : 0.0f));
                _mm512_storeu_ps(gb, da);
                _mm512_storeu_ps(gb + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), da));
            }
        }
    }

    // Super-blocks A = w[2g], B = w[2g + 1] (A again past the end) -> q[8], d_w sc_j and -dmin_w m_j per lane.
    TANDEM_INLINE static void unpack(const W& a, const W& b, __m512i* q, __m512& wsc, __m512& wmin) {
        __m512i v[8];
        for (int p = 0; p < 8; ++p) v[p] = nibbles64((p < 4 ? a : b).qs + 32 * (p % 4));
        Gemm32<UnpackQ4_0>::transpose_halves(v, q);
        // bytes per super-block: sc even, sc odd, m even, m odd (dwords 0..3); lanes want
        // sc: A even, B even, A odd, B odd; m likewise
        const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
        const __m256i sm = _mm256_set_m128i(_mm_shuffle_epi8(unpack_scales_mins(b.scales), even_odd),
                                            _mm_shuffle_epi8(unpack_scales_mins(a.scales), even_odd));
        const __m256i lanes = _mm256_permutevar8x32_epi32(sm, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lanes)));
        const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lanes, 1)));
        const __m512 dd = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_setr_epi16(
            static_cast<short>(a.d), static_cast<short>(b.d), static_cast<short>(a.dmin), static_cast<short>(b.dmin), 0,
            0, 0, 0)));
        const __m512i ab = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
        wsc = _mm512_mul_ps(_mm512_permutexvar_ps(ab, dd), sc);
        wmin = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_add_epi32(ab, _mm512_set1_epi32(2)), dd),
                             _mm512_sub_ps(_mm512_setzero_ps(), m));
    }

    template <int NA>
    static void dot(int64_t n, const void* vw, const float* buf, float* out) {
        const auto* w = static_cast<const W*>(vw);
        const int64_t nsb = n / QK_K, ng = groups(nsb);
        __m512 acc[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; ++g) {
            __m512i q[8];
            __m512 wsc, wmin;
            unpack(w[2 * g], w[2 * g + 1 < nsb ? 2 * g + 1 : 2 * g], q, wsc, wmin);
            for (int r = 0; r < NA; ++r) {
                const float* gb = buf + (r * ng + g) * kGroupFloats;
                const auto* aq = reinterpret_cast<const __m512i*>(gb + 32);
                const __m512i s = dpbusd8<NA>(_mm512_setzero_si512(), q, aq);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(wsc, _mm512_loadu_ps(gb)), acc[r]);
                acc[r] = _mm512_fmadd_ps(wmin, _mm512_loadu_ps(gb + 16), acc[r]);
            }
        }
        for (int r = 0; r < NA; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    }

    // ScaledDotKernel entry points: nb counts 32-value blocks (matmul_rows' unit), 8 per super-block.
    static void act_prep(const void* act, size_t as, int n_act, int64_t nb, float* out) {
        if (n_act >= 2 && fits(n_act, nb / 8)) prep(act, as, n_act, nb / 8, out);
    }

    template <int NA>
    static void run_f32_scales(int64_t n, const void* w, const void* a, size_t as, const float* act_d, float* out) {
        if constexpr (NA >= 2) {
            if (fits(NA, n / QK_K)) return dot<NA>(n, w, act_d, out);
        }
        QxK<false>::run<NA>(n, w, a, as, out);
    }
};
#endif

#else
// ---- AVX2: one 32-value sub-block per vector.

template <bool kFifthBit>
struct QxK {  // Q4_K (kFifthBit false) and Q5_K
    using W = std::conditional_t<kFifthBit, block_q5_K, block_q4_K>;
    template <int NA>
    static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        const auto* w = static_cast<const W*>(vw);
        const int64_t nb = n / QK_K;
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        __m256 acc[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < nb; ++i) {
            const W& x = w[i];
            const __m128i sm = unpack_scales_mins(x.scales);
            const __m256i s16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));  // sc 0..7 in each lane
            const __m256i mins = mins_for_bsums(sm);
            __m256i q[8], sc[8];
            for (int k = 0; k < 8; ++k)
                sc[k] = _mm256_shuffle_epi8(s16, _mm256_set1_epi16(static_cast<short>(0x0100 + 0x0202 * k)));
            for (int j = 0; j < 4; ++j) {
                const __m256i raw = load256(x.qs + 32 * j);
                q[2 * j] = _mm256_and_si256(raw, m4);
                q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            }
            if constexpr (kFifthBit) {
                const __m256i qh = load256(x.qh);
                for (int k = 0; k < 8; ++k) {  // bit k of qh[l] -> bit 4 of value l of sub-block k
                    const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, k), _mm256_set1_epi8(1));
                    q[k] = _mm256_or_si256(q[k], _mm256_slli_epi16(hb, 4));
                }
            }
            const float d = f16(x.d), mdmin = -f16(x.dmin);
            for (int r = 0; r < NA; ++r) {
                const block_q8_K& y = act_row<block_q8_K>(va, as, r)[i];
                __m256i sumi = _mm256_setzero_si256();
                for (int k = 0; k < 8; ++k)
                    sumi = _mm256_add_epi32(
                        sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], load256(y.qs + 32 * k)), sc[k]));
                const __m256i summ = _mm256_madd_epi16(load256(y.bsums), mins);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(mdmin * y.d), _mm256_cvtepi32_ps(summ), acc[r]);
            }
        }
        for (int r = 0; r < NA; ++r) out[r] = hsum(acc[r]);
    }
};

struct Q6K {
    template <int NA>
    static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        const auto* w = static_cast<const block_q6_K*>(vw);
        const int64_t nb = n / QK_K;
        const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
        __m256 acc[NA];
        for (int r = 0; r < NA; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < nb; ++i) {
            const block_q6_K& x = w[i];
            const __m256i s16 = _mm256_cvtepi8_epi16(load128(x.scales));  // group scales, int16
            __m256i q[8], u[8], sc[8];
            for (int h = 0; h < 2; ++h) {
                const __m256i l0 = load256(x.ql + 64 * h), l1 = load256(x.ql + 64 * h + 32);
                const __m256i qh = load256(x.qh + 32 * h);
                auto high = [&](int shift) {
                    return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, shift), m3), 4);
                };
                q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), high(0));
                q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), high(2));
                q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), high(4));
                q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), high(6));
                for (int c = 4 * h; c < 4 * h + 4; ++c) {
                    q[c] = _mm256_sub_epi8(q[c], _mm256_set1_epi8(32));
                    u[c] = _mm256_sign_epi8(q[c], q[c]);
                }
                // chunk c = 4h + cc holds groups 2c, 2c+1: words 2cc, 2cc+1 of 128-bit half h
                const __m256i half = _mm256_permute2x128_si256(s16, s16, h ? 0x11 : 0x00);
                for (int cc = 0; cc < 4; ++cc) {
                    const short lo = static_cast<short>(0x0100 + 0x0202 * (2 * cc));
                    const short hi = static_cast<short>(0x0100 + 0x0202 * (2 * cc + 1));
                    sc[4 * h + cc] = _mm256_shuffle_epi8(half, _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo)));
                }
            }
            const float d = f16(x.d);
            for (int r = 0; r < NA; ++r) {
                const block_q8_K& y = act_row<block_q8_K>(va, as, r)[i];
                __m256i sumi = _mm256_setzero_si256();
                for (int c = 0; c < 8; ++c) {  // |q - 32| x (a with the sign of q - 32)
                    const __m256i p = _mm256_maddubs_epi16(u[c], _mm256_sign_epi8(load256(y.qs + 32 * c), q[c]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc[c]));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
        for (int r = 0; r < NA; ++r) out[r] = hsum(acc[r]);
    }
};
#endif

// ---------------------------------------------------------------------------------------- F32 / F16 / BF16
// The float vector's operations (Lanes: the activation quantizers' load, max and hmax on it), and Cvt: 8 (AVX2)
// or 16 (AVX-512) values of the stored type -> f32, optionally masked for the tail.

#if TANDEM_DOT_LEVEL >= 3
using VecF = __m512;
constexpr int kLanes = 16;
TANDEM_INLINE VecF fzero() { return _mm512_setzero_ps(); }
TANDEM_INLINE VecF fmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
TANDEM_INLINE VecF fadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
TANDEM_INLINE float fsum(VecF v) { return _mm512_reduce_add_ps(v); }
// Lane i = fsum(v[i]) for 16 vectors at once, by the same tree of additions as _mm512_reduce_add_ps (so the
// same floats): 256-bit halves, 128-bit halves, then pairs within 128 bits; 36 instructions against ~80.
TANDEM_INLINE VecF fsum16(const VecF* v) {
    VecF w[8], x[4], y[2];
    for (int i = 0; i < 8; ++i)  // 128-bit lanes (v_i: 0+2, 1+3; v_i+8: 0+2, 1+3)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; ++i)  // 128-bit lanes: v_i, v_i+8, v_i+4, v_i+12, each summed over its four
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
    for (int i = 0; i < 2; ++i)
        y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[i], x[i + 2]), _mm512_unpackhi_ps(x[i], x[i + 2]));
    const VecF z = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
    return _mm512_shuffle_f32x4(z, z, 0xD8);  // 128-bit lanes held v0-3, v8-11, v4-7, v12-15
}
// out[k][r] = fsum(acc(k, r)) for NW x NA = 16 accumulators (MLA's attention scores, 2 cache rows x 8 query
// rows: 4-7% off the whole attention call at 1 token, 16 heads, f32 and bf16 caches; the same floats).
template <int NA, int NW, class Acc>
TANDEM_INLINE void out_sums16(Acc acc, float* const* out) {
    static_assert(NA * NW == 16);
    VecF v[16];
    for (int k = 0; k < NW; ++k)
        for (int r = 0; r < NA; ++r) v[k * NA + r] = acc(k, r);
    alignas(64) float t[16];
    _mm512_store_ps(t, fsum16(v));
    for (int k = 0; k < NW; ++k)
        for (int r = 0; r < NA; ++r) out[k][r] = t[k * NA + r];
}
// y[r * ys + k] = fsum(acc[k][r]) for NW x NA accumulators (attention's score tiles), 16 at once through fsum16
template <int NW, int NA>
TANDEM_INLINE void store_sums(const VecF (&acc)[NW][NA], float* y, size_t ys) {
    if constexpr (NW * NA == 16) {
        VecF v[16];
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) v[k * NA + r] = acc[k][r];
        alignas(64) float t[16];
        _mm512_store_ps(t, fsum16(v));
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) y[r * ys + k] = t[k * NA + r];
    } else {
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) y[r * ys + k] = fsum(acc[k][r]);
    }
}
using Lanes = Lanes16;
TANDEM_INLINE VecF fset1(float v) { return _mm512_set1_ps(v); }
TANDEM_INLINE VecF fmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
TANDEM_INLINE VecF fsub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
TANDEM_INLINE VecF vmin(VecF a, VecF b) { return _mm512_min_ps(a, b); }
TANDEM_INLINE void fstoreu(float* p, VecF v) { _mm512_storeu_ps(p, v); }
TANDEM_INLINE VecF fround(VecF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
TANDEM_INLINE VecF fpow2(VecF n) {  // 2^n for whole n in [-126, 127], built in the exponent bits
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
TANDEM_INLINE VecF fround_f16(VecF v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
TANDEM_INLINE VecF fround_bf16(VecF v) {  // float_to_bf16's rounding (NaN kept, quiet)
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), x, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
struct CvtF32 {
    using T = float;
    TANDEM_INLINE static VecF load(const float* p) { return _mm512_loadu_ps(p); }
    TANDEM_INLINE static VecF load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct CvtF16 {
    using T = uint16_t;
    TANDEM_INLINE static VecF load(const uint16_t* p) { return _mm512_cvtph_ps(load256(p)); }
    TANDEM_INLINE static VecF load(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};
struct CvtBF16 {
    using T = uint16_t;
    TANDEM_INLINE static VecF widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    TANDEM_INLINE static VecF load(const uint16_t* p) { return widen(load256(p)); }
    TANDEM_INLINE static VecF load(const uint16_t* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};
#else
using VecF = __m256;
constexpr int kLanes = 8;
TANDEM_INLINE VecF fzero() { return _mm256_setzero_ps(); }
TANDEM_INLINE VecF fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
TANDEM_INLINE VecF fadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
TANDEM_INLINE float fsum(VecF v) { return hsum(v); }
using Lanes = Lanes8;
TANDEM_INLINE VecF fset1(float v) { return _mm256_set1_ps(v); }
TANDEM_INLINE VecF fmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
TANDEM_INLINE VecF fsub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
TANDEM_INLINE VecF vmin(VecF a, VecF b) { return _mm256_min_ps(a, b); }
TANDEM_INLINE void fstoreu(float* p, VecF v) { _mm256_storeu_ps(p, v); }
TANDEM_INLINE VecF fround(VecF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
TANDEM_INLINE VecF fpow2(VecF n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
TANDEM_INLINE VecF fround_f16(VecF v) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
TANDEM_INLINE VecF fround_bf16(VecF v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i kept = _mm256_blendv_epi8(r, _mm256_or_si256(x, _mm256_set1_epi32(0x400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(kept, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
struct CvtF32 {
    using T = float;
    TANDEM_INLINE static VecF load(const float* p) { return _mm256_loadu_ps(p); }
    TANDEM_INLINE static float scalar(float v) { return v; }
};
struct CvtF16 {
    using T = uint16_t;
    TANDEM_INLINE static VecF load(const uint16_t* p) { return _mm256_cvtph_ps(load128(p)); }
    TANDEM_INLINE static float scalar(uint16_t v) { return f16(v); }
};
struct CvtBF16 {
    using T = uint16_t;
    TANDEM_INLINE static VecF load(const uint16_t* p) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
    }
    TANDEM_INLINE static float scalar(uint16_t v) { return bf16_to_float(v); }
};
#endif

// NW weight rows (1, or 2 read side by side in decode: dot_kernel2) against NA activation rows.
template <class C>
struct Floats {
    template <int NA, int NW>
    static void rows(int64_t n, const void* const* vw, const void* va, size_t as, float* const* out) {
        using T = typename C::T;
        constexpr int U = NA * NW == 1 ? 4 : NA * NW == 2 ? 2 : 1;  // independent accumulators per row pair
        const T* w[NW];
        for (int k = 0; k < NW; ++k) w[k] = static_cast<const T*>(vw[k]);
        VecF acc[NW][NA][U];
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r)
                for (int u = 0; u < U; ++u) acc[k][r][u] = fzero();
        int64_t i = 0;
        for (; i + U * kLanes <= n; i += U * kLanes)
            for (int u = 0; u < U; ++u) {
                VecF wv[NW];
                for (int k = 0; k < NW; ++k) wv[k] = C::load(w[k] + i + u * kLanes);
                for (int r = 0; r < NA; ++r) {
                    const VecF av = C::load(act_row<T>(va, as, r) + i + u * kLanes);
                    for (int k = 0; k < NW; ++k) acc[k][r][u] = fmadd(wv[k], av, acc[k][r][u]);
                }
            }
        for (; i + kLanes <= n; i += kLanes)
            for (int r = 0; r < NA; ++r) {
                const VecF av = C::load(act_row<T>(va, as, r) + i);
                for (int k = 0; k < NW; ++k) acc[k][r][0] = fmadd(C::load(w[k] + i), av, acc[k][r][0]);
            }
#if TANDEM_DOT_LEVEL >= 3
        if (i < n) {
            const auto m = static_cast<__mmask16>((1u << (n - i)) - 1);  // n - i < 16
            for (int r = 0; r < NA; ++r) {
                const VecF av = C::load(act_row<T>(va, as, r) + i, m);
                for (int k = 0; k < NW; ++k) acc[k][r][0] = fmadd(C::load(w[k] + i, m), av, acc[k][r][0]);
            }
        }
        if constexpr (NA * NW == 16 && U == 1) {
            out_sums16<NA, NW>([&](int k, int r) { return acc[k][r][0]; }, out);
            return;
        }
#endif
        for (int k = 0; k < NW; ++k)
            for (int r = 0; r < NA; ++r) {
                VecF s = acc[k][r][0];
                for (int u = 1; u < U; ++u) s = fadd(s, acc[k][r][u]);
                float total = fsum(s);
#if TANDEM_DOT_LEVEL < 3
                const T* a = act_row<T>(va, as, r);
                for (int64_t j = i; j < n; ++j) total += C::scalar(w[k][j]) * C::scalar(a[j]);
#endif
                out[k][r] = total;
            }
    }
    template <int NA>
    static void run(int64_t n, const void* vw, const void* va, size_t as, float* out) {
        rows<NA, 1>(n, &vw, va, as, &out);
    }
};

template <class U>
constexpr auto act_scales() {
#if TANDEM_DOT_LEVEL >= 4
    return &act_prep<U>;
#else
    return &act_scales_f32<block_q8_0>;
#endif
}

}  // namespace

ScaledDotKernel scaled_kernel(GgmlType wtype) {
    switch (wtype) {
        case GgmlType::Q4_0: return {&by_rows_f32_scales<Blocks32<UnpackQ4_0>>, act_scales<UnpackQ4_0>()};
        case GgmlType::Q4_1: return {&by_rows_f32_scales<Blocks32<UnpackQ4_1>>, &act_scales_f32<block_q8_1>};
        case GgmlType::Q5_0: return {&by_rows_f32_scales<Blocks32<UnpackQ5_0>>, act_scales<UnpackQ5_0>()};
        case GgmlType::Q5_1: return {&by_rows_f32_scales<Blocks32<UnpackQ5_1>>, &act_scales_f32<block_q8_1>};
        case GgmlType::Q8_0: return {&by_rows_f32_scales<Blocks32<UnpackQ8_0>>, act_scales<UnpackQ8_0>()};
#if TANDEM_DOT_LEVEL >= 4
        case GgmlType::Q4_K: return {&by_rows_f32_scales<GemmQ4K>, &GemmQ4K::act_prep};
#endif
        default: return {};
    }
}

DotKernel kernel(GgmlType wtype) {
    switch (wtype) {
        case GgmlType::F32: return &by_rows<Floats<CvtF32>>;
        case GgmlType::F16: return &by_rows<Floats<CvtF16>>;
        case GgmlType::BF16: return &by_rows<Floats<CvtBF16>>;
        case GgmlType::Q4_0: return &by_rows<Blocks32<UnpackQ4_0>>;
        case GgmlType::Q4_1: return &by_rows<Blocks32<UnpackQ4_1>>;
        case GgmlType::Q5_0: return &by_rows<Blocks32<UnpackQ5_0>>;
        case GgmlType::Q5_1: return &by_rows<Blocks32<UnpackQ5_1>>;
        case GgmlType::Q8_0: return &by_rows<Blocks32<UnpackQ8_0>>;
        case GgmlType::Q4_K: return &by_rows<QxK<false>>;
        case GgmlType::Q5_K: return &by_rows<QxK<true>>;
        case GgmlType::Q6_K: return &by_rows<Q6K>;
        default: return nullptr;
    }
}

DotKernel2 kernel2(GgmlType wtype) {
    switch (wtype) {
        case GgmlType::F32: return &by_rows2<Floats<CvtF32>>;
        case GgmlType::F16: return &by_rows2<Floats<CvtF16>>;
        case GgmlType::BF16: return &by_rows2<Floats<CvtBF16>>;
        default: return nullptr;
    }
}

// ---------------------------------------------------------------------------------------- attention (attention.cpp)
#if TANDEM_DOT_LEVEL <= 3
// exp(x) on a vector (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2 with ln2 in two parts, a degree-6
// polynomial in r, times 2^n), x clamped to [-87, 88] so that 2^n stays a normal float: below -87 it
// gives exp(-87) ~ 1.6e-38 where expf gives less. NaN propagates (max / min return their second operand).
TANDEM_INLINE VecF vexp(VecF x) {
    x = vmin(fset1(88.0f), Lanes::max(fset1(-87.0f), x));
    const VecF n = fround(fmul(x, fset1(1.44269504088896341f)));
    VecF r = fmadd(n, fset1(-0.693359375f), x);
    r = fmadd(n, fset1(2.12194440e-4f), r);
    VecF y = fset1(1.9875691500e-4f);
    for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        y = fmadd(y, r, fset1(c));
    y = fmadd(y, fmul(r, r), fadd(r, fset1(1.0f)));
    return fmul(y, fpow2(n));
}

namespace {

TANDEM_INLINE VecF round_to_cache(VecF v, GgmlType type) {
    return type == GgmlType::F16 ? fround_f16(v) : type == GgmlType::BF16 ? fround_bf16(v) : v;
}

// f applied to x[0:n] in place, the last n % kLanes values through one padded vector (every value gets
// the same function); f gets the vector and how many of its lanes hold values
template <class F>
TANDEM_INLINE void each_vector(float* x, int64_t n, F f) {
    int64_t s = 0;
    for (; s + kLanes <= n; s += kLanes) fstoreu(x + s, f(Lanes::load(x + s), kLanes));
    if (s < n) {
        alignas(64) float t[kLanes] = {};
        std::memcpy(t, x + s, sizeof(float) * static_cast<size_t>(n - s));
        fstoreu(t, f(Lanes::load(t), static_cast<int>(n - s)));
        std::memcpy(x + s, t, sizeof(float) * static_cast<size_t>(n - s));
    }
}

// Rows [i0, i0 + RR) x vectors [k0, k0 + CC) of the mix of columns from r0: positions [s0, s1), the tile's
// RR x CC accumulators in registers, each cache vector loaded (converted) once for the tile's rows and each
// probability broadcast once for its vectors
template <int RR, int CC, class C>
TANDEM_INLINE void mix_tile(const MixRows& m, int64_t r0, int64_t i0, int k0, int64_t s0, int64_t s1) {
    using T = typename C::T;
    VecF acc[RR][CC];
    const float* p[RR];
    float* out[RR];
    for (int r = 0; r < RR; ++r) {
        p[r] = m.p + (i0 + r) * m.p_stride;
        out[r] = m.out[i0 + r] + r0 + k0 * kLanes;
        for (int c = 0; c < CC; ++c) acc[r][c] = Lanes::load(out[r] + c * kLanes);
    }
    for (int64_t s = s0; s < s1; ++s) {
        const T* row = reinterpret_cast<const T*>(m.rows + s * m.stride) + r0 + k0 * kLanes;
        VecF v[CC];
        for (int c = 0; c < CC; ++c) v[c] = C::load(row + c * kLanes);
        for (int r = 0; r < RR; ++r) {
            const VecF w = fset1(p[r][s]);
            for (int c = 0; c < CC; ++c) acc[r][c] = fmadd(w, v[c], acc[r][c]);
        }
    }
    for (int r = 0; r < RR; ++r)
        for (int c = 0; c < CC; ++c) fstoreu(out[r] + c * kLanes, acc[r][c]);
}

// mix_tile over every vector of the row group, kMixCols at a time (then the NV % kMixCols left); a row on its
// own keeps all of its accumulators, as many as the vectors
constexpr int kMixRows = TANDEM_DOT_LEVEL >= 3 ? 4 : 2, kMixCols = 4;
template <int RR, int NV, class C>
TANDEM_INLINE void mix_row_group(const MixRows& m, int64_t r0, int64_t i0, int64_t s0, int64_t s1) {
    constexpr int CC = RR == 1 ? NV : kMixCols;
    int k0 = 0;
    for (; k0 + CC <= NV; k0 += CC) mix_tile<RR, CC, C>(m, r0, i0, k0, s0, s1);
    constexpr int rest = NV % CC;
    if constexpr (rest > 0) mix_tile<RR, rest, C>(m, r0, i0, k0, s0, s1);
}

#if TANDEM_DOT_LEVEL >= 3
// Scores of NW cache rows w[k] against NA query rows (rows `as` bytes apart from a), n values each:
// y[r * ys + k] = w[k] . a_r, summed as Floats::rows sums them (one accumulator a pair, the same floats)
template <int NW, int NA, class C>
TANDEM_INLINE void score_tile(int64_t n, const typename C::T* const* w, const float* a, size_t as, float* y,
                              size_t ys) {
    VecF acc[NW][NA];
    const float* ar[NA];
    for (int r = 0; r < NA; ++r) {
        ar[r] = act_row<float>(a, as, r);
        for (int k = 0; k < NW; ++k) acc[k][r] = fzero();
    }
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        VecF wv[NW];
        for (int k = 0; k < NW; ++k) wv[k] = C::load(w[k] + i);
        for (int r = 0; r < NA; ++r) {
            const VecF av = Lanes::load(ar[r] + i);
            for (int k = 0; k < NW; ++k) acc[k][r] = fmadd(wv[k], av, acc[k][r]);
        }
    }
    if (i < n) {
        const auto m = static_cast<__mmask16>((1u << (n - i)) - 1);
        VecF wv[NW];
        for (int k = 0; k < NW; ++k) wv[k] = C::load(w[k] + i, m);
        for (int r = 0; r < NA; ++r) {
            const VecF av = _mm512_maskz_loadu_ps(m, ar[r] + i);
            for (int k = 0; k < NW; ++k) acc[k][r] = fmadd(wv[k], av, acc[k][r]);
        }
    }
    store_sums<NW, NA>(acc, y, ys);
}

// score_tile over every query row, four at a time (then the one to three left)
template <int NW, class C>
TANDEM_INLINE void score_rows(int64_t n, const typename C::T* const* w, const float* a, size_t as, int64_t na,
                              float* y, size_t ys) {
    int64_t r = 0;
    for (; r + 4 <= na; r += 4) score_tile<NW, 4, C>(n, w, act_row<float>(a, as, r), as, y + r * ys, ys);
    switch (na - r) {
        case 1: return score_tile<NW, 1, C>(n, w, act_row<float>(a, as, r), as, y + r * ys, ys);
        case 2: return score_tile<NW, 2, C>(n, w, act_row<float>(a, as, r), as, y + r * ys, ys);
        case 3: return score_tile<NW, 3, C>(n, w, act_row<float>(a, as, r), as, y + r * ys, ys);
        default: return;
    }
}

template <class C>
void score_span_t(int64_t n, const uint8_t* w, size_t ws, int64_t p0, int64_t p1, const float* a, size_t as,
                  int64_t na, float* y, size_t ys) {
    using T = typename C::T;
    for (int64_t p = p0; p < p1; p += 4) {
        const T* rows[4];
        const int nw = static_cast<int>(std::min<int64_t>(4, p1 - p));
        for (int k = 0; k < nw; ++k) rows[k] = reinterpret_cast<const T*>(w + (p + k) * ws);
        float* yp = y + p;
        switch (nw) {
            case 4: score_rows<4, C>(n, rows, a, as, na, yp, ys); break;
            case 3: score_rows<3, C>(n, rows, a, as, na, yp, ys); break;
            case 2: score_rows<2, C>(n, rows, a, as, na, yp, ys); break;
            default: score_rows<1, C>(n, rows, a, as, na, yp, ys); break;
        }
    }
}
#endif

// The mix of columns [r0, r0 + NV kLanes), read from the cache rows: the rows kMixRows at a time, their
// positions up to the least of their counts (each row's rest on its own). Every output value sums its
// products in position order, one fused multiply-add each, as a row-at-a-time loop would (the same floats).
// It took a row at a time, each over a block of positions converted to float first: four rows at a time
// made the attention call 0.86-0.96x the time (Qwen3-30B-A3B's and V2-Lite's heads, f32, 4096 positions,
// in-process alternation), and reading the rows themselves rather than the converted block 0.88-0.95x more
// (f32 and f16; a tile of 8 tokens 0.97-1.01x). Perf puts it at about a cycle a product now. With AVX2's 16
// registers, two rows at a time: 0.89-0.98x against one (V2-Lite's and Qwen3's heads, f16 and f32).
template <int NV, class C>
void mix_cols_t(const MixRows& m, int64_t r0) {
    int64_t i = 0;
    for (; i + kMixRows <= m.n_rows; i += kMixRows) {
        int64_t e = m.n[i];
        for (int r = 1; r < kMixRows; ++r) e = std::min(e, m.n[i + r]);
        if (e > 0) mix_row_group<kMixRows, NV, C>(m, r0, i, 0, e);
        for (int r = 0; r < kMixRows; ++r)  // the rows that see further than the group
            if (m.n[i + r] > e) mix_row_group<1, NV, C>(m, r0, i + r, e, m.n[i + r]);
    }
    for (; i < m.n_rows; ++i)
        if (m.n[i] > 0) mix_row_group<1, NV, C>(m, r0, i, 0, m.n[i]);
}

template <class C>
void mix_cols_c(const MixRows& m, int64_t r0, int nv) {
    switch (nv) {
        case 1: return mix_cols_t<1, C>(m, r0);
        case 2: return mix_cols_t<2, C>(m, r0);
        case 3: return mix_cols_t<3, C>(m, r0);
        case 4: return mix_cols_t<4, C>(m, r0);
        case 5: return mix_cols_t<5, C>(m, r0);
        case 6: return mix_cols_t<6, C>(m, r0);
        case 7: return mix_cols_t<7, C>(m, r0);
        default: return mix_cols_t<8, C>(m, r0);
    }
}

}  // namespace

#if TANDEM_DOT_LEVEL >= 3
void round_to_cache_row(GgmlType type, const float* x, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) fstoreu(y + i, round_to_cache(Lanes::load(x + i), type));
    if (i < n) {
        const auto m = static_cast<__mmask16>((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, round_to_cache(_mm512_maskz_loadu_ps(m, x + i), type));
    }
}

void score_span(GgmlType type, int64_t n, const uint8_t* w, size_t ws, int64_t p0, int64_t p1, const float* a,
                size_t as, int64_t na, float* y, size_t ys) {
    if (type == GgmlType::F32) return score_span_t<CvtF32>(n, w, ws, p0, p1, a, as, na, y, ys);
    if (type == GgmlType::F16) return score_span_t<CvtF16>(n, w, ws, p0, p1, a, as, na, y, ys);
    score_span_t<CvtBF16>(n, w, ws, p0, p1, a, as, na, y, ys);
}
#endif

void mix_cols(const MixRows& m, int64_t r0, int nv) {
    if (m.type == GgmlType::F32) return mix_cols_c<CvtF32>(m, r0, nv);
    if (m.type == GgmlType::F16) return mix_cols_c<CvtF16>(m, r0, nv);
    mix_cols_c<CvtBF16>(m, r0, nv);
}

void softmax_row(float* sc, const float* pe, int64_t n, float scale, GgmlType type) {
    const VecF vs = fset1(scale);
    VecF mx = fset1(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s + kLanes <= n; s += kLanes) {
        const VecF x = Lanes::load(sc + s);
        const VecF v = fmul(pe ? fadd(x, Lanes::load(pe + s)) : x, vs);
        fstoreu(sc + s, v);
        mx = Lanes::max(mx, v);
    }
    float top = Lanes::hmax(mx);
    for (int64_t s = n / kLanes * kLanes; s < n; ++s) {
        sc[s] = (sc[s] + (pe ? pe[s] : 0.0f)) * scale;
        top = std::max(top, sc[s]);
    }
    const VecF vt = fset1(top);
    VecF sum = fzero();
    float tail = 0;
    each_vector(sc, n, [&](VecF v, int lanes) {
        const VecF e = vexp(fsub(v, vt));
        if (lanes == kLanes) {
            sum = fadd(sum, e);
        } else {
            alignas(64) float t[kLanes];
            fstoreu(t, e);
            for (int j = 0; j < lanes; ++j) tail += t[j];
        }
        return e;
    });
    const VecF inv = fset1(1.0f / (fsum(sum) + tail));
    each_vector(sc, n, [&](VecF v, int) { return round_to_cache(fmul(v, inv), type); });
}
#endif

}  // namespace tandem::detail::TANDEM_DOT_NS
