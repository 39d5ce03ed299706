"""Early stopping: coverage with known truth, dependence on the data, restartable state.

Simulated candidates: the KLD of token t in chunk c is exp(mu + u_c + e_ct) with a chunk effect
u_c ~ N(0, su^2) and token noise e_ct ~ N(0, se^2). Over the population of chunks, log KLD is
N(mu, su^2 + se^2), so the true mean and percentiles are known in closed form.
"""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.stats import composite_from_quantiles
from ggufopt_ray.metrics.stopping import StoppingRule, StoppingState, decide, t_interval_mean, update

MU = -6.0
TOKENS = 128


def truth(target, su, se):
    s = math.hypot(su, se)
    if target == "mean":
        return math.exp(MU + s * s / 2)
    q = {f: math.exp(MU + norm.ppf(f) * s) for f in (0.5, 0.9, 0.95, 0.99)}
    return float(composite_from_quantiles(q[0.5], q[0.9], q[0.95], q[0.99]))


def run(rule, su, se, rng, max_chunks=300):
    chunks = []
    while True:
        chunks.append(np.exp(MU + su * rng.standard_normal() + se * rng.standard_normal(TOKENS)).astype(np.float32))
        d = decide(chunks, rule, n_available=max_chunks)
        if d.stop:
            return len(chunks), d


def coverage(rule, su, se, runs, seed):
    rng = np.random.default_rng(seed)
    true = truth(rule.target, su, se)
    hits, used, reasons = 0, [], set()
    for _ in range(runs):
        n, d = run(rule, su, se, rng)
        hits += d.interval.lo <= true <= d.interval.hi
        used.append(n)
        reasons.add(d.reason)
    return hits / runs, float(np.mean(used)), reasons


def test_mean_interval_coverage_is_near_nominal():
    rule = StoppingRule(target="mean", confidence=0.95, margin=0.1, min_chunks=8)
    for su, se, runs in ((0.15, 0.8, 300), (0.4, 1.2, 100)):
        cov, chunks, reasons = coverage(rule, su, se, runs=runs, seed=1)
        print(f"\nmean KLD, 95% interval, margin 10%: chunk sd {su}, token sd {se}: "
              f"coverage {cov:.3f} over {runs} runs, {chunks:.1f} chunks on average")
        assert reasons == {"precision_reached"}
        assert 0.90 <= cov <= 0.99


def test_composite_interval_coverage_is_near_nominal():
    rule = StoppingRule(target="composite", confidence=0.95, margin=0.1, min_chunks=8, n_boot=200)
    cov, chunks, _ = coverage(rule, 0.15, 0.8, runs=80, seed=2)
    print(f"\ncomposite score, 95% bootstrap interval, margin 10%: coverage {cov:.3f} over 80 runs, "
          f"{chunks:.1f} chunks on average")
    assert cov >= 0.85


def test_noisier_candidates_need_more_chunks():
    rule = StoppingRule(target="mean", margin=0.1, min_chunks=8)
    quiet = [run(rule, 0.1, 0.6, np.random.default_rng(s))[0] for s in range(30)]
    noisy = [run(rule, 0.4, 1.2, np.random.default_rng(s))[0] for s in range(30)]
    print(f"\nchunks to ±10% on the mean: quiet candidate {np.mean(quiet):.1f}, noisy {np.mean(noisy):.1f}")
    assert np.mean(noisy) > 3 * np.mean(quiet)
    assert min(quiet) >= rule.min_chunks

    rule = StoppingRule(target="composite", margin=0.1, min_chunks=8, n_boot=200)
    quiet = [run(rule, 0.1, 0.6, np.random.default_rng(s))[0] for s in range(5)]
    noisy = [run(rule, 0.3, 1.0, np.random.default_rng(s))[0] for s in range(5)]
    print(f"chunks to ±10% on the composite score: quiet {np.mean(quiet):.1f}, noisy {np.mean(noisy):.1f}")
    assert np.mean(noisy) > 2 * np.mean(quiet)


def test_scale_of_the_kld_alone_does_not_change_the_decision():
    rng = np.random.default_rng(3)
    chunks = [np.exp(MU + 0.2 * rng.standard_normal() + rng.standard_normal(TOKENS)).astype(np.float32) for _ in range(30)]
    for target in ("mean", "composite", "p99"):
        rule = StoppingRule(target=target, margin=0.15, n_boot=200)
        a = decide(chunks, rule)
        b = decide([10 * c for c in chunks], rule)
        assert a.stop == b.stop and a.reason == b.reason
        assert a.interval.rel_half_width == pytest.approx(b.interval.rel_half_width, rel=1e-5)


def test_t_interval_formula():
    rng = np.random.default_rng(4)
    chunks = [rng.exponential(size=50).astype(np.float32) for _ in range(10)]
    iv = t_interval_mean(chunks, 0.9)
    means = np.array([c.astype(np.float64).mean() for c in chunks])
    m = means.mean()
    h = student_t.ppf(0.95, 9) * means.std(ddof=1) / math.sqrt(10) / m
    assert iv.estimate == pytest.approx(m, rel=1e-6)
    assert iv.lo == pytest.approx(m * math.exp(-h), rel=1e-6)
    assert iv.hi == pytest.approx(m * math.exp(h), rel=1e-6)


def test_min_chunks_patience_and_limits():
    flat = [np.full(TOKENS, 0.01, np.float32) for _ in range(20)]  # zero variance: narrow at once
    rule = StoppingRule(target="mean", margin=0.05, min_chunks=6, patience=3)
    assert decide(flat[:5], rule).reason == "need_min_chunks"
    assert decide(flat[:6], rule).stop is False  # narrow, but only once so far
    assert decide(flat[:8], rule).reason == "precision_reached"
    assert decide(flat[:6], StoppingRule(margin=0.05, min_chunks=6, patience=1)).stop
    rng = np.random.default_rng(5)
    wild = [np.exp(3 * rng.standard_normal() + rng.standard_normal(TOKENS)).astype(np.float32) for _ in range(12)]
    d = decide(wild, StoppingRule(margin=0.01, min_chunks=4, max_chunks=12))
    assert d.stop and d.reason == "max_chunks"
    assert decide(wild[:3], StoppingRule(min_chunks=4), n_available=3).reason == "max_chunks"
    assert decide(wild, StoppingRule(margin=0.01, min_chunks=4)).reason == "continue"


def test_state_round_trips_and_a_restart_decides_the_same():
    rng = np.random.default_rng(6)
    chunks = [np.exp(MU + 0.2 * rng.standard_normal() + rng.standard_normal(TOKENS)).astype(np.float32)
              for _ in range(120)]
    rule = StoppingRule(target="composite", margin=0.12, min_chunks=5, n_boot=200, seed=9)

    def drive(state, start):
        for i in range(start, len(chunks)):
            state = update(state, chunks[: i + 1], n_available=len(chunks))
            if state.stopped:
                return state
        return state

    straight = drive(StoppingState(rule), 0)
    assert straight.stopped and straight.reason == "precision_reached"
    assert straight.stop_chunk < len(chunks)

    partial = StoppingState(rule)
    for i in range(10):
        partial = update(partial, chunks[: i + 1])
    text = json.dumps(partial.to_dict())  # what a store or checkpoint keeps
    restored = StoppingState.from_dict(json.loads(text))
    assert restored == partial
    resumed = drive(restored, restored.n_chunks)
    assert resumed == straight
    assert StoppingState.from_dict(json.loads(json.dumps(straight.to_dict()))) == straight
    # deciding again on chunks already seen (a crash between deciding and saving) changes nothing
    assert update(partial, chunks[:10]) == partial
    assert update(straight, chunks) is straight


def test_rule_validation():
    for bad in (dict(target="p42"), dict(confidence=1.0), dict(margin=0), dict(min_chunks=1),
                dict(min_chunks=10, max_chunks=5), dict(patience=0), dict(method="z"),
                dict(target="p99", method="t"), dict(n_boot=10)):
        with pytest.raises(UserError):
            StoppingRule(**bad)
    assert StoppingRule(target="score").target == "composite"
    assert StoppingRule.from_dict(StoppingRule(target="p95", margin=0.2).to_dict()) == StoppingRule(target="p95", margin=0.2)
