/* The exponential shared by the compiled kernels (kld_kernel.c, f16_kernel.c): float32, scalar
 * and AVX2 (8 lanes), a Cody-Waite reduction by ln2 and a degree-4 polynomial, ~1e-8 relative
 * error (below float32's rounding). Included, not linked: each kernel is one translation unit. */

#ifndef GGUFOPT_SIMD_EXP_H
#define GGUFOPT_SIMD_EXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GG_AVX2 1
#else
#define GG_AVX2 0
#endif

/* exp(r) = 1 + r + r^2 P(r) on |r| <= ln2/2: P of degree 4 fitted for minimal relative error
 * (~1e-8, below float32's rounding) */
#define EXP_P0 4.999999702e-01f
#define EXP_P1 1.666657925e-01f
#define EXP_P2 4.166780040e-02f
#define EXP_P3 8.362863213e-03f
#define EXP_P4 1.382198767e-03f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define EXP_HI 88.0f  /* above: +inf (the caller then redoes the row in float64) */
#define EXP_LO -87.0f /* below: 0 */
/* 1.5 * 2^23 + 127: x * log2e + this rounds to an integer n in the low mantissa bits, with the
 * float32 exponent bias already added */
#define EXP_MAGIC 12583039.0f

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float exp_s(float x) {
    if (!(x <= EXP_HI)) return x != x ? x : INFINITY;
    if (x < EXP_LO) return 0.0f;
    float n = nearbyintf(x * LOG2E);
    float r = fmaf(n, -LN2_HI, x);
    r = fmaf(n, -LN2_LO, r);
    float r2 = r * r;
    float p = fmaf(fmaf(EXP_P4, r2, fmaf(EXP_P3, r, EXP_P2)), r2, fmaf(EXP_P1, r, EXP_P0));
    float q = fmaf(r2, p, r);
    float scale = f32_from_bits((uint32_t)((int32_t)n + 127) << 23);
    return fmaf(q, scale, scale);
}

#if GG_AVX2
/* exp for x <= EXP_HI: the caller checks the row's maximum (above it, the row is bad); below
 * EXP_LO the result is 0, a NaN stays NaN */
static inline __m256 exp_fast_v(__m256 x) {
    const __m256 lo = _mm256_set1_ps(EXP_LO);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    __m256 xc = _mm256_max_ps(lo, x); /* NaN passes through */
    __m256 j = _mm256_fmadd_ps(xc, _mm256_set1_ps(LOG2E), _mm256_set1_ps(EXP_MAGIC));
    __m256 n = _mm256_sub_ps(j, _mm256_set1_ps(EXP_MAGIC));
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(j), 23));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    __m256 r2 = _mm256_mul_ps(r, r);
    __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(EXP_P1), r, _mm256_set1_ps(EXP_P0));
    __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(EXP_P3), r, _mm256_set1_ps(EXP_P2));
    __m256 p = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(EXP_P4), r2, p23), r2, p01);
    __m256 q = _mm256_fmadd_ps(r2, p, r); /* e^r - 1 */
    return _mm256_andnot_ps(under, _mm256_fmadd_ps(q, scale, scale));
}

/* exp for any x (+inf above EXP_HI) */
static inline __m256 exp_v(__m256 x) {
    const __m256 hi = _mm256_set1_ps(EXP_HI);
    __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    __m256 e = exp_fast_v(_mm256_min_ps(hi, x)); /* NaN passes through */
    return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), over);
}

#endif

#endif
