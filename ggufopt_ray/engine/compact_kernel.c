/* The compact baseline encoding's per-row encoder: the compiled counterpart of
 * ggufopt_ray.metrics.encodings.CompactEncoding._encode_block, bit for bit.
 *
 * Built by ggufopt_ray/engine/kld_native.py like kld_kernel.c, with -ffp-contract=off on top of
 * its flags: every float64 expression must round exactly as numpy's elementwise operations do (no
 * fused multiply-add, no reassociation). Exactness rests on the encoder's fixed definitions
 * (see encodings.py): the exponential is _exp64 (Cody-Waite reduction, Horner's form of the
 * degree-13 Taylor series, exact scaling by 2^n), sums are _lane_sums (4 lanes, position % 4,
 * each summed in vocabulary order, then (l0 + l1) + (l2 + l3)) or left-to-right over the
 * levels, logarithms are libm's log (Python's math.log calls the same function), and rounding
 * to integer codes is nearbyint (round half to even, np.rint). The constants (exp coefficients,
 * level offsets and midpoints) come from Python, so both sides use the same doubles.
 *
 * Per row: the maximum; the row relative to it and the magnitudes of those (<= 0) values as
 * integer keys; the values of rank K (floor) and K+1 (anchor) by a 3-level radix select on the
 * keys (no sort); one pass in vocabulary order that decides each token's tier and level, keeps
 * the refined tokens' positions and accumulates every sum (AVX2: 4 float64 lanes, the lane of
 * position i being i % 4 as in _lane_sums); then the K refined tokens (8-bit codes, the top T by
 * a small insertion list, their decoded values and mass), the tilt fit, the 3-bit packing and
 * the decoded row (float32, as _decode_into writes it) for the caller's cross-entropy correction.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#define GGC_AVX2 1
#else
#define GGC_AVX2 0
#endif

#define GGC_ABI 1
#define N_LEVELS 7
#define REFINED 7
#define N_COEF 14
#define MAX_TOP 4096

/* consts layout (from Python): log2e, ln2_hi, ln2_lo, 14 exp coefficients, 7 level offsets,
 * 6 level midpoints */
enum { C_LOG2E = 0, C_LN2_HI = 1, C_LN2_LO = 2, C_COEF = 3, C_LEVELS = C_COEF + N_COEF, C_MIDS = C_LEVELS + N_LEVELS,
       N_CONSTS = C_MIDS + N_LEVELS - 1 };

int ggc_abi(void) { return GGC_ABI; }
int ggc_simd(void) { return GGC_AVX2; }
int ggc_n_consts(void) { return N_CONSTS; }

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* _exp64 for one value */
static inline double exp64(double x, const double *c) {
    if (x < -708.0) x = -708.0;
    double n = nearbyint(x * c[C_LOG2E]);
    double r = (x - n * c[C_LN2_HI]) - n * c[C_LN2_LO];
    double p = c[C_COEF];
    for (int j = 1; j < N_COEF; j++) {
        p = p * r;
        p = p + c[C_COEF + j];
    }
    return ldexp(p, (int)n);
}

#if GGC_AVX2
/* _exp64 for 4 values: p * 2^n is exact (n >= -1021, p in [0.7, 1.42]: the result is normal),
 * so it equals ldexp */
static inline __m256d exp64_v(__m256d x, const double *c) {
    x = _mm256_max_pd(x, _mm256_set1_pd(-708.0));
    __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(c[C_LOG2E])), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_sub_pd(_mm256_sub_pd(x, _mm256_mul_pd(n, _mm256_set1_pd(c[C_LN2_HI]))),
                              _mm256_mul_pd(n, _mm256_set1_pd(c[C_LN2_LO])));
    __m256d p = _mm256_set1_pd(c[C_COEF]);
    for (int j = 1; j < N_COEF; j++) p = _mm256_add_pd(_mm256_mul_pd(p, r), _mm256_set1_pd(c[C_COEF + j]));
    __m256i e = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
    __m256i scale = _mm256_slli_epi64(_mm256_add_epi64(e, _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(scale));
}

/* exp64_v of 4 vectors, interleaved (the Horner chains are latency-bound one at a time) */
static inline void exp64_x4(const float *x, double *out, const double *c) {
    const __m256d lo = _mm256_set1_pd(-708.0), l2e = _mm256_set1_pd(c[C_LOG2E]);
    const __m256d hi2 = _mm256_set1_pd(c[C_LN2_HI]), lo2 = _mm256_set1_pd(c[C_LN2_LO]);
    __m256d xs[4], n[4], r[4], p[4];
    for (int q = 0; q < 4; q++) {
        xs[q] = _mm256_max_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + 4 * q)), lo);
        n[q] = _mm256_round_pd(_mm256_mul_pd(xs[q], l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r[q] = _mm256_sub_pd(_mm256_sub_pd(xs[q], _mm256_mul_pd(n[q], hi2)), _mm256_mul_pd(n[q], lo2));
        p[q] = _mm256_set1_pd(c[C_COEF]);
    }
    for (int j = 1; j < N_COEF; j++) {
        const __m256d cj = _mm256_set1_pd(c[C_COEF + j]);
        for (int q = 0; q < 4; q++) p[q] = _mm256_add_pd(_mm256_mul_pd(p[q], r[q]), cj);
    }
    for (int q = 0; q < 4; q++) {
        __m256i e = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n[q]));
        __m256i scale = _mm256_slli_epi64(_mm256_add_epi64(e, _mm256_set1_epi64x(1023)), 52);
        _mm256_storeu_pd(out + 4 * q, _mm256_mul_pd(p[q], _mm256_castsi256_pd(scale)));
    }
}
#endif

/* (l0 + l1) + (l2 + l3) */
static inline double lane_total(const double *l) { return (l[0] + l[1]) + (l[2] + l[3]); }

/* The r-th smallest (0-based) of keys[0..n) (top bit clear), by 3 levels of radix selection on
 * bits 30..21, 20..10, 9..0; *less: how many keys are smaller. buf: room for n keys. hist0: the
 * first level's histogram (keys >> 21), which the caller counted while making the keys. */
__attribute__((noinline)) static uint32_t radix_select(const uint32_t *keys, int64_t n, int64_t r, uint32_t *buf, const uint32_t *hist0,
                             int64_t *less) {
    static const int shift[3] = {21, 10, 0};
    static const uint32_t mask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
    uint32_t hist[2048];
    const uint32_t *src = keys;
    uint32_t key = 0;
    int64_t below = 0;
    for (int lev = 0; lev < 3; lev++) {
        const int sh = shift[lev];
        const uint32_t mk = mask[lev];
        if (lev == 0) {
            memcpy(hist, hist0, sizeof hist);
        } else {
            memset(hist, 0, sizeof hist);
            for (int64_t i = 0; i < n; i++) hist[(src[i] >> sh) & mk]++;
        }
        uint32_t b = 0;
        int64_t cum = 0;
        while (cum + (int64_t)hist[b] <= r) cum += hist[b++];
        r -= cum;
        below += cum;
        key |= b << sh;
        if (lev == 2) break;
        int64_t m = 0;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = src[i];
            buf[m] = u;
            m += ((u >> sh) & mk) == b;
        }
        src = buf;
        n = m;
    }
    *less = below;
    return key;
}

/* the float value <= 0 whose magnitude has these bits (0 -> +0.0) */
static inline float neg_of_key(uint32_t key) { return key ? f32_from_bits(key | 0x80000000u) : 0.0f; }

/* the row's maximum (finite rows: no NaN) */
static float row_max_f32(const float *x, int64_t v) {
    float m = x[0];
    int64_t i = 0;
#if GGC_AVX2
    if (v >= 16) {
        __m256 m0 = _mm256_loadu_ps(x), m1 = _mm256_loadu_ps(x + 8);
        for (i = 16; i + 16 <= v; i += 16) {
            m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
            m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
        }
        float t[8];
        _mm256_storeu_ps(t, _mm256_max_ps(m0, m1));
        for (int q = 0; q < 8; q++) m = t[q] > m ? t[q] : m;
    }
#endif
    for (; i < v; i++) m = x[i] > m ? x[i] : m;
    return m;
}

typedef struct {
    double ce[4], re[4], cp[4], lr[N_LEVELS][4];
    int64_t nref, ties_left;
} pass_state;

/* one token of the pass (scalar): tier, level, sums */
static inline void pass_one(float r, int64_t i, float anchor, const float *thr, const double *c, pass_state *st,
                            uint8_t *lvl, int32_t *ridx) {
    int refined = r > anchor;
    if (!refined && r == anchor && st->ties_left > 0) {
        refined = 1;
        st->ties_left--;
    }
    double rd = (double)r, e = exp64(rd, c);
    int lane = (int)(i & 3);
    if (refined) {
        lvl[i] = REFINED;
        ridx[st->nref++] = (int32_t)i;
        st->re[lane] += e;
    } else {
        int l = 0;
        for (int j = 0; j < N_LEVELS - 1; j++) l += r < thr[j];
        lvl[i] = (uint8_t)l;
        st->ce[lane] += e;
        st->cp[lane] += e * rd;
        st->lr[l][lane] += rd;
    }
}

__attribute__((noinline)) static void main_pass(const float *rel, int64_t v, float anchor, const float *thr, const double *c, pass_state *st,
                      uint8_t *lvl, int32_t *ridx) {
    int64_t i = 0;
#if GGC_AVX2
    const __m256d va = _mm256_set1_pd((double)anchor), one = _mm256_set1_pd(1.0);
    __m256d vt[N_LEVELS - 1], lr[N_LEVELS], ce = _mm256_setzero_pd(), re = ce, cp = ce;
    for (int j = 0; j < N_LEVELS - 1; j++) vt[j] = _mm256_set1_pd((double)thr[j]);
    for (int j = 0; j < N_LEVELS; j++) lr[j] = ce;
    double eb[64];
    for (; i + 4 <= v; i += 4) {
        if (i % 64 == 0) {
            int64_t end = i + 64 <= v ? i + 64 : v;
            for (int64_t q = i; q + 16 <= end; q += 16) exp64_x4(rel + q, eb + (q - i), c);
            for (int64_t q = i + (end - i) / 16 * 16; q + 4 <= end; q += 4)
                _mm256_storeu_pd(eb + (q - i), exp64_v(_mm256_cvtps_pd(_mm_loadu_ps(rel + q)), c));
        }
        __m256d rd = _mm256_cvtps_pd(_mm_loadu_ps(rel + i));
        __m256d refm = _mm256_cmp_pd(rd, va, _CMP_GT_OQ);
        __m256d eq = _mm256_cmp_pd(rd, va, _CMP_EQ_OQ);
        int eqbits = _mm256_movemask_pd(eq);
        if (eqbits && st->ties_left > 0) {
            /* ties at the anchor: the first ones (vocabulary order) are refined */
            double mk[4];
            _mm256_storeu_pd(mk, refm);
            for (int q = 0; q < 4; q++)
                if (((eqbits >> q) & 1) && st->ties_left > 0) {
                    memset(&mk[q], 0xff, sizeof(double));
                    st->ties_left--;
                }
            refm = _mm256_loadu_pd(mk);
        }
        __m256d e = _mm256_loadu_pd(eb + (i % 64));
        re = _mm256_add_pd(re, _mm256_and_pd(refm, e));
        ce = _mm256_add_pd(ce, _mm256_andnot_pd(refm, e));
        cp = _mm256_add_pd(cp, _mm256_andnot_pd(refm, _mm256_mul_pd(e, rd)));
        __m256d level = _mm256_setzero_pd();
        for (int j = 0; j < N_LEVELS - 1; j++)
            level = _mm256_add_pd(level, _mm256_and_pd(_mm256_cmp_pd(rd, vt[j], _CMP_LT_OQ), one));
        __m256d crd = _mm256_andnot_pd(refm, rd);
        for (int j = 0; j < N_LEVELS; j++)
            lr[j] = _mm256_add_pd(lr[j], _mm256_and_pd(_mm256_cmp_pd(level, _mm256_set1_pd((double)j), _CMP_EQ_OQ), crd));
        level = _mm256_blendv_pd(level, _mm256_set1_pd((double)REFINED), refm);
        __m128i li = _mm256_cvtpd_epi32(level);
        li = _mm_packs_epi32(li, li);
        li = _mm_packus_epi16(li, li);
        int32_t packed = _mm_cvtsi128_si32(li);
        memcpy(lvl + i, &packed, 4);
        int rb = _mm256_movemask_pd(refm);
        while (rb) {
            int q = __builtin_ctz(rb);
            ridx[st->nref++] = (int32_t)(i + q);
            rb &= rb - 1;
        }
    }
    _mm256_storeu_pd(st->ce, ce);
    _mm256_storeu_pd(st->re, re);
    _mm256_storeu_pd(st->cp, cp);
    for (int j = 0; j < N_LEVELS; j++) _mm256_storeu_pd(st->lr[j], lr[j]);
#endif
    for (; i < v; i++) pass_one(rel[i], i, anchor, thr, c, st, lvl, ridx);
}

typedef struct {
    double cnt[N_LEVELS], mean[N_LEVELS], level_rel[N_LEVELS];
    int occupied[N_LEVELS], any;
} fit_state;

/* z, zmax of log_weights(b) */
static double log_weights(const fit_state *f, double b, double *z) {
    double zmax = -INFINITY;
    for (int j = 0; j < N_LEVELS; j++) {
        z[j] = f->occupied[j] ? b * f->level_rel[j] : -INFINITY;
        if (z[j] > zmax) zmax = z[j];
    }
    return f->any ? zmax : 0.0;
}

static double tilted_mean(const fit_state *f, double b, const double *c) {
    double z[N_LEVELS], w[N_LEVELS];
    double zmax = log_weights(f, b, z);
    for (int j = 0; j < N_LEVELS; j++) w[j] = f->cnt[j] * exp64(z[j] - zmax, c);
    double ws = w[0], num = w[0] * f->mean[0];
    for (int j = 1; j < N_LEVELS; j++) {
        ws += w[j];
        num += w[j] * f->mean[j];
    }
    return num / (ws > 0 ? ws : 1.0);
}

/* _fit_tilt_stats for one row */
__attribute__((noinline)) static void fit_tilt(const double *cnt, const double *sum_lp, double target, const double *level_rel, double mx,
                     double mass, const double *c, double *a_out, double *b_out) {
    fit_state f;
    int n_occ = 0;
    for (int j = 0; j < N_LEVELS; j++) {
        f.cnt[j] = cnt[j];
        f.mean[j] = sum_lp[j] / (cnt[j] > 0 ? cnt[j] : 1.0);
        f.level_rel[j] = level_rel[j];
        f.occupied[j] = cnt[j] > 0;
        n_occ += f.occupied[j];
    }
    f.any = n_occ > 0;
    int fit = n_occ >= 2;
    double lo = 0.05, hi = 20.0, b = 1.0;
    for (int it = 0; it < 40; it++) {
        b = fit ? 0.5 * (lo + hi) : 1.0;
        int up = tilted_mean(&f, b, c) < target;
        if (up) lo = b;
        else hi = b;
    }
    double z[N_LEVELS];
    double zmax = log_weights(&f, b, z);
    double s = 0.0;
    for (int j = 0; j < N_LEVELS; j++) {
        double w = f.cnt[j] * exp64(z[j] - zmax, c);
        s = j ? s + w : w;
    }
    *a_out = s > 0 ? ((log(mass) - mx) - zmax) - log(s) : 0.0;
    *b_out = b;
}

/* scratch bytes for one call at vocabulary v, K = k */
int64_t ggc_scratch_bytes(int64_t v, int64_t k) {
    return (v + 8) * 4 /* rel */ + 2 * v * 4 /* keys, buf */ + (v + 8) /* levels */ + k * 4 /* ridx */ + k * 4 /* dec of
                                                                                                        refined */
           + 4 * 2048 * 4 /* histograms */ + 64;
}

/* Rows 0..n of x (float32, row stride x_stride elements), K = k refined tokens of which T = t
 * top ones. Outputs per row r at r * (row width): codes ((3v+7)/8 bytes), mid (k), top_ids (t,
 * of id_bytes = 2 or 4), top_codes (t); row_max, mid_floor, anchor, tilt_a, tilt_b, ref_logprob
 * (when ref) at r; dec (v floats per row): the decoded row. Returns 0, or -1 on a bad argument. */
int64_t ggc_compact_rows(int64_t n, int64_t v, const float *x, int64_t x_stride, int64_t k, int64_t t,
                         const double *c, const int64_t *ref, uint8_t *codes, uint8_t *mid, void *top_ids,
                         int id_bytes, uint16_t *top_codes, float *row_max, float *mid_floor, float *anchor_out,
                         float *tilt_a, float *tilt_b, float *ref_logprob, float *dec, void *scratch) {
    if (v < 2 || k < 1 || k >= v || t < 1 || t > k || t > MAX_TOP) return -1;
    float *rel = (float *)((char *)scratch + 4 * 2048 * sizeof(uint32_t));
    uint32_t *keys = (uint32_t *)(rel + v + 8);
    uint32_t *buf = keys + v;
    uint8_t *lvl = (uint8_t *)(buf + v);
    int32_t *ridx = (int32_t *)(((uintptr_t)(lvl + v + 8) + 15) & ~(uintptr_t)15);
    float *dref = (float *)(ridx + k);
    const int64_t cw = (3 * v + 7) / 8;
    double tv[MAX_TOP];
    int64_t tj[MAX_TOP];
    uint32_t (*hist4)[2048] = (uint32_t (*)[2048])scratch; /* 4 x 2048 counts */
    uint32_t hist0[2048];
    for (int64_t row = 0; row < n; row++) {
        const float *xr = x + row * x_stride;
        /* the maximum (finite rows: the caller checked) */
        float m = row_max_f32(xr, v);
        memset(hist4, 0, 4 * 2048 * sizeof(uint32_t));
        for (int64_t i = 0; i < v; i++) {
            float r = xr[i] - m;
            rel[i] = r;
            uint32_t u = bits_of(r) & 0x7fffffffu;
            keys[i] = u;
            hist4[i & 3][u >> 21]++; /* 4 copies: no store-to-load chain when bins repeat */
        }
        for (int b = 0; b < 2048; b++) hist0[b] = (hist4[0][b] + hist4[1][b]) + (hist4[2][b] + hist4[3][b]);
        /* anchor: rank K+1 (magnitude rank K from the smallest); the floor, rank K, is the
         * smallest refined value (found below) */
        int64_t less_a;
        float anchor = neg_of_key(radix_select(keys, v, k, buf, hist0, &less_a));
        float thr[N_LEVELS - 1];
        for (int j = 0; j < N_LEVELS - 1; j++) thr[j] = (float)((double)anchor - c[C_MIDS + j]);
        pass_state st;
        memset(&st, 0, sizeof st);
        st.ties_left = k - less_a;
        main_pass(rel, v, anchor, thr, c, &st, lvl, ridx);
        if (st.nref != k) return -1;
        double coarse_mass = lane_total(st.ce), refined_mass = lane_total(st.re), coarse_plp = lane_total(st.cp);
        double lse = log(coarse_mass + refined_mass);
        double mx = -lse;
        /* 3-bit codes, and the count of each level */
        uint8_t *cr = codes + row * cw;
        double cnt[N_LEVELS] = {0};
        int64_t hist[8] = {0};
        int64_t g = 0;
        for (; g + 8 <= v; g += 8) {
            uint64_t w8;
            memcpy(&w8, lvl + g, 8);
            uint32_t word = 0;
            for (int q = 0; q < 8; q++) {
                uint32_t code = (uint32_t)(w8 >> (8 * q)) & 7u;
                hist[code]++;
                word |= code << (21 - 3 * q);
            }
            cr[g / 8 * 3] = (uint8_t)(word >> 16);
            cr[g / 8 * 3 + 1] = (uint8_t)(word >> 8);
            cr[g / 8 * 3 + 2] = (uint8_t)word;
        }
        for (; g < v; g += 8) {
            uint32_t word = 0;
            for (int q = 0; q < 8; q++) {
                uint32_t code = g + q < v ? lvl[g + q] : 0;
                if (g + q < v) hist[code]++;
                word |= code << (21 - 3 * q);
            }
            int64_t o = g / 8 * 3;
            cr[o] = (uint8_t)(word >> 16);
            if (o + 1 < cw) cr[o + 1] = (uint8_t)(word >> 8);
            if (o + 2 < cw) cr[o + 2] = (uint8_t)word;
        }
        for (int j = 0; j < N_LEVELS; j++) cnt[j] = (double)hist[j];
        /* the refined tokens: the floor (their smallest value, +0.0 for zero), 8-bit codes, top T */
        float floor = rel[ridx[0]];
        for (int64_t j = 1; j < k; j++) floor = rel[ridx[j]] < floor ? rel[ridx[j]] : floor;
        floor = neg_of_key(bits_of(floor) & 0x7fffffffu);
        double floor64 = (double)floor, span = floor < 0 ? -floor64 : 1.0, s255 = span / 255, s65535 = span / 65535;
        uint8_t *mr = mid + row * k;
        int64_t nt = 0;
        for (int64_t j = 0; j < k; j++) {
            double mv = (double)rel[ridx[j]];
            mr[j] = (uint8_t)nearbyint((mv - floor64) / span * 255);
            if (nt < t || mv > tv[t - 1]) {
                int64_t p = nt < t ? nt : t - 1;
                while (p > 0 && tv[p - 1] < mv) {
                    tv[p] = tv[p - 1];
                    tj[p] = tj[p - 1];
                    p--;
                }
                tv[p] = mv;
                tj[p] = j;
                if (nt < t) nt++;
            }
        }
        double mxf = (double)(float)mx;
        for (int64_t j = 0; j < k; j++) dref[j] = (float)((floor64 + (double)mr[j] * s255) + mxf);
        uint16_t *tc = top_codes + row * t;
        for (int64_t q = 0; q < t; q++) {
            double code = nearbyint((tv[q] - floor64) / span * 65535);
            tc[q] = (uint16_t)code;
            int64_t id = ridx[tj[q]];
            if (id_bytes == 2) ((uint16_t *)top_ids)[row * t + q] = (uint16_t)id;
            else ((uint32_t *)top_ids)[row * t + q] = (uint32_t)id;
            dref[tj[q]] = (float)((floor64 + code * s65535) + mxf);
        }
        double rl[4] = {0, 0, 0, 0};
        int64_t j0 = 0;
#if GGC_AVX2
        __m256d racc = _mm256_setzero_pd();
        for (; j0 + 4 <= k; j0 += 4) racc = _mm256_add_pd(racc, exp64_v(_mm256_cvtps_pd(_mm_loadu_ps(dref + j0)), c));
        _mm256_storeu_pd(rl, racc);
#endif
        for (int64_t j = j0; j < k; j++) rl[j & 3] += exp64((double)dref[j], c);
        double ref_mass = lane_total(rl);
        /* the tilt */
        double sum_lp[N_LEVELS], level_rel[N_LEVELS], a, b;
        for (int j = 0; j < N_LEVELS; j++) {
            sum_lp[j] = lane_total(st.lr[j]) - cnt[j] * lse;
            level_rel[j] = (double)anchor - c[C_LEVELS + j];
        }
        double target = coarse_plp / (coarse_mass > 1e-300 ? coarse_mass : 1e-300) - lse;
        double mass = 1.0 - ref_mass;
        fit_tilt(cnt, sum_lp, target, level_rel, mx, mass > 1e-300 ? mass : 1e-300, c, &a, &b);
        row_max[row] = (float)mx;
        mid_floor[row] = floor;
        anchor_out[row] = anchor;
        tilt_a[row] = (float)a;
        tilt_b[row] = (float)b;
        if (ref) ref_logprob[row] = (float)((double)(xr[ref[row]] - m) - lse);
        /* the decoded row, as _decode_into writes it */
        double mxd = (double)row_max[row], ad = (double)tilt_a[row], bd = (double)tilt_b[row];
        double base = (mxd + ad) + bd * (double)anchor;
        float table[8];
        for (int j = 0; j < N_LEVELS; j++) table[j] = (float)(base - bd * c[C_LEVELS + j]);
        table[REFINED] = 0.0f;
        float *dr = dec + row * v;
        for (int64_t i = 0; i < v; i++) dr[i] = table[lvl[i]];
        for (int64_t j = 0; j < k; j++) dr[ridx[j]] = dref[j];
    }
    return 0;
}
