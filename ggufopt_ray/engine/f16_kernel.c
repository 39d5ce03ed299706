/* Log-softmax of logit rows, and the float16 baseline encoding of them: the compiled counterparts
 * of ggufopt_ray.metrics.kld.log_softmax and Float16Encoding's encoder, in three passes over a
 * row instead of about twenty numpy operations. The baseline pass runs this once per chunk
 * between decodes, on the engine's threads; at a 49k vocabulary the numpy encoder took ~15% of
 * the pass.
 *
 * Built by ggufopt_ray/engine/kld_native.py with the KLD kernel's flags (no -ffast-math).
 *
 * Per row x (float32), with top = numpy's argmax (the first maximum; the first NaN if any) and
 * m = x[top]:
 *
 *   e_i = exp(x_i - m) (simd_exp.h), rest = sum over i != top of e_i (float64 from float32 partial
 *   sums of FLUSH vectors; the top's exact 1 is kept out so that a peaked row keeps its small
 *   mass), L = (float) log1p(rest):
 *
 *   log-softmax        out_i = (x_i - m) - L                          (two float32 roundings)
 *   float16 encoding   x'_i = the log-softmax (from logits) or x_i (from log-probs);
 *                      code_i = float16(x'_i) (IEEE round to nearest even, F16C);
 *                      d_i = x'_i - code_i (exact), M_k = (sum_{i != top} e_i d_i^k + d_top^k) / (1 + rest),
 *                      xent_correction = N / (1 + w) + log1p(w) with N = M1 - M2 + M3/2 - M4/6,
 *                      w = -M1 + M2/2 - M3/6 + M4/24 (encodings.Float16Encoding says why);
 *                      ref_logprob = x'_ref - logsumexp(x') with logsumexp(x') = log1p(rest) - L
 *                      (from logits) or m + log1p(rest).
 *
 * Both functions compute top, m, rest and L by the same code, so the codes of the encoding from
 * logits are exactly float16 of this log-softmax (as with the numpy pair). Rows whose codes or
 * correction are not finite are flagged in bad[] (the caller raises).
 */

#include <stddef.h>

#include "simd_rows.h"

#define GGF_ABI 1
#define FLUSH 8 /* vectors summed in float32 before the float64 accumulators take them */

int ggf_abi(void) { return GGF_ABI; }
int ggf_simd(void) { return GG_AVX2; }

#if GG_AVX2

/* sum over i != top of exp(x_i - m); e_out (when not NULL, room for v rounded up to 8) gets
 * every e_i, the top's as 0 */
static double exp_pass(const float *x, int64_t v, float m, int64_t top, float *e_out) {
    const __m256 vm = _mm256_set1_ps(m);
    const int64_t full = v & ~(int64_t)7, tv = top & ~(int64_t)7;
    const __m256 top_lane = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int32_t)(top - tv))));
    __m256d acc = _mm256_setzero_pd();
    __m256 part = _mm256_setzero_ps();
    int k = 0;
    for (int64_t i = 0; i < v; i += 8) {
        __m256 xv = i < full ? _mm256_loadu_ps(x + i) : load_tail(x, 0, i, v, -INFINITY);
        __m256 e = exp_fast_v(_mm256_sub_ps(xv, vm));
        if (i == tv) e = _mm256_andnot_ps(top_lane, e);
        if (e_out) _mm256_storeu_ps(e_out + i, e);
        part = _mm256_add_ps(part, e);
        if (++k == FLUSH) {
            acc = widen_add(acc, part);
            part = _mm256_setzero_ps();
            k = 0;
        }
    }
    return hsum_pd(widen_add(acc, part));
}

/* float16 codes of x' (see the top of the file) and the sums sum_i e_i d_i^k, k = 1..4 */
static void code_pass(const float *x, int64_t v, float m, float lsum, int from_logits, const float *e,
                      uint16_t *codes, double mom[4]) {
    const __m256 vm = _mm256_set1_ps(m), vl = _mm256_set1_ps(lsum);
    const int64_t full = v & ~(int64_t)7;
    __m256d a1 = _mm256_setzero_pd(), a2 = a1, a3 = a1, a4 = a1;
    __m256 p1 = _mm256_setzero_ps(), p2 = p1, p3 = p1, p4 = p1;
    int k = 0;
    for (int64_t i = 0; i < v; i += 8) {
        __m256 r = i < full ? _mm256_loadu_ps(x + i) : load_tail(x, 0, i, v, 0.0f);
        __m256 xv = from_logits ? _mm256_sub_ps(_mm256_sub_ps(r, vm), vl) : r;
        __m128i h = _mm256_cvtps_ph(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (i < full) {
            _mm_storeu_si128((__m128i *)(codes + i), h);
        } else {
            uint16_t buf[8];
            _mm_storeu_si128((__m128i *)buf, h);
            for (int64_t j = i; j < v; j++) codes[j] = buf[j - i];
        }
        __m256 d = _mm256_sub_ps(xv, _mm256_cvtph_ps(h));
        __m256 t = _mm256_mul_ps(_mm256_loadu_ps(e + i), d); /* padding lanes: e = 0, d finite */
        p1 = _mm256_add_ps(p1, t);
        t = _mm256_mul_ps(t, d);
        p2 = _mm256_add_ps(p2, t);
        t = _mm256_mul_ps(t, d);
        p3 = _mm256_add_ps(p3, t);
        p4 = _mm256_fmadd_ps(t, d, p4);
        if (++k == FLUSH) {
            a1 = widen_add(a1, p1);
            a2 = widen_add(a2, p2);
            a3 = widen_add(a3, p3);
            a4 = widen_add(a4, p4);
            p1 = p2 = p3 = p4 = _mm256_setzero_ps();
            k = 0;
        }
    }
    mom[0] = hsum_pd(widen_add(a1, p1));
    mom[1] = hsum_pd(widen_add(a2, p2));
    mom[2] = hsum_pd(widen_add(a3, p3));
    mom[3] = hsum_pd(widen_add(a4, p4));
}

/* out = (x - m) - lsum */
static void normalize_pass(const float *x, int64_t v, float m, float lsum, float *out) {
    const __m256 vm = _mm256_set1_ps(m), vl = _mm256_set1_ps(lsum);
    int64_t i = 0;
    for (; i + 8 <= v; i += 8)
        _mm256_storeu_ps(out + i, _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vl));
    for (; i < v; i++) out[i] = (x[i] - m) - lsum;
}

#else /* portable: the same definitions one entry at a time */

static double exp_pass(const float *x, int64_t v, float m, int64_t top, float *e_out) {
    double acc = 0.0;
    for (int64_t i = 0; i < v;) {
        float part = 0.0f;
        for (int k = 0; k < 8 * FLUSH && i < v; k++, i++) {
            float z = x[i] - m;
            float e = i == top ? 0.0f : exp_s(z);
            if (e_out) e_out[i] = e;
            part += e;
        }
        acc += part;
    }
    return acc;
}

static uint16_t f2h(float f) {
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static void code_pass(const float *x, int64_t v, float m, float lsum, int from_logits, const float *e,
                      uint16_t *codes, double mom[4]) {
    double a[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < v; i++) {
        float xv = from_logits ? (x[i] - m) - lsum : x[i];
        codes[i] = f2h(xv);
        float d = xv - h2f(codes[i]);
        float t = e[i] * d;
        a[0] += t;
        t *= d;
        a[1] += t;
        t *= d;
        a[2] += t;
        a[3] += t * d;
    }
    for (int k = 0; k < 4; k++) mom[k] = a[k];
}

static void normalize_pass(const float *x, int64_t v, float m, float lsum, float *out) {
    for (int64_t i = 0; i < v; i++) out[i] = (x[i] - m) - lsum;
}

#endif

/* numpy's argmax of a float32 row */
static inline int64_t row_argmax(const float *x, int64_t v) {
#if GG_AVX2
    return argmax_v(x, 0, v);
#else
    return argmax_numpy_a(x, 0, v);
#endif
}

static inline float log_sum_of(double rest) { return (float)log1p(rest); }

/* Log-softmax of rows 0..n of x (row stride x_stride floats) into out (stride out_stride; may be
 * x itself). */
void ggf_log_softmax_rows(int64_t n, int64_t v, const float *x, int64_t x_stride, float *out, int64_t out_stride) {
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * x_stride;
        int64_t top = row_argmax(xr, v);
        float m = xr[top];
        /* a NaN or an infinite maximum: a row of NaN, as numpy's formula gives */
        float lsum = isfinite(m) ? log_sum_of(exp_pass(xr, v, m, top, NULL)) : NAN;
        normalize_pass(xr, v, m, lsum, out + r * out_stride);
    }
}

/* The float16 encoding of rows 0..n of x: logits (from_logits) or log-probs. Outputs per row:
 * codes (stride codes_stride), corr, top, ref_lp (when ref is not NULL), bad. scratch: v rounded
 * up to 8 floats. Returns the number of bad rows. */
int64_t ggf_f16_encode_rows(int64_t n, int64_t v, const float *x, int64_t x_stride, int from_logits,
                            const int64_t *ref, uint16_t *codes, int64_t codes_stride, float *corr, int64_t *top_out,
                            float *ref_lp, uint8_t *bad, float *scratch) {
    int64_t n_bad = 0;
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * x_stride;
        uint16_t *cr = codes + r * codes_stride;
        int64_t top = row_argmax(xr, v);
        float m = xr[top];
        double rest = exp_pass(xr, v, m, top, scratch);
        float lsum = log_sum_of(rest);
        double mom[4];
        code_pass(xr, v, m, lsum, from_logits, scratch, cr, mom);
        /* the top's term in float64; its code is x_top rounded to float16 (code_pass wrote it) */
        float x_top = from_logits ? (xr[top] - m) - lsum : xr[top];
        double d_top = (double)x_top - (double)h2f(cr[top]);
        double s = 1.0 + rest, dk = 1.0, mk[4];
        for (int k = 0; k < 4; k++) {
            dk *= d_top;
            mk[k] = (mom[k] + dk) / s;
        }
        double num = mk[0] - mk[1] + mk[2] / 2 - mk[3] / 6;
        double w = -mk[0] + mk[1] / 2 - mk[2] / 6 + mk[3] / 24;
        double c = num / (1 + w) + log1p(w);
        corr[r] = (float)c;
        top_out[r] = top;
        int is_bad = !isfinite(c) || !isfinite(m);
        if (ref) {
            int64_t t = ref[r];
            float x_ref = from_logits ? (xr[t] - m) - lsum : xr[t];
            double lse = from_logits ? log1p(rest) - (double)lsum : (double)m + log1p(rest);
            ref_lp[r] = (float)((double)x_ref - lse);
        }
        bad[r] = (uint8_t)is_bad;
        n_bad += is_bad;
    }
    return n_bad;
}
