"""Chunk and overall statistics against independent computations written here."""

import json
import math
import statistics

import numpy as np
import pytest

from ggufopt_ray.metrics.kld import TokenMetrics, kld_per_token, log_softmax
from ggufopt_ray.metrics.stats import (
    KLDSummary, RunSummary, bootstrap_interval, chunk_bootstrap, chunk_mean_se, composite_score,
    percentile, summarize, summarize_chunks, t_quantile,
)


def llama_percentile(values, fraction):
    """llama.cpp's lambda, transcribed: sort, p = fraction*(n-1), linear between neighbours."""
    v = sorted(float(x) for x in values)
    if fraction <= 0:
        return v[0]
    if fraction >= 1:
        return v[-1]
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)]


def llama_mean_and_uncertainty(s, s2, n):
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def token_metrics(n=3000, v=512, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    logits = (2.5 * rng.standard_normal((n, v))).astype(np.float32)
    cand = (logits + noise * rng.standard_normal((n, v))).astype(np.float32)
    base = log_softmax(logits)
    ref = np.array([rng.choice(v, p=np.exp(base[i].astype(np.float64)) / np.exp(base[i].astype(np.float64)).sum())
                    for i in range(n)])
    return kld_per_token(base, cand, ref)


@pytest.fixture(scope="module")
def tm():
    return token_metrics()


def test_percentiles_match_llama_cpp_and_numpy(tm):
    v = np.sort(tm.kld)
    for q in (0.0, 0.001, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        want = llama_percentile(tm.kld, q)
        assert percentile(v, q) == pytest.approx(want, rel=1e-6)
        assert percentile(v, q) == pytest.approx(float(np.percentile(tm.kld.astype(np.float64), 100 * q)), rel=1e-6)
    assert math.isnan(percentile(np.array([]), 0.5))


def test_summary_matches_llama_cpp_formulas(tm):
    s = summarize(tm)
    n = len(tm)
    k = tm.kld.astype(np.float64)
    mean, se = llama_mean_and_uncertainty(k.sum(), (k * k).sum(), n)
    assert s.n_tokens == n
    assert s.kld_mean == pytest.approx(mean, rel=1e-6)
    assert s.kld_mean_se == pytest.approx(se, rel=1e-6)
    for name, q in (("kld_median", 0.5), ("kld_p90", 0.9), ("kld_p95", 0.95), ("kld_p99", 0.99), ("kld_p999", 0.999)):
        assert getattr(s, name) == pytest.approx(llama_percentile(tm.kld, q), rel=1e-6)
    assert s.kld_min == pytest.approx(k.min(), rel=1e-6) and s.kld_max == pytest.approx(k.max(), rel=1e-6)

    nb, nc = tm.nll_base.astype(np.float64), tm.nll_cand.astype(np.float64)
    lb, lb_se = llama_mean_and_uncertainty(nb.sum(), (nb * nb).sum(), n)
    lc, lc_se = llama_mean_and_uncertainty(nc.sum(), (nc * nc).sum(), n)
    cov = ((nb * nc).sum() / n - (nb.sum() / n) * (nc.sum() / n)) / (n - 1)
    assert s.ppl_base == pytest.approx(math.exp(lb), rel=1e-6)
    assert s.ppl_cand == pytest.approx(math.exp(lc), rel=1e-6)
    assert s.ppl_base_se == pytest.approx(math.exp(lb) * lb_se, rel=1e-6)
    assert s.ppl_cand_se == pytest.approx(math.exp(lc) * lc_se, rel=1e-6)
    assert s.ln_ppl_ratio == pytest.approx(lc - lb, rel=1e-6)
    assert s.ln_ppl_ratio_se == pytest.approx(math.sqrt(lc_se ** 2 + lb_se ** 2 - 2 * cov), rel=1e-5)
    assert s.nll_correlation == pytest.approx(cov / (lb_se * lc_se), rel=1e-5)

    top = tm.same_top.astype(np.float64).mean()
    assert s.same_top == pytest.approx(top, rel=1e-12)
    assert s.same_top_se == pytest.approx(math.sqrt(top * (1 - top) / (n - 1)), rel=1e-12)

    dp = tm.delta_p.astype(np.float64)
    mse, mse_se = llama_mean_and_uncertainty((dp ** 2).sum(), (dp ** 4).sum(), n)
    assert s.delta_p_rms == pytest.approx(math.sqrt(mse), rel=1e-6)
    assert s.delta_p_rms_se == pytest.approx(0.5 / math.sqrt(mse) * mse_se, rel=1e-6)
    dmean, dse = llama_mean_and_uncertainty(dp.sum(), (dp ** 2).sum(), n)
    assert s.delta_p_mean == pytest.approx(dmean, rel=1e-6, abs=1e-12)
    assert s.delta_p_mean_se == pytest.approx(dse, rel=1e-6)


def test_composite_score_formula():
    rng = np.random.default_rng(3)
    k = rng.lognormal(-5, 1, 5000).astype(np.float32)
    q = {f: llama_percentile(k, f) for f in (0.5, 0.9, 0.95, 0.99)}
    want = q[0.5] ** (1 / 3) * (q[0.99] + 4 * q[0.95] + 5 * q[0.9]) ** (2 / 3)
    assert composite_score(k) == pytest.approx(want, rel=1e-6)
    assert summarize(TokenMetrics(kld=k, same_top=np.ones_like(k), delta_p=0 * k, nll_base=k, nll_cand=k)).composite \
        == pytest.approx(want, rel=1e-6)


def expanded(chunks, counts):
    return np.concatenate([np.tile(c, int(w)) for c, w in zip(chunks, counts)])


@pytest.mark.parametrize("stat", ["mean", "median", "p90", "p99", "composite"])
def test_chunk_bootstrap_equals_explicit_resampling(stat):
    rng = np.random.default_rng(4)
    chunks = [rng.exponential(size=rng.integers(3, 40)).astype(np.float32) for _ in range(9)]
    reps = chunk_bootstrap(chunks, stat, n_boot=40, seed=11)
    weights = np.random.default_rng(11).multinomial(9, np.full(9, 1 / 9), size=40)
    for r, w in zip(reps, weights):
        x = expanded(chunks, w)
        if stat == "mean":
            want = x.astype(np.float64).mean()
        elif stat == "composite":
            want = composite_score(x)
        else:
            want = llama_percentile(x, {"median": 0.5, "p90": 0.9, "p99": 0.99}[stat])
        assert r == pytest.approx(want, rel=1e-9)
    np.testing.assert_array_equal(reps, chunk_bootstrap(chunks, stat, n_boot=40, seed=11))


def test_chunk_mean_se_is_the_cluster_formula():
    rng = np.random.default_rng(5)
    chunks = [rng.exponential(scale=rng.uniform(0.5, 2), size=rng.integers(10, 30)) for _ in range(12)]
    s = np.array([c.sum() for c in chunks])
    n = np.array([c.size for c in chunks])
    m = s.sum() / n.sum()
    want = math.sqrt(12 / 11 * ((s - m * n) ** 2).sum()) / n.sum()
    assert chunk_mean_se([c.astype(np.float32) for c in chunks]) == pytest.approx(want, rel=1e-6)
    # equal chunk sizes: the standard error of the chunk means
    eq = [rng.exponential(size=20).astype(np.float32) for _ in range(8)]
    means = np.array([c.astype(np.float64).mean() for c in eq])
    assert chunk_mean_se(eq) == pytest.approx(means.std(ddof=1) / math.sqrt(8), rel=1e-6)


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(6)
    chunks = [rng.lognormal(-6, 1, 64).astype(np.float32) for _ in range(20)]
    lo, hi = bootstrap_interval(chunks, "composite", 0.95, 300, seed=1)
    est = composite_score(np.concatenate(chunks))
    assert lo < est < hi
    assert (lo, hi) == bootstrap_interval(chunks, "composite", 0.95, 300, seed=1)
    plo, phi = bootstrap_interval(chunks, "composite", 0.95, 300, seed=1, method="percentile")
    assert plo < est < phi
    assert all(math.isnan(x) for x in bootstrap_interval(chunks[:1], "composite"))


def expected_summary(m: TokenMetrics) -> dict:
    """Every KLDSummary field from the per-token arrays, in float64 numpy written here."""
    k = m.kld.astype(np.float64)
    top = m.same_top.astype(np.float64)
    dp = m.delta_p.astype(np.float64)
    nb, nc = m.nll_base.astype(np.float64), m.nll_cand.astype(np.float64)
    n = k.size

    def mean_se(x):
        return x.mean(), x.std(ddof=1) / math.sqrt(x.size)

    # the project's percentile: linear between order statistics at q*(n-1) (numpy's "linear")
    q = {f: float(np.percentile(k, 100 * f, method="linear")) for f in (0.5, 0.9, 0.95, 0.99, 0.999)}
    kmean, kse = mean_se(k)
    t = top.mean()
    dmean, dse = mean_se(dp)
    msq, msq_se = mean_se(dp ** 2)
    lb, lb_se = mean_se(nb)
    lc, lc_se = mean_se(nc)
    ratio, ratio_se = mean_se(nc - nb)
    return {
        "n_tokens": n, "kld_mean": kmean, "kld_mean_se": kse,
        "kld_median": q[0.5], "kld_p90": q[0.9], "kld_p95": q[0.95], "kld_p99": q[0.99], "kld_p999": q[0.999],
        "kld_min": k.min(), "kld_max": k.max(),
        "composite": q[0.5] ** (1 / 3) * (q[0.99] + 4 * q[0.95] + 5 * q[0.9]) ** (2 / 3),
        "same_top": t, "same_top_se": math.sqrt(t * (1 - t) / (n - 1)),
        "delta_p_mean": dmean, "delta_p_mean_se": dse,
        "delta_p_rms": math.sqrt(msq), "delta_p_rms_se": msq_se / (2 * math.sqrt(msq)),
        "ppl_base": math.exp(lb), "ppl_base_se": math.exp(lb) * lb_se,
        "ppl_cand": math.exp(lc), "ppl_cand_se": math.exp(lc) * lc_se,
        "nll_correlation": float(np.corrcoef(nb, nc)[0, 1]),
        "ln_ppl_ratio": ratio, "ln_ppl_ratio_se": ratio_se,
    }


def assert_summary_equals(got: KLDSummary, m: TokenMetrics) -> None:
    want = expected_summary(m)
    assert set(want) == set(KLDSummary.__dataclass_fields__)
    assert got.n_tokens == want.pop("n_tokens")
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-9, abs=1e-15), key


def test_summarize_chunks_and_round_trip(tm):
    parts = [tm[i:i + 250] for i in range(0, len(tm), 250)]
    run = summarize_chunks([p.to_arrays() for p in parts], n_boot=200, seed=2)
    assert run.n_chunks == len(parts) == 12
    for got, part in zip(run.chunks, parts):
        assert_summary_equals(got, part)
    assert_summary_equals(run.overall, tm)

    # chunk-level (cluster) standard error of the mean: ratio estimator over chunks
    sums = np.array([p.kld.astype(np.float64).sum() for p in parts])
    sizes = np.array([len(p) for p in parts], np.float64)
    mean = sums.sum() / sizes.sum()
    c = len(parts)
    assert run.kld_mean_chunk_se == pytest.approx(
        math.sqrt(c / (c - 1) * ((sums - mean * sizes) ** 2).sum()) / sizes.sum(), rel=1e-9)

    # the composite's interval: estimate * exp(+-t_{C-1} * sd(log replicates)), replicates drawn
    # by resampling whole chunks explicitly (the seeded multinomial counts of the bootstrap)
    from scipy.stats import t as student_t

    counts = np.random.default_rng(2).multinomial(c, np.full(c, 1 / c), size=200)
    reps = []
    for w in counts:
        x = np.concatenate([np.tile(p.kld.astype(np.float64), int(k)) for p, k in zip(parts, w)])
        q = {f: float(np.percentile(x, 100 * f)) for f in (0.5, 0.9, 0.95, 0.99)}
        reps.append(q[0.5] ** (1 / 3) * (q[0.99] + 4 * q[0.95] + 5 * q[0.9]) ** (2 / 3))
    est = expected_summary(tm)["composite"]
    half = float(student_t.ppf(0.975, c - 1)) * float(np.std(np.log(reps), ddof=1))
    assert run.composite_lo == pytest.approx(est * math.exp(-half), rel=1e-7)
    assert run.composite_hi == pytest.approx(est * math.exp(half), rel=1e-7)
    assert run.composite_lo < run.overall.composite < run.composite_hi

    again = RunSummary.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again == run
    flat = run.to_flat_dict()
    for key in ("kld_mean", "kld_mean_se", "kld_median", "kld_p99", "composite", "composite_lo",
                "composite_hi", "same_top", "ln_ppl_ratio", "n_chunks", "kld_mean_chunk_se"):
        assert key in flat
    assert flat["kld_mean"] == run.overall.kld_mean and flat["n_chunks"] == 12
    assert KLDSummary.from_dict(run.overall.to_dict()) == run.overall


def test_missing_reference_tokens_give_nan_perplexities():
    k = np.random.default_rng(7).exponential(size=50).astype(np.float32)
    nan = np.full_like(k, np.nan)
    s = summarize(TokenMetrics(kld=k, same_top=np.ones_like(k), delta_p=nan, nll_base=nan, nll_cand=nan))
    assert math.isfinite(s.kld_mean) and math.isfinite(s.composite)
    assert math.isnan(s.ppl_base) and math.isnan(s.ln_ppl_ratio) and math.isnan(s.delta_p_rms)


@pytest.mark.parametrize("q", [0.0005, 0.025, 0.1, 0.5, 0.8, 0.975, 0.9999])
def test_t_quantile_matches_closed_forms(q):
    # df = 1 is the Cauchy distribution, df = 2 has a closed-form quantile; large df tends to the normal.
    assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-12, abs=1e-12)
    assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-12, abs=1e-12)
    z = statistics.NormalDist().inv_cdf(q)
    assert t_quantile(q, 1e7) == pytest.approx(z, rel=1e-5, abs=1e-9)


def test_t_quantile_is_symmetric_and_keeps_small_tails():
    assert t_quantile(0.975, 7.5) == pytest.approx(-t_quantile(0.025, 7.5), rel=1e-14)
    # an upper quantile for a tail probability far below float64's spacing near 1
    assert t_quantile(1 - 1e-12, 1) == pytest.approx(1 / (math.pi * 1e-12), rel=1e-3)
