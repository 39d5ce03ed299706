/* Row helpers shared by the compiled kernels (kld_kernel.c, f16_kernel.c): rows of float16 or
 * float32 entries read as float32 (scalar and AVX2, with a padded tail), numpy's argmax of a row,
 * and float32 partial sums widened into float64 accumulators. Included, not linked: each kernel
 * is one translation unit. */

#ifndef GGUFOPT_SIMD_ROWS_H
#define GGUFOPT_SIMD_ROWS_H

#include "simd_exp.h"

#define GG_PREFETCH 4096 /* entries ahead that a streaming pass asks the cache for */

static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    if (em >= 0x7c00u) /* inf or NaN */
        return f32_from_bits(sign | 0x7f800000u | ((em & 0x3ffu) << 13));
    /* exponent and mantissa in place, then 2^112 fixes the bias (subnormals become normal) */
    return f32_from_bits(sign | (em << 13)) * 0x1p112f;
}

static inline float load_a(const void *a, int f16, int64_t i) {
    return f16 ? h2f(((const uint16_t *)a)[i]) : ((const float *)a)[i];
}

/* numpy's argmax: the first NaN if there is one, else the first maximum */
static inline int64_t argmax_numpy_a(const void *a, int f16, int64_t v) {
    int64_t best = 0;
    float m = load_a(a, f16, 0);
    if (m != m) return 0;
    for (int64_t i = 1; i < v; i++) {
        float x = load_a(a, f16, i);
        if (x != x) return i;
        if (x > m) { m = x; best = i; }
    }
    return best;
}

#if GG_AVX2
static inline __m256 load8_a(const void *a, int f16, int64_t i) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a + i)));
    return _mm256_loadu_ps((const float *)a + i);
}

/* the last v - i (< 8) entries, padded with `pad` */
static inline __m256 load_tail(const void *a, int f16, int64_t i, int64_t v, float pad) {
    float buf[8];
    for (int k = 0; k < 8; k++) buf[k] = (i + k < v) ? load_a(a, f16, i + k) : pad;
    return _mm256_loadu_ps(buf);
}

static inline double hsum_pd(__m256d x) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(s) + _mm_cvtsd_f64(_mm_unpackhi_pd(s, s));
}

static inline __m256d widen_add(__m256d acc, __m256 x) {
    acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
}

/* argmax state of the lanes: the value and first index of each lane's maximum */
typedef struct {
    __m256 m;
    __m256i i;
} lane_max;

static inline void lane_max_update(lane_max *s, __m256 x, __m256i idx) {
    __m256 gt = _mm256_cmp_ps(x, s->m, _CMP_GT_OQ);
    s->m = _mm256_blendv_ps(s->m, x, gt);
    s->i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(s->i), _mm256_castsi256_ps(idx), gt));
}

/* the first index of the maximum over two lane states (ties: the smaller index) */
static inline int64_t lane_max_result(lane_max s0, lane_max s1, int64_t v) {
    float m[16];
    int32_t ix[16];
    _mm256_storeu_ps(m, s0.m);
    _mm256_storeu_ps(m + 8, s1.m);
    _mm256_storeu_si256((__m256i *)ix, s0.i);
    _mm256_storeu_si256((__m256i *)(ix + 8), s1.i);
    int best = 0;
    for (int k = 1; k < 16; k++)
        if (m[k] > m[best] || (m[k] == m[best] && ix[k] < ix[best])) best = k;
    return ix[best] < v ? ix[best] : 0;
}

/* numpy's argmax of a row: 2 x 8 lanes of (maximum, first index); a row with a NaN goes to the
 * scalar scan, which returns the first NaN */
static inline int64_t argmax_v(const void *a, int f16, int64_t v) {
    lane_max s0 = {_mm256_set1_ps(-INFINITY), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)}, s1 = s0;
    const __m256i eight = _mm256_set1_epi32(8);
    __m256i cur = s0.i;
    __m256 nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= v; i += 16) {
        _mm_prefetch((const char *)a + (i + GG_PREFETCH) * (f16 ? 2 : 4), _MM_HINT_T0);
        __m256i cur1 = _mm256_add_epi32(cur, eight);
        __m256 x0 = load8_a(a, f16, i), x1 = load8_a(a, f16, i + 8);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x0, x1, _CMP_UNORD_Q));
        lane_max_update(&s0, x0, cur);
        lane_max_update(&s1, x1, cur1);
        cur = _mm256_add_epi32(cur1, eight);
    }
    for (; i < v; i += 8) {
        __m256 x = i + 8 <= v ? load8_a(a, f16, i) : load_tail(a, f16, i, v, -INFINITY);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        lane_max_update(&s0, x, cur);
        cur = _mm256_add_epi32(cur, eight);
    }
    if (_mm256_movemask_ps(nan)) return argmax_numpy_a(a, f16, v);
    return lane_max_result(s0, s1, v);
}
#endif

#endif
