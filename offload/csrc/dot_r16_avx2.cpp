// AVX2 kernels for the row-interleaved layouts: the bodies are in dot_r16_simd256.h, compiled here for
// AVX2 + FMA + F16C (CPUs without AVX-512 VNNI or AVX-VNNI, and the avx2 / avx512 levels).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#define TANDEM_R16_NS avx2
#define TANDEM_R16_VNNI 0
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include "dot_r16_simd256.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
