// CPU feature detection: what this machine can execute, checked through CPUID
// and XGETBV (the OS must also save the wide registers), never assumed.
#pragma once

namespace tandem {

struct CpuFeatures {
    bool sse42 = false;
    bool avx = false;
    bool avx2 = false;
    bool fma = false;
    bool f16c = false;
    bool avx512f = false;
    bool avx512bw = false;
    bool avx512dq = false;
    bool avx512vl = false;
    bool avx512_vnni = false;
    bool avx512_bf16 = false;
    bool avx_vnni = false;
    bool amx_tile = false;
    bool amx_int8 = false;
    bool amx_bf16 = false;
    bool amd = false;  // the vendor: AuthenticAMD (or Hygon's Zen cores)
};

// Detected once, then cached.
const CpuFeatures& cpu_features();

// SIMD levels the kernels come in. Every kernel has a Scalar reference; higher levels are
// compiled with per-function target attributes and only called when the CPU has them.
// Amx is Avx512Vnni plus AMX-INT8 tiles (granted to the process by the kernel: arch_prctl), which only
// the row-interleaved kernels use (Q4_K / Q5_K from kAmxMinTokens tokens, Q6_K from kAmxMinTokensQ6, Q4_0 /
// Q5_0 / Q8_0 from kAmxMinTokens32: repack.h), and BF16 weights from kAmxBf16MinTokens where the CPU has AMX-BF16 too;
// everything else runs as at Avx512Vnni.
// AvxVnni is Avx2 plus AVX-VNNI (the 256-bit vpdpbusd; Intel client cores from Alder Lake on), which only
// the row-interleaved kernels use. It is not below Avx512 in features (an AVX-512 F/BW CPU may lack it),
// only in order: code asks for it by equality, and `isa >= Isa::Avx512` still means AVX-512.
enum class Isa : int { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512 = 3, Avx512Vnni = 4, Amx = 5 };

bool isa_supported(Isa isa);
// The highest supported level, capped by the environment variable TANDEM_ISA (scalar | avx2 | avx_vnni |
// avx512 | avx512_vnni | avx512_amx: the highest supported level at or below it), read once - how tests
// force every variant.
Isa best_isa();
const char* isa_name(Isa isa);
// "auto" -> best_isa(); otherwise the named level; throws std::invalid_argument when unknown or
// unsupported on this CPU.
Isa parse_isa(const char* name);

// Whether the streaming kernels prefetch the weights into the L2 cache (prefetcht1; the AVX-512 ones then
// into the L1 too, nearer: r16_prefetch.h) rather than the L1 alone (prefetcht0): on AMD CPUs, where that
// measured faster, unless the environment variable TANDEM_PREFETCH (l1 | l2) says otherwise. Set when the
// module loads (configure_stream_prefetch), then only read, by the kernels' inner loops.
namespace detail {
extern bool g_stream_prefetch_l2;
}
// Applies TANDEM_PREFETCH; throws std::invalid_argument naming the accepted values on any other.
void configure_stream_prefetch();
inline const char* stream_prefetch_name() { return detail::g_stream_prefetch_l2 ? "l2" : "l1"; }

}  // namespace tandem
