// AVX2 + FMA + F16C dot kernels: the bodies are in dot_simd.h, compiled here for this ISA only.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm*_undefined_*() idiom inside its own intrinsics headers as uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dot_kernels.h"

#define TANDEM_DOT_LEVEL 2
#define TANDEM_DOT_NS avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include "dot_simd.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
