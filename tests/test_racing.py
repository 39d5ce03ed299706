"""Racing and control-variate precision: error rates, ranking, coverage and savings by simulation.

Simulated sweep: candidate c's per-chunk mean KLD on chunk i is

    v_ci = m_c * exp(f_i - sf^2/2) * exp(e_ci - s_c^2/2),   f_i ~ N(0, sf^2), e_ci ~ N(0, s_c^2)

a shared log-normal chunk difficulty f_i (the same text for every candidate) times the
candidate's own chunk noise, so E[v_ci] = m_c exactly (the true mean is known), the chunk CV is
about 0.3 and log values correlate 0.8-0.9 between candidates (DESIGN.md "Evaluation
economics"). The baseline's per-chunk entropy is a weak control: h_i = exp(0.35 f_i + noise),
correlation about 0.45 with the candidates. Candidates start at different times (asynchronous
trials) and evaluate one chunk per time step; every running candidate is decided on after each
step from the values all candidates have at that moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.racing import (AdjustedMean, RaceEntry, RacingConfig, choose_control, chunk_order,
                                        find_dominator, paired_test, per_chunk_values, race_decision,
                                        regression_estimate, twoway_estimate)

SF = 0.27  # shared chunk difficulty (log sd)
N = 32
TYPES = dict(labels=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M"],
             means=[6e-5, 3e-4, 5e-4, 1.6e-3, 1.8e-3, 5.4e-3],
             sizes=[8.5, 6.6, 5.9, 5.2, 4.9, 4.0],
             noise=[0.08, 0.10, 0.10, 0.12, 0.12, 0.14])
# 3 types with and without an imatrix: equal sizes, the imatrix-less one 1.4x worse (dominated).
IMATRIX = dict(labels=["Q5_K_M-i", "Q5_K_M", "Q4_K_M-i", "Q4_K_M", "Q3_K_M-i", "Q3_K_M"],
               means=[5e-4, 7e-4, 1.6e-3, 2.24e-3, 5.4e-3, 7.56e-3],
               sizes=[5.9, 5.9, 4.9, 4.9, 4.0, 4.0],
               noise=[0.10, 0.10, 0.12, 0.12, 0.14, 0.14])
# Twins: equal sizes and equal means, different chunk noise: neither dominates (the hardest null).
TWINS = dict(labels=["A", "A'", "B", "B'", "C", "C'"],
             means=[5e-4, 5e-4, 1.8e-3, 1.8e-3, 5.4e-3, 5.4e-3],
             sizes=[5.9, 5.9, 4.9, 4.9, 4.0, 4.0],
             noise=[0.06, 0.16, 0.06, 0.16, 0.06, 0.16])


def chunk_values(scenario, rng, n=N):
    m = np.asarray(scenario["means"])[:, None]
    s = np.asarray(scenario["noise"])[:, None]
    f = SF * rng.standard_normal(n)
    e = s * rng.standard_normal((len(m), n))
    values = m * np.exp(f - SF ** 2 / 2) * np.exp(e - s ** 2 / 2)
    entropy = 1.4 * np.exp(0.35 * f + 0.15 * rng.standard_normal(n))
    return values, entropy


def true_front(scenario) -> list[bool]:
    m, s = scenario["means"], scenario["sizes"]
    return [not any(s[j] <= s[i] and m[j] < m[i] for j in range(len(m)) if j != i) for i in range(len(m))]


@dataclass
class RaceResult:
    chunks: list[int]
    reasons: list[str]
    adjusted: list[AdjustedMean | dict]
    values: np.ndarray


def race(scenario, cfg, rng, offsets=None, use_entropy=True) -> RaceResult:
    """One simulated sweep: returns chunks used, stop reasons and final adjusted means.

    Candidates start at different times (``offsets``), join the race in that order and, with
    ``cfg.order == "staggered"``, evaluate chunks in their own ``chunk_order``."""
    values, entropy = chunk_values(scenario, rng, cfg.max_chunks)
    k = len(values)
    labels = scenario["labels"]
    if offsets is None:
        offsets = rng.permutation([0, 1, 2, 4, 6, 9][:k])
    joined = sorted(range(k), key=lambda c: (offsets[c], c))
    orders = [chunk_order(joined.index(c), cfg.max_chunks, cfg.anchor) if cfg.order == "staggered"
              else list(range(cfg.max_chunks)) for c in range(k)]
    used = [0] * k
    reasons = ["running"] * k
    adjusted: list = [None] * k
    t = 0
    while any(r == "running" for r in reasons):
        for c in range(k):
            if reasons[c] == "running" and t >= offsets[c]:
                used[c] += 1
        entries = [RaceEntry(labels[c], scenario["sizes"][c], values[c, orders[c][:used[c]]],
                             chunk_ids=orders[c][:used[c]]) for c in range(k)]
        for c in range(k):
            if reasons[c] == "running" and used[c] > 0:
                d = race_decision(entries, labels[c], cfg, entropy if use_entropy else None)
                adjusted[c] = d.adjusted
                if d.stop:
                    reasons[c] = d.reason
        t += 1
    return RaceResult(used, reasons, adjusted, values)


def mc_bound(p, runs, z=3.0):
    return p + z * math.sqrt(p * (1 - p) / runs)


# ---------------------------------------------------------------------------------------------


def test_paired_test_and_regression_formulas_by_hand():
    b = [1.0, 2.0, 3.0, 5.0]
    w = [2.0, 2.5, 4.0, 6.5]
    n, est, upper = paired_test(b, w, 0.05)
    d = np.array(b) - np.array(w)
    from scipy.stats import t as student_t
    assert (n, est) == (4, pytest.approx(d.mean()))
    assert upper == pytest.approx(d.mean() + student_t.ppf(0.95, 3) * d.std(ddof=1) / 2)
    assert paired_test(b, w[:3], 0.05)[0] == 3  # common chunks only

    rng = np.random.default_rng(0)
    x = rng.normal(10, 2, 20)
    y = 3 + 0.5 * x[:12] + rng.normal(0, 0.3, 12)
    est = regression_estimate(y, x, 0.9, population=None, control="ref")
    xs = x[:12]
    bh = np.polyfit(xs, y, 1)[0]
    resid = y - np.polyval(np.polyfit(xs, y, 1), xs)
    s2e = (resid ** 2).sum() / 10
    var = s2e * (1 / 12 + (x.mean() - xs.mean()) ** 2 / ((xs - xs.mean()) ** 2).sum()) + bh ** 2 * x.var(ddof=1) / 20
    assert est.estimate == pytest.approx(y.mean() + bh * (x.mean() - xs.mean()))
    assert est.se == pytest.approx(math.sqrt(var))
    v_fit = s2e * (1 / 12 + (x.mean() - xs.mean()) ** 2 / ((xs - xs.mean()) ** 2).sum())
    v_ctl = bh ** 2 * x.var(ddof=1) / 20
    df = int((v_fit + v_ctl) ** 2 / (v_fit ** 2 / 10 + v_ctl ** 2 / 19))  # Satterthwaite
    assert est.slope == pytest.approx(bh) and est.df == df and est.n_control == 20
    h = student_t.ppf(0.95, df) * est.se / est.estimate
    assert (est.lo, est.hi) == (pytest.approx(est.estimate * math.exp(-h)), pytest.approx(est.estimate * math.exp(h)))
    # finite population: every chunk seen -> exact, no uncertainty
    full = regression_estimate(y, xs, 0.95, population=12)
    assert full.estimate == pytest.approx(y.mean()) and full.se == 0 and full.lo == full.hi
    # control on the same chunks only carries no information: the plain mean, n - 1 df
    same = regression_estimate(y, xs, 0.95)
    assert same.control is None and same.df == 11 and same.se == pytest.approx(y.std(ddof=1) / math.sqrt(12))


def test_dominance_needs_paired_chunks_and_a_no_larger_rival():
    cfg = RacingConfig(min_paired_chunks=3, max_chunks=32)
    good = RaceEntry("good", 4.0, [1.0, 2.0, 1.5, 3.0, 2.0, 1.2, 1.8])
    bad = RaceEntry("bad", 4.5, [2 * v for v in good.values])
    assert find_dominator([good, bad], "bad", cfg).better == "good"
    assert find_dominator([good, bad], "good", cfg) is None  # bad is larger: it cannot dominate
    big = replace(good, label="big", size=5.0)
    assert find_dominator([big, bad], "bad", cfg) is None  # the better one is larger
    late = replace(bad, values=bad.values[:2])  # two common chunks: too few
    assert find_dominator([good, late], "bad", cfg) is None
    d = race_decision([good, bad], "bad", cfg)
    assert d.stop and d.reason == "dominated_by=good" and d.dominated_by == "good"
    assert race_decision([good, bad], "good", cfg).reason == "running"


RUNS = 100
_RACES: dict = {}


def races(name):
    """Simulated sweeps, run once per module and shared by the tests below (fixed seeds)."""
    if name not in _RACES:
        scenario, cfg, seed = {"types": (TYPES, RacingConfig(), 11), "twins": (TWINS, RacingConfig(), 12),
                               "imatrix": (IMATRIX, RacingConfig(), 13),
                               # the same sweep without racing: no candidate is comparable in size
                               "imatrix-no-racing": (dict(IMATRIX, sizes=[5.9, 5.89, 4.9, 4.89, 4.0, 3.99]),
                                                     RacingConfig(order="shared"), 13),
                               "types-no-control": (TYPES, RacingConfig(control="none"), 11),
                               # every candidate in the same chunk order, the regression estimator
                               "types-shared": (TYPES, RacingConfig(order="shared"), 11),
                               "imatrix-shared": (IMATRIX, RacingConfig(order="shared"), 13)}[name]
        rng = np.random.default_rng(seed)
        _RACES[name] = (scenario, cfg, [race(scenario, cfg, rng) for _ in range(RUNS)])
    return _RACES[name]


@pytest.mark.parametrize("name", ["types", "twins", "imatrix", "imatrix-shared"])
def test_false_stops_of_front_candidates_stay_below_alpha(name):
    """(a) P(a front candidate is ever stopped as dominated) <= alpha, over all looks."""
    scenario, cfg, results = races(name)
    front = true_front(scenario)
    false_stops = runs_with_any = 0
    for res in results:
        bad = [front[c] and r.startswith("dominated_by") for c, r in enumerate(res.reasons)]
        false_stops += sum(bad)
        runs_with_any += any(bad)
    trials = sum(front) * len(results)
    rate = false_stops / trials
    print(f"\n{name}: false stops {false_stops}/{trials} front candidates ({rate:.4f}), "
          f"runs with any {runs_with_any}/{len(results)}; alpha {cfg.alpha}")
    assert rate <= mc_bound(cfg.alpha, trials)
    if name.startswith("imatrix"):  # and the dominated ones are found
        caught = sum(not front[c] and r == f"dominated_by={scenario['labels'][c - 1]}"
                     for res in results for c, r in enumerate(res.reasons))
        print(f"imatrix-less twins stopped as dominated by their imatrix twin: {caught}/{3 * len(results)}")
        # Staggered orders pair two candidates only on the chunks both happened to evaluate
        # (the shared anchor, then overlaps), so fewer are caught as dominated; the rest stop
        # by precision, which the two-way estimator reaches sooner (test_racing_saves_chunks).
        assert caught >= (0.95 if cfg.order == "shared" else 0.85) * 3 * len(results)


@pytest.mark.parametrize("name", ["types", "imatrix"])
def test_final_ranking_by_adjusted_mean_matches_the_truth(name):
    """(b) The front, ranked by reported (regression-adjusted) mean, is the true order."""
    scenario, cfg, results = races(name)
    front = [c for c, f in enumerate(true_front(scenario)) if f]
    truth = sorted(front, key=lambda c: scenario["means"][c])
    right = sum(sorted(front, key=lambda c: res.adjusted[c]["estimate"]) == truth for res in results)
    print(f"\n{name}: ranking of {len(front)} front candidates right in {right}/{len(results)} runs")
    assert right >= 0.9 * len(results)


def test_stop_time_intervals_cover_the_all_chunk_mean():
    """(c, in the race) At their stop, front candidates' intervals cover the mean over all 32
    chunks (population="finite") at the nominal 95%, within 2 points plus Monte Carlo error."""
    hits = total = 0
    for name in ("types", "imatrix"):
        scenario, cfg, results = races(name)
        front = true_front(scenario)
        for res in results:
            for c, a in enumerate(res.adjusted):
                if front[c] and res.reasons[c] == "precision_reached":
                    hits += a["lo"] <= res.values[c].mean() <= a["hi"]
                    total += 1
    cov = hits / total
    print(f"\nstop-time coverage of the all-chunk mean: {cov:.3f} over {total} intervals (nominal 0.95)")
    assert total >= 500
    assert cov >= 0.93 - 2 * math.sqrt(0.05 * 0.95 / total)


@pytest.mark.parametrize("population", ["finite", "infinite"])
def test_regression_intervals_cover_at_nominal_rate(population):
    """(c, fixed n) A candidate at n chunks with a reference on all 32: 95% intervals cover the
    truth (the 32-chunk mean, or the model mean) within 2 points; and the control shrinks SE."""
    rng = np.random.default_rng(14)
    runs = 5000
    pop = N if population == "finite" else None
    for n in (6, 10, 16):
        hits = 0
        ratio = []
        for _ in range(runs):
            v, _ = chunk_values(TYPES, rng)
            y, x = v[4], v[3]  # Q4_K_S with Q4_K_M as the fully evaluated reference
            a = regression_estimate(y[:n], x, 0.95, population=pop, control="Q4_K_M")
            truth = y.mean() if pop else TYPES["means"][4]
            hits += a.lo <= truth <= a.hi
            ratio.append(a.se / regression_estimate(y[:n], None, 0.95, population=pop).se)
        cov = hits / runs
        print(f"\n{population} population, n={n}: coverage {cov:.3f} over {runs} runs; "
              f"SE with control / without: {np.median(ratio):.2f}")
        assert abs(cov - 0.95) <= 0.02
        assert np.median(ratio) < (0.7 if pop else 0.9)


def test_racing_saves_chunks():
    """(d) Fraction of the 6 x 32 chunks evaluated: staggered orders with the two-way estimator
    against every candidate in the same order (regression on the deepest candidate), and against
    no borrowed strength at all; racing against a sweep where no two candidates are comparable."""
    frac = {}
    for name in ("types", "types-shared", "types-no-control", "imatrix", "imatrix-shared", "imatrix-no-racing"):
        scenario, cfg, results = races(name)
        frac[name] = np.mean([sum(r.chunks) for r in results]) / (len(scenario["means"]) * cfg.max_chunks)
        print(f"\n{name}: {frac[name]:.3f} of the 6 x {cfg.max_chunks} chunks evaluated")
    assert frac["types"] < frac["types-shared"] - 0.1
    assert frac["types-shared"] < frac["types-no-control"] - 0.03
    assert frac["imatrix"] < frac["imatrix-shared"]
    assert frac["imatrix-shared"] < frac["imatrix-no-racing"] - 0.15  # dominance, same orders
    assert frac["imatrix"] < 0.6


def test_twoway_intervals_cover_at_nominal_rate():
    """(c, fixed n) Six candidates in staggered orders, each at n chunks: the two-way interval of
    every candidate covers its mean over all 32 chunks at 95% within 2 points (so does the corpus
    mean with population=infinite); and it is narrower than the candidate's own chunks alone."""
    rng = np.random.default_rng(15)
    runs = 800
    for n in (4, 6, 10):
        hits = {"finite": 0, "infinite": 0}
        total = 0
        ratio = []
        for _ in range(runs):
            v, _ = chunk_values(TYPES, rng)
            orders = [chunk_order(r, N, 4)[:n] for r in range(6)]
            entries = [RaceEntry(TYPES["labels"][c], TYPES["sizes"][c], v[c, orders[c]], chunk_ids=orders[c])
                       for c in range(6)]
            for c in range(6):
                fin = twoway_estimate(entries, TYPES["labels"][c], 0.95, population=N)
                inf = twoway_estimate(entries, TYPES["labels"][c], 0.95, population=None)
                hits["finite"] += fin.lo <= v[c].mean() <= fin.hi
                hits["infinite"] += inf.lo <= TYPES["means"][c] <= inf.hi
                total += 1
                ratio.append(fin.se / regression_estimate(v[c, orders[c]], None, 0.95, population=N).se)
        for pop, h in hits.items():
            print(f"\ntwo-way, {pop} population, n={n}: coverage {h / total:.3f} over {total}; "
                  f"SE two-way / own chunks: {np.median(ratio):.2f}")
            assert abs(h / total - 0.95) <= 0.02 + 3 * math.sqrt(0.05 * 0.95 / total)
        if n > 4:  # beyond the anchor every candidate's chunks differ: strength is borrowed
            assert np.median(ratio) < 0.8


def test_twoway_of_a_candidate_on_every_chunk_is_its_own_mean():
    """A candidate that measured every chunk of a finite population borrows nothing: its estimate
    is its plain mean (float64 numpy) and it names no control, so a results table or model card
    shows its own mean and standard error instead of a zero-width interval; with the corpus as
    the target (population=None) it still borrows chunk difficulty from the others."""
    rng = np.random.default_rng(4)
    v, _ = chunk_values(TYPES, rng)
    full = RaceEntry(TYPES["labels"][0], TYPES["sizes"][0], v[0], chunk_ids=list(range(N)))
    others = [RaceEntry(TYPES["labels"][c], TYPES["sizes"][c], v[c, chunk_order(c, N, 4)[:8]],
                        chunk_ids=chunk_order(c, N, 4)[:8]) for c in range(1, 6)]
    est = twoway_estimate([full, *others], full.label, 0.95, population=N)
    assert est.control is None
    assert est.estimate == pytest.approx(float(np.mean(np.asarray(v[0], np.float64))), rel=1e-12)
    corpus = twoway_estimate([full, *others], full.label, 0.95, population=None)
    assert corpus.control == "twoway" and corpus.se > 0
    partial = twoway_estimate([full, *others], others[0].label, 0.95, population=N)
    assert partial.control == "twoway" and partial.se > 0


def test_chunk_orders_share_an_anchor_then_spread():
    """Every order is a permutation starting with the anchor; early stops of 6 candidates cover
    the chunks evenly; candidates are paired on the chunks both evaluated, whatever the order."""
    orders = [chunk_order(r, 32, 4) for r in range(6)]
    for o in orders:
        assert sorted(o) == list(range(32)) and o[:4] == [0, 1, 2, 3]
    covered = set().union(*(o[:9] for o in orders))
    assert len(covered) >= 28  # 6 x 5 staggered chunks over the 28 beyond the anchor
    assert chunk_order(3, 3, 4) == [0, 1, 2] and chunk_order(0, 10, 4) == list(range(10))
    # dominance on common chunks: b is better than a by 2x on every chunk they share
    rng = np.random.default_rng(3)
    base = rng.lognormal(0, 0.1, 32)
    oa, ob = chunk_order(0, 32, 4)[:12], chunk_order(1, 32, 4)[:12]
    a = RaceEntry("a", 5.0, 2 * base[oa], chunk_ids=oa)
    b = RaceEntry("b", 4.0, base[ob], chunk_ids=ob)
    common = sorted(set(oa) & set(ob))
    test = find_dominator([a, b], "a", RacingConfig(min_chunks=4, margin=0.1))
    assert test is not None and test.better == "b" and test.n_paired == len(common)
    assert test.estimate == pytest.approx(float(np.mean(base[common] - 2 * base[common])))
    with pytest.raises(UserError, match="chunk_order=shared"):
        RacingConfig(control="reference")


def test_one_look_is_exact_and_log_scale_is_biased_for_unequal_noise():
    """The per-look test itself: at one look and alpha 0.05, plain differences reject a true
    null at ~5%; log-ratios of equal-mean candidates with unequal noise do not."""
    runs, n = 4000, 32
    rates = {}
    for scale in ("linear", "log"):
        rej = 0
        sub = np.random.default_rng(12)
        for _ in range(runs):
            v, _ = chunk_values(TWINS, sub, n)
            # does the noisy twin A' look better than the quiet A, at level 0.05?
            rej += paired_test(v[1], v[0], 0.05, scale)[2] < 0
        rates[scale] = rej / runs
    print(f"\none look, alpha 0.05, equal means, noise 0.06 vs 0.16, {n} chunks: "
          f"linear rejects {rates['linear']:.3f}, log rejects {rates['log']:.3f}")
    # Plain differences: near nominal (a slight excess, ~0.06, comes from the skew of the noisy
    # twin's chunks; the per-look alpha of racing has a union-bound slack far larger than that).
    assert 0.035 <= rates["linear"] <= 0.07
    # Log ratios test the geometric mean: (0.16^2 - 0.06^2)/2 of bias, about 0.36 SE at 32 chunks.
    assert rates["log"] > rates["linear"] + 0.025


def test_percentile_targets_race_on_per_chunk_statistics():
    rng = np.random.default_rng(15)
    chunks = {lab: [] for lab in ("good", "bad")}
    for _ in range(12):
        f = 0.3 * rng.standard_normal()
        for lab, mu in (("good", -6.0), ("bad", -5.0)):
            chunks[lab].append(np.exp(mu + f + rng.standard_normal(200)).astype(np.float32))
    cfg = RacingConfig(target="composite", min_chunks=4, n_boot=200, max_chunks=32)
    entries = [RaceEntry(lab, 4.0, per_chunk_values(ch, "composite"), ch) for lab, ch in chunks.items()]
    d = race_decision(entries, "bad", cfg)
    assert d.reason == "dominated_by=good"
    good = race_decision(entries, "good", cfg)
    assert good.dominated_by is None and good.adjusted["n_chunks"] == 12
    with pytest.raises(UserError):
        race_decision([replace(e, chunks=None) for e in entries], "good", cfg)


def test_control_choice_and_config():
    a = RaceEntry("a", 5.0, [1.0] * 10)
    b = RaceEntry("b", 4.0, [1.0] * 20)
    c = RaceEntry("c", 5.5, [1.0] * 20)
    cfg = RacingConfig(order="shared")
    assert choose_control([a, b, c], "a", cfg)[0] == "c"  # most chunks, then nearest in size
    assert choose_control([a, b, c], "b", cfg, entropy=[1.0] * 32)[0] == "entropy"
    assert choose_control([a, b, c], "b", cfg)[0] is None
    assert choose_control([a, b, c], "a", RacingConfig(control="entropy", order="shared"),
                          entropy=[1.0] * 32)[0] == "entropy"
    assert choose_control([a, b, c], "a", RacingConfig(control="none"), entropy=[1.0] * 32)[0] is None
    assert RacingConfig.from_dict(RacingConfig(alpha=0.1).to_dict()) == RacingConfig(alpha=0.1)
    assert RacingConfig(target="score").target == "composite"
    for bad in (dict(alpha=0), dict(family="x"), dict(min_paired_chunks=1), dict(scale="sqrt"),
                dict(max_chunks=2), dict(margin=0), dict(min_chunks=2), dict(patience=0),
                dict(control="x"), dict(population="x"), dict(target="p42"), dict(max_comparisons=0),
                dict(order="x"), dict(control="entropy")):
        with pytest.raises(UserError):
            RacingConfig(**bad)
    # the cap, and "running" below it
    y = RaceEntry("y", 4.0, list(np.random.default_rng(0).lognormal(0, 0.3, 32)))
    assert race_decision([y], "y", RacingConfig(margin=0.001)).reason == "max_chunks"
    assert race_decision([replace(y, values=y.values[:9])], "y", RacingConfig(margin=0.001)).reason == "running"
