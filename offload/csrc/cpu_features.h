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
};

// Detected once, then cached.
const CpuFeatures& cpu_features();

}  // namespace tandem
