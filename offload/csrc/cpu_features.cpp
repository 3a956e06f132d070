#include "cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define TANDEM_X86 1
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

}  // namespace

const CpuFeatures& cpu_features() {
    static const CpuFeatures features = detect();
    return features;
}

}  // namespace tandem
