// The declarations of the 256-bit token-tile kernels (dot_r16_simd256.h), included by repack.h inside
// namespace detail::avx2 (dot_r16_avx2.cpp) and detail::avx_vnni (dot_r16_avx_vnni.cpp: the same kernels
// with AVX-VNNI's vpdpbusd), so the two sets keep one list. No include guard: included once per set.
// Q4_K_R16 on AVX2 (dot_r16_simd256.h): as avx512_vnni::gemm_r16_q4k, with ad and sub_sums from this
// prep_r16_q4k (the same values; compiled for AVX2).
void gemm_r16_q4k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride);
void prep_r16_q4k(const void* act, size_t act_stride, int nt, int64_t nb, float* ad, float* sub_sums);
// Q5_K_R16 on AVX2: as gemm_r16_q4k (the same ad and sub_sums), the fifth bits from qh.
void gemm_r16_q5k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride, const float* ad,
                  const float* sub_sums, int nt, float* Y, size_t y_stride);
// Q4_0_R16 / Q5_0_R16 / Q8_0_R16 on AVX2: as avx512_vnni::gemm_r16, with ad and seed from this prep_r16
// (off 0 for Q8_0, whose quants this kernel takes signed).
void gemm_r16(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride,
              const float* ad, const int32_t* seed, int nt, float* Y, size_t y_stride);
void prep_r16(const void* act, size_t act_stride, int nt, int64_t nb, int off, float* ad, int32_t* seed);
// Q4_1_R16 / Q5_1_R16 on AVX2: as avx512_vnni::gemm_r16_min, with ad and sa from this prep_r16_min.
void gemm_r16_min(GgmlType base, int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride,
                  const float* ad, const float* sa, int nt, float* Y, size_t y_stride);
void prep_r16_min(const void* act, size_t act_stride, int nt, int64_t nb, float* ad, float* sa);
// Q6_K_R16 on AVX2: as avx512_vnni::gemm_r16_q6k, with ad and seed from this prep_r16_q6k.
void gemm_r16_q6k(int64_t nb, const uint8_t* group, int ng, const void* act, size_t act_stride, const float* ad,
                  const int32_t* seed, int nt, float* Y, size_t y_stride);
void prep_r16_q6k(const void* act, size_t act_stride, int nt, int64_t nb, float* ad, int32_t* seed);
