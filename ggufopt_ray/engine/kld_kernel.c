/* Per-token KL(base || candidate) and companions over full-vocabulary rows: the compiled
 * counterpart of ggufopt_ray.metrics.kld._block, in one pass over each row instead of about ten.
 *
 * Built by ggufopt_ray/engine/kld_native.py with the system C compiler (-O3 -march=native, no
 * -ffast-math: the non-finite checks and the order of the float64 sums must stay as written).
 *
 * Per row, with a = base row (float16 or float32), b = candidate logits (float32), ia = the base's
 * top token (given, or found by a first pass over a), ka = ceil(a[ia]), kb = ceil(b[ia]) (integer
 * shifts: exact in float32 near the top of the distribution), and per entry
 *
 *   ea = exp(a - ka),  d = (b - kb) - (a - ka),  s = d - c,  c = d[ia],  t = expm1(s) - s >= 0,
 *
 * sums over the row (float64): sa = sum ea, y = sum ea s / sa, z = sum ea t / sa. With p = ea / sa,
 * sum p e^s = 1 + y + z, so for any shift c, exactly:
 *
 *   KL(p || softmax b) = log sum p e^s - sum p s = log1p(y + z) - y
 *   lse_a = ka + log(sa),  lse_b = kb + c + log(sa) + log1p(y + z)
 *
 * The numpy kernel takes c = the p-weighted mean of d (then y = 0), which costs a second pass; here
 * c = d at the base's top token, known before the pass, so one pass gives all sums. y is then not
 * 0, but its rounding enters KL only multiplied by (y + z), and z stays a sum of non-negative
 * terms; the top token's own term is exactly 0, and a distribution compared with itself gives
 * d = s = 0, so exactly 0.
 *
 * Element work is float32 AVX2 (8 lanes) with float32 partial sums over 64 entries that are then
 * added in float64. t is s^2 Q(s), Q a degree-7 polynomial, for |s| <= 1 (relative error ~1e-7
 * however small s is); vectors with a lane where |s| > 1 (or s is not finite) are set
 * aside in the scratch and those lanes finished afterwards as (e^s - 1) - s. Rows with a non-finite
 * input or result are flagged in bad[] and left to the caller (float64 fallback); only their
 * same_top is set here (with numpy's argmax semantics: the first NaN wins).
 *
 * On AMD Zen 3 (this project's CI machine) the pass is bound by the two FMA/multiply pipes, which
 * also take float compares, blends and maxima; so the pass keeps them for the arithmetic: the
 * candidate's argmax is its maximum alone (same_top then asks whether the base's top holds it
 * first, a short compare scan), the overflow check and the |s| > 1 test are integer operations
 * on the bit patterns, and the exponential (exp_nonpos_v) clamps by an integer minimum and
 * reduces by one float32 ln2 (llvm-mca: 23.5 -> 19.5 cycles per 8 entries).
 */

#include <stddef.h>

#include "simd_rows.h"

#define GGK_AVX2 GG_AVX2

#if GGK_AVX2
#define LN2_F 0.693147182f
/* exp(x) for x <= 0 (x = a - ka): ~3e-8 relative for x >= -15, where the mass is. Cheaper than
 * exp_fast_v on the FMA pipes, which bound this kernel: the clamp to EXP_LO is an unsigned
 * integer minimum of the bit patterns (for x <= 0 the larger pattern is the more negative
 * value; +0 and positive NaN pass), below it the result is exp(EXP_LO) ~ 1.6e-38 instead of 0
 * (a weight far below any sum's rounding), and the reduction uses one float32 ln2. */
static inline __m256 exp_nonpos_v(__m256 x) {
    __m256 xc = _mm256_castsi256_ps(_mm256_min_epu32(_mm256_castps_si256(x), _mm256_castps_si256(_mm256_set1_ps(EXP_LO))));
    __m256 j = _mm256_fmadd_ps(xc, _mm256_set1_ps(LOG2E), _mm256_set1_ps(EXP_MAGIC));
    __m256 n = _mm256_sub_ps(j, _mm256_set1_ps(EXP_MAGIC));
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(j), 23));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_F), xc);
    __m256 r2 = _mm256_mul_ps(r, r);
    __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(EXP_P1), r, _mm256_set1_ps(EXP_P0));
    __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(EXP_P3), r, _mm256_set1_ps(EXP_P2));
    __m256 p = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(EXP_P4), r2, p23), r2, p01);
    __m256 q = _mm256_fmadd_ps(r2, p, r); /* e^r - 1 */
    return _mm256_fmadd_ps(q, scale, scale);
}
#endif

#define GGK_ABI 4

/* t(s) = expm1(s) - s = s^2 Q(s) on |s| <= 1, Q of degree 7 fitted for minimal relative error
 * (~5e-9; the Taylor series s^k / (k + 2)! needs degree 9 for that) */
#define T0 5.000000000e-01f
#define T1 1.666666716e-01f
#define T2 4.166673496e-02f
#define T3 8.333310485e-03f
#define T4 1.388545148e-03f
#define T5 1.984402625e-04f
#define T6 2.535483145e-05f
#define T7 2.772270363e-06f

#define FLUSH 8 /* vectors summed in float32 before the float64 accumulators take them */
#define PREFETCH GG_PREFETCH

int ggk_abi(void) { return GGK_ABI; }
int ggk_simd(void) { return GGK_AVX2; }

/* ------------------------------------------------------------------ scalar helpers */

static inline float t_s(float s) {
    if (fabsf(s) <= 1.0f) {
        float s2 = s * s, s4 = s2 * s2;
        float q03 = fmaf(fmaf(T3, s, T2), s2, fmaf(T1, s, T0));
        float q47 = fmaf(fmaf(T7, s, T6), s2, fmaf(T5, s, T4));
        return s2 * fmaf(q47, s4, q03);
    }
    return (exp_s(s) - 1.0f) - s;
}

/* ------------------------------------------------------------------ AVX2 helpers */

#if GGK_AVX2
/* t(s) by the polynomial, valid for |s| <= 1 (the caller handles the other lanes). Estrin's form:
 * a short dependency chain, so that the core overlaps many vectors. */
static inline __m256 t_poly_v(__m256 s) {
    __m256 s2 = _mm256_mul_ps(s, s);
    __m256 s4 = _mm256_mul_ps(s2, s2);
    __m256 q01 = _mm256_fmadd_ps(_mm256_set1_ps(T1), s, _mm256_set1_ps(T0));
    __m256 q23 = _mm256_fmadd_ps(_mm256_set1_ps(T3), s, _mm256_set1_ps(T2));
    __m256 q45 = _mm256_fmadd_ps(_mm256_set1_ps(T5), s, _mm256_set1_ps(T4));
    __m256 q67 = _mm256_fmadd_ps(_mm256_set1_ps(T7), s, _mm256_set1_ps(T6));
    __m256 q03 = _mm256_fmadd_ps(q23, s2, q01);
    __m256 q47 = _mm256_fmadd_ps(q67, s2, q45);
    return _mm256_mul_ps(s2, _mm256_fmadd_ps(q47, s4, q03));
}

typedef struct {
    __m256 sa, y, z, bmax;
    __m256i xmax; /* the bit patterns' signed maximum: above EXP_HI's pattern means a - ka > EXP_HI */
} part_sums;

/* One vector of the pass, in two steps: ROW_EXP takes x = a entries to sha = a - ka and ea =
 * exp(sha); ROW_REST takes y = b entries and finishes. Vectors with a lane where |s| > 1 or s is
 * not finite are copied to the scratch (s, then ea) and those lanes left out of the sums here.
 * The comparisons and maxima that need not be float ones are integer ones on the bit patterns:
 * they run beside the FMA pipes. */
#define ROW_EXP(X, P, SHA, EA)                                                                 \
    do {                                                                                       \
        (SHA) = _mm256_sub_ps((X), vka);                                                       \
        (P).xmax = _mm256_max_epi32((P).xmax, _mm256_castps_si256(SHA));                       \
        (EA) = exp_nonpos_v(SHA);                                                              \
    } while (0)

#define ROW_REST(Y, SHA, EA, P)                                                                \
    do {                                                                                       \
        __m256 y_ = (Y), ea_ = (EA);                                                           \
        (P).bmax = _mm256_max_ps(y_, (P).bmax);                                                \
        __m256 s_ = _mm256_sub_ps(_mm256_sub_ps(_mm256_sub_ps(y_, vkb), (SHA)), vc);           \
        __m256 t_ = t_poly_v(s_);                                                              \
        __m256i big_ = _mm256_cmpgt_epi32(_mm256_castps_si256(_mm256_andnot_ps(sign, s_)), one_bits); \
        if (_mm256_movemask_epi8(big_)) {                                                      \
            _mm256_storeu_ps(set_aside + 16 * n_aside, s_);                                    \
            _mm256_storeu_ps(set_aside + 16 * n_aside + 8, ea_);                               \
            n_aside++;                                                                         \
            t_ = _mm256_andnot_ps(_mm256_castsi256_ps(big_), t_);                              \
            s_ = _mm256_andnot_ps(_mm256_castsi256_ps(big_), s_);                              \
        }                                                                                      \
        (P).sa = _mm256_add_ps((P).sa, ea_);                                                   \
        (P).y = _mm256_fmadd_ps(ea_, s_, (P).y);                                               \
        (P).z = _mm256_fmadd_ps(ea_, t_, (P).z);                                               \
    } while (0)

#define ROW_VEC(X, Y, P)                                                                       \
    do {                                                                                       \
        __m256 sha1_, ea1_;                                                                    \
        ROW_EXP(X, P, sha1_, ea1_);                                                            \
        ROW_REST(Y, sha1_, ea1_, P);                                                           \
    } while (0)

/* the set-aside vectors' lanes with |s| > 1: y and z terms, t = (e^s - 1) - s */
__attribute__((noinline)) static void set_aside_sums(const float *buf, int64_t n, double *y, double *z) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    __m256d ys = _mm256_setzero_pd(), zs = _mm256_setzero_pd();
    for (int64_t k = 0; k < n; k++) {
        __m256 s = _mm256_loadu_ps(buf + 16 * k), ea = _mm256_loadu_ps(buf + 16 * k + 8);
        __m256 big = _mm256_cmp_ps(_mm256_andnot_ps(sign, s), one, _CMP_NLE_UQ);
        __m256 t = _mm256_sub_ps(_mm256_sub_ps(exp_v(s), one), s);
        ys = widen_add(ys, _mm256_and_ps(big, _mm256_mul_ps(ea, s)));
        zs = widen_add(zs, _mm256_and_ps(big, _mm256_mul_ps(ea, t)));
    }
    *y = hsum_pd(ys);
    *z = hsum_pd(zs);
}

/* The sums of one row (f16: whether a is float16; a constant in each of the two instances below,
 * so the loop has no branch on it). One vector per step with one set of accumulators: the
 * loop-carried chains (3-4 cycles) are far shorter than a step, and fewer live registers keep
 * the compiler from spilling accumulators to the stack. */
static inline __attribute__((always_inline)) void row_pass_v(const void *a, const int f16, const float *b,
                                                            int64_t v, float ka, float kb, float c,
                                                            float *set_aside, double *sa_out, double *y_out,
                                                            double *z_out, int *over_out, float *bmax_out) {
    const __m256 vka = _mm256_set1_ps(ka), vkb = _mm256_set1_ps(kb), vc = _mm256_set1_ps(c);
    const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    const __m256i one_bits = _mm256_castps_si256(_mm256_set1_ps(1.0f));
    __m256d sa = _mm256_setzero_pd(), y = sa, z = sa;
    part_sums p = {zero, zero, zero, _mm256_set1_ps(-INFINITY), _mm256_set1_epi32(INT32_MIN)};
    int64_t n_aside = 0, full = v & ~(int64_t)7, i = 0;
    while (i < full) {
        int64_t end = i + 8 * FLUSH < full ? i + 8 * FLUSH : full;
        p.sa = p.y = p.z = zero;
        if (end - i == 8 * FLUSH) {
            /* a whole group: its exponentials first, then the rest. The same operations in the
             * same order as one vector at a time (identical sums), but each of the two loops has
             * a shorter dependency chain per vector, so the core overlaps more of them (measured
             * ~3% faster, paired runs at V = 8,192 and 128,256) */
            __m256 shb[FLUSH], eab[FLUSH];
            for (int k = 0; k < FLUSH; k++) {
                if (k % 2 == 0) _mm_prefetch((const char *)a + (i + 8 * k + PREFETCH) * (f16 ? 2 : 4), _MM_HINT_T0);
                ROW_EXP(load8_a(a, f16, i + 8 * k), p, shb[k], eab[k]);
            }
            for (int k = 0; k < FLUSH; k++) {
                _mm_prefetch((const char *)(b + i + 8 * k + PREFETCH), _MM_HINT_T0);
                ROW_REST(_mm256_loadu_ps(b + i + 8 * k), shb[k], eab[k], p);
            }
            i = end;
        }
        for (; i < end; i += 8) {
            /* rows come from memory: asking for them a few KiB ahead (also past the end of the
             * row, into the next one; a prefetch never faults) measured 10-20% faster */
            _mm_prefetch((const char *)(b + i + PREFETCH), _MM_HINT_T0);
            if (i % 16 == 0) _mm_prefetch((const char *)a + (i + PREFETCH) * (f16 ? 2 : 4), _MM_HINT_T0);
            ROW_VEC(load8_a(a, f16, i), _mm256_loadu_ps(b + i), p);
        }
        sa = widen_add(sa, p.sa);
        y = widen_add(y, p.y);
        z = widen_add(z, p.z);
    }
    if (i < v) {
        /* the last v - full < 8 entries; padding: a = ka + EXP_LO - 1 gives ea ~ 1.6e-38 times
         * s ~ 0, b = -inf loses the maximum, and b is chosen so that s is ~0 (not set aside) */
        __m256 valid = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(v - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        __m256 xt = _mm256_blendv_ps(_mm256_set1_ps(ka + EXP_LO - 1.0f), load_tail(a, f16, i, v, 0.0f), valid);
        __m256 yt = _mm256_blendv_ps(_mm256_add_ps(_mm256_add_ps(vc, _mm256_sub_ps(xt, vka)), vkb),
                                     load_tail(b, 0, i, v, 0.0f), valid);
        __m256 bmax = p.bmax;
        p.sa = p.y = p.z = zero;
        ROW_VEC(xt, yt, p);
        p.bmax = _mm256_max_ps(_mm256_blendv_ps(_mm256_set1_ps(-INFINITY), yt, valid), bmax);
        /* padding lanes: ea is exp(EXP_LO) instead of 0; take them out of sa */
        p.sa = _mm256_and_ps(p.sa, valid);
        sa = widen_add(sa, p.sa);
        y = widen_add(y, p.y);
        z = widen_add(z, p.z);
    }
    double ya = 0.0, za = 0.0;
    if (n_aside) set_aside_sums(set_aside, n_aside, &ya, &za);
    *sa_out = hsum_pd(sa);
    *y_out = hsum_pd(y) + ya;
    *z_out = hsum_pd(z) + za;
    int32_t xm[8];
    float bm[8];
    _mm256_storeu_si256((__m256i *)xm, p.xmax);
    _mm256_storeu_ps(bm, p.bmax);
    int32_t hi;
    float ehi = EXP_HI, m = bm[0];
    memcpy(&hi, &ehi, 4);
    int over = 0;
    for (int k = 0; k < 8; k++) {
        over |= xm[k] > hi;
        m = bm[k] > m ? bm[k] : m;
    }
    *over_out = over;
    *bmax_out = m;
}

/* whether ia is numpy's argmax of b given its maximum bmax (for rows without NaN): b[ia] is the
 * maximum and no earlier entry equals it */
static int is_first_max(const float *b, int64_t ia, float bmax) {
    if (!(b[ia] == bmax)) return 0;
    const __m256 m = _mm256_set1_ps(bmax);
    int64_t i = 0;
    for (; i + 8 <= ia; i += 8)
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(b + i), m, _CMP_EQ_OQ))) return 0;
    for (; i < ia; i++)
        if (b[i] == bmax) return 0;
    return 1;
}

static void row_pass_f16(const void *a, const float *b, int64_t v, float ka, float kb, float c, float *set_aside,
                         double *sa, double *y, double *z, int *over, float *bmax) {
    row_pass_v(a, 1, b, v, ka, kb, c, set_aside, sa, y, z, over, bmax);
}

static void row_pass_f32(const void *a, const float *b, int64_t v, float ka, float kb, float c, float *set_aside,
                         double *sa, double *y, double *z, int *over, float *bmax) {
    row_pass_v(a, 0, b, v, ka, kb, c, set_aside, sa, y, z, over, bmax);
}
#endif

/* ------------------------------------------------------------------ portable path */

/* the same sums, one entry at a time (CPUs without AVX2, FMA and F16C) */
__attribute__((unused)) static void row_pass_s(const void *a, int f16, const float *b, int64_t v, float ka,
                                               float kb, float c, double *sa_out, double *y_out, double *z_out,
                                               float *xmax_out, int64_t *ib_out) {
    double sa = 0.0, y = 0.0, z = 0.0;
    float xmax = -INFINITY, bm = -INFINITY;
    int64_t ib = 0;
    for (int64_t i = 0; i < v;) {
        float fsa = 0.0f, fy = 0.0f, fz = 0.0f;
        for (int k = 0; k < 8 * FLUSH && i < v; k++, i++) {
            float x = load_a(a, f16, i), yb = b[i];
            if (yb > bm) { bm = yb; ib = i; }
            float sha = x - ka;
            xmax = sha > xmax ? sha : xmax;
            float ea = sha < EXP_LO ? 0.0f : exp_s(sha);
            float s = ((yb - kb) - sha) - c;
            fsa += ea;
            fy = fmaf(ea, s, fy);
            fz = fmaf(ea, t_s(s), fz);
        }
        sa += fsa;
        y += fy;
        z += fz;
    }
    *sa_out = sa;
    *y_out = y;
    *z_out = z;
    *xmax_out = xmax;
    *ib_out = ib;
}

/* ------------------------------------------------------------------ one row */

static int row(const void *a, int f16, const float *b, int64_t v, int64_t top, const int64_t *ref_tok,
               float *scratch, float *kld, float *same_top, float *delta_p, float *nll_base, float *nll_cand) {
    int64_t ia = top;
    if (ia < 0) {
#if GGK_AVX2
        ia = argmax_v(a, f16, v);
#else
        ia = argmax_numpy_a(a, f16, v);
#endif
    }
    float ka = ceilf(load_a(a, f16, ia)), kb = ceilf(b[ia]);
    float c = (b[ia] - kb) - (load_a(a, f16, ia) - ka); /* d at the top: its s is exactly 0 */
    double sa, y, z;
    int over;
#if GGK_AVX2
    float bmax;
    (f16 ? row_pass_f16 : row_pass_f32)(a, b, v, ka, kb, c, scratch, &sa, &y, &z, &over, &bmax);
#else
    float xmax;
    int64_t ib;
    (void)scratch;
    row_pass_s(a, f16, b, v, ka, kb, c, &sa, &y, &z, &xmax, &ib);
    over = !(xmax <= EXP_HI);
#endif
    y /= sa;
    z /= sa;
    double l1 = log1p(y + z); /* log sum p e^s */
    double k = l1 - y;
    double log_sa = log(sa);
    double lse_a = (double)ka + log_sa;
    double lse_b = (double)kb + (double)c + log_sa + l1;
    if (over || !isfinite(k) || !isfinite(lse_b) || !isfinite(lse_a) || !isfinite(c)) {
        /* left to the caller's float64 fallback; same_top with numpy's argmax semantics */
        *same_top = argmax_numpy_a(b, 0, v) == ia ? 1.0f : 0.0f;
        return 1;
    }
    *kld = (float)k;
#if GGK_AVX2
    *same_top = is_first_max(b, ia, bmax) ? 1.0f : 0.0f;
#else
    *same_top = ib == ia ? 1.0f : 0.0f;
#endif
    if (ref_tok) {
        int64_t tok = *ref_tok;
        double nb = lse_a - (double)load_a(a, f16, tok);
        double nc = lse_b - (double)b[tok];
        *nll_base = (float)nb;
        *nll_cand = (float)nc;
        *delta_p = (float)(exp(-nc) - exp(-nb));
    }
    return 0;
}

/* Rows 0..n of a (float16 when a_f16, else float32; row stride a_stride elements) and b (float32,
 * stride b_stride). base_top, ref: per-row token ids or NULL. Outputs per row; bad[r] = 1 where the
 * caller must redo the row in float64. scratch: 2 * vp floats, vp = v rounded up to 8. Returns the
 * number of bad rows. */
int64_t ggk_kld_rows(int64_t n, int64_t v, const void *a, int64_t a_stride, int a_f16, const float *b,
                     int64_t b_stride, const int64_t *base_top, const int64_t *ref, float *kld, float *same_top,
                     float *delta_p, float *nll_base, float *nll_cand, uint8_t *bad, float *scratch) {
    int64_t n_bad = 0;
    size_t esz = a_f16 ? 2 : 4;
    for (int64_t r = 0; r < n; r++) {
        const void *ar = (const char *)a + (size_t)r * (size_t)a_stride * esz;
        int k = row(ar, a_f16, b + r * b_stride, v, base_top ? base_top[r] : -1, ref ? ref + r : NULL, scratch,
                    kld + r, same_top + r, delta_p + r, nll_base + r, nll_cand + r);
        bad[r] = (uint8_t)k;
        n_bad += k;
    }
    return n_bad;
}

/* ggk_kld_rows for one of several threads that share rows 0..n: each takes the next `step` rows
 * from the shared counter *next (atomically) until none are left, so a thread that is ahead takes
 * more, and the caller pays one foreign call per thread instead of one per block (a Python-level
 * call per block held the GIL long enough to stall the other thread: ~8% at 2 threads). Row r
 * of every array is where ggk_kld_rows expects it; the same outputs as one ggk_kld_rows call. */
int64_t ggk_kld_rows_shared(int64_t n, int64_t v, const void *a, int64_t a_stride, int a_f16, const float *b,
                            int64_t b_stride, const int64_t *base_top, const int64_t *ref, float *kld,
                            float *same_top, float *delta_p, float *nll_base, float *nll_cand, uint8_t *bad,
                            float *scratch, int64_t *next, int64_t step) {
    int64_t n_bad = 0;
    size_t esz = a_f16 ? 2 : 4;
    if (step < 1) step = 1;
    for (;;) {
        int64_t r0 = __atomic_fetch_add(next, step, __ATOMIC_RELAXED);
        if (r0 >= n) break;
        int64_t k = n - r0 < step ? n - r0 : step;
        n_bad += ggk_kld_rows(k, v, (const char *)a + (size_t)r0 * (size_t)a_stride * esz, a_stride, a_f16,
                              b + r0 * b_stride, b_stride, base_top ? base_top + r0 : NULL, ref ? ref + r0 : NULL,
                              kld + r0, same_top + r0, delta_p + r0, nll_base + r0, nll_cand + r0, bad + r0,
                              scratch);
    }
    return n_bad;
}
