"""The measure-correct loop on a synthetic world whose true KLD of every mix is known.

The world: 8 groups x 4 types (65,536 mixes, enumerated for the true optimum). Each group's
damage alone is additive-like; in company, the two groups that look *least* sensitive alone are
amplified in proportion to the total damage (errors compounding through the layers), plus a
global super-additive term. Single-group and mix measurements carry 2% noise. The uncorrected
additive predictor then degrades the amplified groups too much at some budgets.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ggufopt_ray.allocate.knapsack import best_under, pareto_frontier
from ggufopt_ray.allocate.loop import allocate_loop
from ggufopt_ray.allocate.predictor import MixTable
from ggufopt_ray.errors import UserError

G, TYPES = 8, ["Q3_K", "Q4_K", "Q5_K", "Q8_0"]
BPW = np.array([3.4375, 4.5, 5.5, 8.5])
ALL = np.array(list(itertools.product(range(4), repeat=G)))


def world(seed: int, noise: float = 0.02, amplification: float = 6.0):
    r = np.random.default_rng(seed)
    params = r.choice([1, 2, 3, 4], size=G) * 65536
    nbytes = np.round(params[:, None] * BPW[None, :] / 8).astype(np.int64)
    sens = r.lognormal(0, 0.7, size=G)
    alone = sens[:, None] * params[:, None] / 65536 * 3e-4 * (2.0 ** (-1.2 * (BPW - 8.5)) - 1)  # 0 at Q8_0
    beta = np.zeros(G)
    beta[np.argsort(sens)[:2]] = amplification
    k0 = 0.002
    sizes = nbytes[np.arange(G), ALL].sum(1)
    total = alone[np.arange(G), ALL].sum(1)
    mid = np.median(total[np.abs(sizes / np.median(sizes) - 1) < 0.05])

    def true_kld(idx):
        d = alone[np.arange(G), np.atleast_2d(idx)]
        t = d.sum(1)
        return k0 + (d * (1 + beta[None, :] * t[:, None] / mid)).sum(1) + 0.5 * t ** 2 / mid

    rng = np.random.default_rng(100 + seed)
    groups = [f"g{g}" for g in range(G)]
    reference = np.full(G, 3)
    single = {}
    for g in range(G):
        for t in range(3):
            idx = reference.copy()
            idx[g] = t
            single[(groups[g], TYPES[t])] = float(true_kld(idx)[0]) * np.exp(noise * rng.standard_normal())
    table = MixTable.from_measurements(groups, TYPES, nbytes, {g: "Q8_0" for g in groups},
                                       float(true_kld(reference)[0]), single)
    calls = []

    def measure(mix):
        calls.append(dict(mix))
        return float(true_kld(table.index(mix))[0]) * np.exp(noise * rng.standard_normal())

    lo, hi = int(sizes.min()), int(sizes.max())
    budgets = [int(lo + f * (hi - lo)) for f in (0.3, 0.45, 0.6)]
    return table, budgets, measure, true_kld, sizes, calls


@pytest.mark.parametrize("seed", [0, 3, 9])
def test_loop_finds_near_optimal_mixes_and_beats_the_uncorrected_choice(seed):
    table, budgets, measure, true_kld, sizes, calls = world(seed)
    truth = true_kld(ALL)
    res = allocate_loop(table, budgets, measure, max_measurements=24)
    assert len(calls) == len(res.measurements) - 1 <= 24  # the reference was given, not measured
    uncorrected = pareto_frontier(table.nbytes, table.delta_kld)
    ratios, ratios_uncorrected = [], []
    for b in budgets:
        optimum = truth[sizes <= b].min()
        chosen = res.best_measured_under(b)
        assert chosen.nbytes <= b and chosen.nbytes == table.size(np.array(chosen.choice))
        ratios.append(true_kld(np.array(chosen.choice))[0] / optimum)
        ratios_uncorrected.append(true_kld(best_under(uncorrected, b).choice)[0] / optimum)
    assert max(ratios) <= 1.05, ratios  # within 5% of the true optimum at every budget
    assert max(u - r for r, u in zip(ratios, ratios_uncorrected)) >= 0.04, (ratios, ratios_uncorrected)
    assert sum(ratios) < sum(ratios_uncorrected)
    # the correction's predictions, made before measuring, beat the additive model's
    assert res.overall.median_abs_rel_error < 0.5 * res.overall_additive.median_abs_rel_error
    assert res.overall.spearman > 0.85
    assert res.rounds[0].vs_measured == res.rounds[0].additive_vs_measured  # round 0: nothing fitted yet
    # the measured frontier is Pareto: bytes up, KLD down
    front = res.measured_frontier()
    assert all(a.nbytes < b.nbytes and a.measured > b.measured for a, b in zip(front, front[1:]))


def test_measurement_budget_and_batches():
    table, budgets, measure, *_ , calls = world(0, noise=0.0)
    res = allocate_loop(table, budgets, measure, max_measurements=5, per_round=3)
    assert len(calls) == 5 and "budget of 5 spent" in res.stop_reason
    assert [r.n_new for r in res.rounds] == [3, 2]
    batches = []

    def measure_batch(mixes):
        batches.append(len(mixes))
        return [measure(m) for m in mixes]

    again = allocate_loop(table, budgets, measure_batch=measure_batch, max_measurements=5, per_round=3)
    assert batches == [3, 2]
    assert [m.choice for m in again.measurements] == [m.choice for m in res.measurements]


def test_stops_when_nothing_new_is_worth_measuring():
    """With a single budget, no spread points and an exact additive world, the predicted best is
    measured in round 0 and confirmed; the loop then stops on its improvement rule."""
    table, budgets, *_ = world(1, noise=0.0)

    def additive_truth(mix):
        return float(table.additive(table.index(mix)))

    res = allocate_loop(table, budgets[:1], additive_truth, n_spread=0, max_measurements=50, patience=2)
    assert len(res.measurements) - 1 < 50
    assert "did not improve" in res.stop_reason or "nothing new" in res.stop_reason
    best = res.best_measured_under(budgets[0])
    assert best.measured == pytest.approx(best_under(pareto_frontier(table.nbytes, table.delta_kld),
                                                     budgets[0]).value + table.reference_kld)
    with pytest.raises(UserError, match="measure"):
        allocate_loop(table, budgets)
