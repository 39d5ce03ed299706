"""The frontier of the merge-and-prune knapsack equals brute-force enumeration of every mix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ggufopt_ray.allocate.knapsack import best_under, cells_of_best, pareto_frontier, spread
from ggufopt_ray.errors import UserError


def enumerate_all(nb, val, fixed=0):
    """(bytes, value, choice) of every mix, values summed in group order like the solver."""
    G, T = nb.shape
    out = []
    for choice in itertools.product(range(T), repeat=G):
        if any(not np.isfinite(val[g, t]) for g, t in enumerate(choice)):
            continue
        s, v = fixed, 0.0
        for g, t in enumerate(choice):
            s += int(nb[g, t])
            v += float(val[g, t])
        out.append((s, v, choice))
    return out


def brute_frontier(points):
    """Distinct (bytes, value) pairs no other mix dominates, by an O(N^2) definition check."""
    pairs = sorted({(s, v) for s, v, _ in points})
    s = np.array([p[0] for p in pairs])
    v = np.array([p[1] for p in pairs])
    no_worse = (s[None, :] <= s[:, None]) & (v[None, :] <= v[:, None])  # [i, j]: j no worse than i
    distinct = (s[None, :] != s[:, None]) | (v[None, :] != v[:, None])
    dominated = np.any(no_worse & distinct, axis=1)
    return [pair for pair, d in zip(pairs, dominated) if not d]


def random_instance(rng, integer: bool):
    G, T = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    nb = rng.integers(1, 40, size=(G, T))
    val = rng.integers(0, 25, size=(G, T)).astype(float) if integer else rng.random((G, T))
    if T > 1 and rng.random() < 0.5:  # some cells not allowed, never a whole group
        g, t = int(rng.integers(G)), int(rng.integers(T))
        val[g, t] = np.nan
    return nb, val


@pytest.mark.parametrize("integer", [True, False])
def test_frontier_equals_brute_force(integer):
    rng = np.random.default_rng(7 if integer else 8)
    for _ in range(60):
        nb, val = random_instance(rng, integer)
        points = enumerate_all(nb, val, fixed=11)
        f = pareto_frontier(nb, val, fixed_bytes=11)
        assert f.exact and f.size_slack_bytes == 0
        assert list(zip(f.nbytes.tolist(), f.value.tolist())) == brute_frontier(points)
        for i in range(len(f)):  # each point's mix really has that size and value
            c = f.choices[i]
            assert 11 + int(nb[np.arange(len(c)), c].sum()) == f.nbytes[i]
            assert sum(float(val[g, t]) for g, t in enumerate(c)) == f.value[i]
        # best under every budget = the brute-force minimum over mixes that fit
        for budget in range(min(s for s, _, _ in points) - 2, max(s for s, _, _ in points) + 2):
            fits = [v for s, v, _ in points if s <= budget]
            p = best_under(f, budget)
            assert (p is None) == (not fits)
            if fits:
                assert p.value == min(fits) and p.nbytes <= budget


def test_capped_frontier_says_it_approximated_and_keeps_its_bound():
    rng = np.random.default_rng(3)
    G, T = 6, 4
    nb = rng.integers(100, 10_000, size=(G, T))
    val = rng.random((G, T))
    exact = brute_frontier(enumerate_all(nb, val))
    f = pareto_frontier(nb, val, max_points=12)
    assert not f.exact and f.size_slack_bytes > 0 and len(f) <= 12
    for s, v in exact:  # every exact point has a stand-in at most size_slack bytes bigger, no worse
        assert any(fs <= s + f.size_slack_bytes and fv <= v + 1e-12 for fs, fv in zip(f.nbytes, f.value))
    assert pareto_frontier(nb, val, max_points=10**6).exact


def test_forty_groups_by_eight_types_is_exact():
    """The size the allocator meets on real models; timings are in the report, not asserted here."""
    rng = np.random.default_rng(0)
    bpw = np.array([2.625, 3.0625, 3.4375, 4.25, 4.5, 5.5, 6.5625, 8.5])
    params = rng.integers(10**6, 10**8, size=40)
    nb = np.round(params[:, None] * bpw[None, :] / 8).astype(np.int64)
    val = rng.lognormal(0, 1, size=(40, 1)) * params[:, None] / 1e8 * 2.0 ** (-1.5 * bpw[None, :])
    f = pareto_frontier(nb, val)
    assert f.exact and len(f) > 1000
    assert np.all(np.diff(f.nbytes) > 0) and np.all(np.diff(f.value) < 0)
    # the two ends are the all-smallest and the all-largest mixes
    assert f.nbytes[0] == nb[:, 0].sum() and f.nbytes[-1] == nb[:, -1].sum()
    idx = spread(f, 5)
    assert idx[0] == 0 and idx[-1] == len(f) - 1 and idx == sorted(idx)


def test_bad_tables_are_refused():
    with pytest.raises(UserError, match="no allowed type"):
        pareto_frontier([[1, 2]], [[np.nan, np.inf]])
    with pytest.raises(UserError, match="same"):
        pareto_frontier([[1, 2]], [[1.0]])


def test_cells_of_best_are_those_the_brute_force_best_mixes_change():
    """With continuous values (no ties), the best mix under each budget is unique; the cells it
    changes from the reference mix are what a refinement must measure better."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        nb, val = random_instance(rng, integer=False)
        G, T = nb.shape
        ref = np.array([int(np.flatnonzero(np.isfinite(val[g]))[0]) for g in range(G)])
        points = enumerate_all(nb, val, fixed=5)
        budgets = sorted(int(x) for x in rng.integers(5, 5 + 40 * G, size=3))
        want = set()
        for b in budgets:
            fits = [p for p in points if p[0] <= b]
            if fits:
                _, _, choice = min(fits, key=lambda p: (p[1], p[0]))
                want |= {(g, t) for g, t in enumerate(choice) if t != ref[g]}
        assert cells_of_best(pareto_frontier(nb, val, fixed_bytes=5), budgets, ref) == want
