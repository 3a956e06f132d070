#include "cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define TANDEM_X86 1
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tandem {
namespace {

#ifdef TANDEM_X86
void cpuid(unsigned leaf, unsigned subleaf, unsigned r[4]) {
    __cpuid_count(leaf, subleaf, r[0], r[1], r[2], r[3]);
}

unsigned long long xgetbv0() {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

CpuFeatures detect() {
    CpuFeatures f;
#ifdef TANDEM_X86
    unsigned r[4];
    cpuid(0, 0, r);
    const unsigned max_leaf = r[0];
    char vendor[13] = {};
    std::memcpy(vendor, &r[1], 4);  // EBX, EDX, ECX
    std::memcpy(vendor + 4, &r[3], 4);
    std::memcpy(vendor + 8, &r[2], 4);
    f.amd = std::strcmp(vendor, "AuthenticAMD") == 0 || std::strcmp(vendor, "HygonGenuine") == 0;
    if (max_leaf < 1) return f;
    cpuid(1, 0, r);
    const bool osxsave = (r[2] >> 27) & 1;
    f.sse42 = (r[2] >> 20) & 1;
    f.fma = (r[2] >> 12) & 1;
    f.f16c = (r[2] >> 29) & 1;
    const bool avx_hw = (r[2] >> 28) & 1;
    // The OS must save YMM (bits 1,2) and, for AVX-512, opmask/ZMM state (bits 5,6,7).
    const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
    const bool ymm_ok = (xcr0 & 0x6) == 0x6;
    const bool zmm_ok = (xcr0 & 0xE6) == 0xE6;
    const bool amx_ok = (xcr0 & (3ull << 17)) == (3ull << 17);
    f.avx = avx_hw && ymm_ok;
    f.fma = f.fma && f.avx;
    f.f16c = f.f16c && f.avx;
    if (max_leaf >= 7) {
        cpuid(7, 0, r);
        const unsigned ebx = r[1], ecx = r[2], edx = r[3];
        f.avx2 = f.avx && ((ebx >> 5) & 1);
        f.avx512f = zmm_ok && ((ebx >> 16) & 1);
        f.avx512dq = f.avx512f && ((ebx >> 17) & 1);
        f.avx512bw = f.avx512f && ((ebx >> 30) & 1);
        f.avx512vl = f.avx512f && ((ebx >> 31) & 1);
        f.avx512_vnni = f.avx512f && ((ecx >> 11) & 1);
        f.amx_bf16 = amx_ok && ((edx >> 22) & 1);
        f.amx_tile = amx_ok && ((edx >> 24) & 1);
        f.amx_int8 = amx_ok && ((edx >> 25) & 1);
        cpuid(7, 1, r);
        f.avx_vnni = f.avx2 && ((r[0] >> 4) & 1);
        f.avx512_bf16 = f.avx512f && ((r[0] >> 5) & 1);
    }
#endif
    return f;
}

// Linux hands out the AMX tile state (XTILEDATA, 8 KiB per thread) only to a process that asks for it;
// without it the first tile instruction faults. Asked once; false where refused or not Linux x86-64.
bool amx_granted() {
#if defined(__linux__) && defined(__x86_64__)
    static const bool granted = [] {
        constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return granted;
#else
    return false;
#endif
}

}  // namespace

const CpuFeatures& cpu_features() {
    static const CpuFeatures features = detect();
    return features;
}

bool isa_supported(Isa isa) {
    const CpuFeatures& f = cpu_features();
    switch (isa) {
        case Isa::Scalar: return true;
        case Isa::Avx2: return f.avx2 && f.fma && f.f16c;
        case Isa::AvxVnni: return isa_supported(Isa::Avx2) && f.avx_vnni;
        case Isa::Avx512: return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
        case Isa::Avx512Vnni: return isa_supported(Isa::Avx512) && f.avx512_vnni;
        case Isa::Amx: return isa_supported(Isa::Avx512Vnni) && f.amx_tile && f.amx_int8 && amx_granted();
    }
    return false;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Scalar: return "scalar";
        case Isa::Avx2: return "avx2";
        case Isa::AvxVnni: return "avx_vnni";
        case Isa::Avx512: return "avx512";
        case Isa::Avx512Vnni: return "avx512_vnni";
        case Isa::Amx: return "avx512_amx";
    }
    return "?";
}

static Isa named_isa(const char* name) {
    for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Avx512Vnni, Isa::Amx})
        if (std::strcmp(name, isa_name(isa)) == 0) return isa;
    throw std::invalid_argument(std::string("unknown ISA '") + name +
                                "'; use auto, scalar, avx2, avx_vnni, avx512, avx512_vnni or avx512_amx");
}

Isa best_isa() {
    static const Isa best = [] {
        const char* env = std::getenv("TANDEM_ISA");
        const Isa cap = env && *env && std::strcmp(env, "auto") != 0 ? named_isa(env) : Isa::Amx;
        Isa top = Isa::Scalar;  // the highest supported level at or below the cap: not simply the cap, as
                                // an AVX-512 CPU may lack AvxVnni
        for (Isa isa : {Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Avx512Vnni, Isa::Amx})
            if (isa_supported(isa) && static_cast<int>(isa) <= static_cast<int>(cap)) top = isa;
        return top;
    }();
    return best;
}

namespace detail {
bool g_stream_prefetch_l2 = cpu_features().amd;
}

void configure_stream_prefetch() {
    const char* env = std::getenv("TANDEM_PREFETCH");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0)
        detail::g_stream_prefetch_l2 = cpu_features().amd;
    else if (std::strcmp(env, "l1") == 0) detail::g_stream_prefetch_l2 = false;
    else if (std::strcmp(env, "l2") == 0) detail::g_stream_prefetch_l2 = true;
    else
        throw std::invalid_argument(std::string("TANDEM_PREFETCH='") + env +
                                    "' is not a cache level; use l1, l2 or auto (or leave it unset)");
}

Isa parse_isa(const char* name) {
    if (name == nullptr || std::strcmp(name, "auto") == 0) return best_isa();
    Isa isa = named_isa(name);
    if (!isa_supported(isa))
        throw std::invalid_argument(std::string("this CPU cannot run the ") + name + " kernels");
    return isa;
}

}  // namespace tandem
