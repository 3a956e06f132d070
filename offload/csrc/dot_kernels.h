// Internal: the per-ISA kernel tables behind dot_kernel() (dot.cpp). Each SIMD table lives in its
// own translation unit compiled for that ISA (dot_avx2.cpp, dot_avx512.cpp, dot_avx512_vnni.cpp), so
// no instruction beyond the baseline reaches code that runs before the CPU check.
#pragma once

#include "dot.h"

namespace tandem::detail {

// Each returns nullptr for a type it has no kernel for.
namespace scalar { DotKernel kernel(GgmlType wtype); }
namespace avx2 { DotKernel kernel(GgmlType wtype); }
namespace avx512 { DotKernel kernel(GgmlType wtype); }
namespace avx512_vnni {
DotKernel kernel(GgmlType wtype);
DotKernel bf16_dpbf16_kernel();  // BF16 x BF16 with _mm512_dpbf16_ps: only where the CPU has AVX512_BF16
}

}  // namespace tandem::detail
