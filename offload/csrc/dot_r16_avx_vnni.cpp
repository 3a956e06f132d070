// AVX-VNNI kernels for the row-interleaved layouts: the bodies are in dot_r16_simd256.h, compiled here for
// AVX2 + FMA + F16C + AVX-VNNI (the 256-bit vpdpbusd of Intel's client cores from Alder Lake on).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#define TANDEM_R16_NS avx_vnni
#define TANDEM_R16_VNNI 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avxvnni")
#endif

#include "dot_r16_simd256.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
