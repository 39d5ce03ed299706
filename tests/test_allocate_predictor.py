"""The additive predictor, its correction (recovers a known interaction), and the agreement report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ggufopt_ray.allocate.predictor import Correction, MixTable, compare, fit_correction
from ggufopt_ray.errors import UserError

TYPES = ["Q3_K", "Q4_K", "Q6_K", "Q8_0"]


def table_of(G=6, seed=0):
    rng = np.random.default_rng(seed)
    params = rng.integers(1, 5, size=G) * 1000
    nbytes = np.round(params[:, None] * np.array([3.4375, 4.5, 6.5625, 8.5])[None, :] / 8).astype(np.int64)
    sens = rng.lognormal(0, 0.6, size=G)
    delta = sens[:, None] * np.array([0.02, 0.008, 0.002, 0.0])[None, :]
    groups = [f"g{g}" for g in range(G)]
    single = {(g, t): 0.001 + delta[i, j] for i, g in enumerate(groups) for j, t in enumerate(TYPES) if t != "Q8_0"}
    return MixTable.from_measurements(groups, TYPES, nbytes, {g: "Q8_0" for g in groups}, 0.001, single,
                                      fixed_bytes=500), delta


def test_additive_prediction_and_exact_size():
    table, delta = table_of()
    mix = {"g0": "Q3_K", "g1": "q4_k", "g2": "Q8_0", "g3": "Q6_K", "g4": "Q3_K", "g5": "Q8_0"}
    idx = table.index(mix)
    by_hand = 0.001 + delta[0, 0] + delta[1, 1] + delta[3, 2] + delta[4, 0]
    assert table.additive(idx) == pytest.approx(by_hand, rel=1e-12)
    assert table.size(idx) == 500 + sum(int(table.nbytes[g, t]) for g, t in enumerate(idx))
    assert table.mix(idx) == {k: v.upper() for k, v in mix.items()}
    many = np.array([idx, table.reference_index()])
    assert table.additive(many)[1] == pytest.approx(0.001) and table.size(many)[0] == table.size(idx)
    assert Correction().predict(table, idx) == pytest.approx(by_hand, rel=1e-12)  # identity


def test_table_checks_its_reference():
    table, _ = table_of()
    bad = table.delta_kld.copy()
    bad[0, 3] = 0.1
    with pytest.raises(UserError, match="reference type"):
        MixTable(table.groups, table.types, table.nbytes, bad, table.reference, table.reference_kld)
    with pytest.raises(UserError, match="names no type"):
        table.index({"g0": "Q3_K"})


def synthetic_truth(table, a, b, scales):
    """A world in the correction's own family: exp(a) (K_ref + Σ s_g Δ)^b."""
    def kld(idx):
        p = table.reference_kld + (table.delta_kld[np.arange(len(table.groups)), idx] * scales).sum(axis=-1)
        return np.exp(a) * p ** b
    return kld


def test_correction_recovers_a_known_interaction():
    table, _ = table_of(G=6, seed=1)
    rng = np.random.default_rng(2)
    scales = np.array([1.0, 3.0, 1.0, 0.5, 1.0, 1.0])  # g1 hurts 3x more in company, g3 half
    truth = synthetic_truth(table, a=0.3, b=1.2, scales=scales)
    mixes = rng.integers(0, 4, size=(80, 6))
    measured = truth(mixes) * np.exp(0.01 * rng.standard_normal(80))
    c = fit_correction(table, mixes, measured, ridge_groups=1e-3, ridge_exponent=1e-3)
    assert c.log_scale == pytest.approx(0.3, abs=0.1)
    assert c.exponent == pytest.approx(1.2, abs=0.05)
    assert np.allclose(c.scales(6), scales, rtol=0.1)
    held_out = rng.integers(0, 4, size=(40, 6))
    after = compare(c.predict(table, held_out), truth(held_out))
    before = compare(table.additive(held_out), truth(held_out))
    assert after.median_abs_rel_error < 0.03 < before.median_abs_rel_error
    assert after.spearman > 0.99


def test_correction_with_few_points_stays_tame():
    table, _ = table_of(G=6, seed=1)
    none = fit_correction(table, [], [])
    assert (none.log_scale, none.exponent, none.group_log_scale, none.n_points) == (0.0, 1.0, None, 0)
    idx = np.array([[0, 0, 1, 2, 3, 3]])
    one = fit_correction(table, idx, [2.0 * table.additive(idx[0])])
    assert one.exponent == 1.0 and np.all(one.group_log_scale == 0)  # only the level moves, by the ratio
    assert one.log_scale == pytest.approx(math.log(2.0), rel=1e-6)
    # groups no measured mix changed keep scale 1 even when group scales are fitted
    rng = np.random.default_rng(5)
    mixes = rng.integers(0, 4, size=(8, 6))
    mixes[:, 5] = 3  # g5 always at its reference type
    c = fit_correction(table, mixes, table.additive(mixes) * rng.lognormal(0, 0.2, 8))
    assert c.scales(6)[5] == 1.0
    assert np.all(np.abs(c.group_log_scale) <= math.log(10.0) + 1e-9)
    with pytest.raises(UserError, match="positive"):
        fit_correction(table, idx, [0.0])


def test_knapsack_table_of_a_correction_is_additive_in_its_scales():
    table, _ = table_of()
    c = Correction(log_scale=0.1, exponent=1.1, group_log_scale=np.log(np.arange(1, 7, dtype=float)))
    idx = np.array([0, 1, 2, 0, 1, 2])
    p = table.reference_kld + sum((g + 1) * table.delta_kld[g, t] for g, t in enumerate(idx))
    assert c.predict(table, idx) == pytest.approx(math.exp(0.1) * p ** 1.1, rel=1e-12)


def test_compare_reports_rank_correlation_and_relative_errors():
    measured = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    predicted = np.array([1.1, 1.8, 3.3, 5.0, 4.5])  # last two swapped in rank
    r = compare(predicted, measured)
    d = np.array([0, 0, 0, 1, -1])  # rank differences, no ties: rho = 1 - 6 Σd² / (n(n²-1))
    assert r.spearman == pytest.approx(1 - 6 * (d ** 2).sum() / (5 * 24))
    rel = (predicted - measured) / measured
    assert r.median_abs_rel_error == pytest.approx(np.median(np.abs(rel)))
    assert r.max_abs_rel_error == pytest.approx(0.25) and r.mean_rel_error == pytest.approx(rel.mean())
    assert math.isnan(compare([1.0, 2.0], [1.0, 2.0]).spearman)


def test_link_scales_add_as_their_closed_forms():
    """λ = 0: relative changes multiply; λ = 1/2: square roots of KLDs add; λ = 1: KLDs add."""
    table, delta = table_of(G=5, seed=4)
    k_ref = table.reference_kld
    idx = np.array([0, 1, 3, 2, 0])
    k = [k_ref + delta[g, t] for g, t in enumerate(idx)]  # each single's KLD (Q8_0 = the reference)
    product = k_ref * np.prod([kg / k_ref for kg in k])
    roots = (math.sqrt(k_ref) + sum(math.sqrt(kg) - math.sqrt(k_ref) for kg in k)) ** 2
    plain = k_ref + sum(kg - k_ref for kg in k)
    assert Correction(link_power=0.0).predict(table, idx) == pytest.approx(product, rel=1e-12)
    assert Correction(link_power=0.5).predict(table, idx) == pytest.approx(roots, rel=1e-12)
    assert Correction(link_power=1.0).predict(table, idx) == pytest.approx(plain, rel=1e-12)
    # each scale's knapsack table is 0 at the reference and keeps the order of the singles
    for power in (0.0, 0.5):
        d = Correction(link_power=power).delta_table(table)
        assert np.all(d[:, 3] == 0.0) and np.all(np.diff(d[:, :3], axis=1) < 0)


@pytest.mark.parametrize("truth_power", [0.0, 1.0])
def test_fit_picks_the_scale_the_measurements_follow(truth_power):
    table, delta = table_of(G=6, seed=5)
    rng = np.random.default_rng(6)
    mixes = rng.integers(0, 4, size=(40, 6))
    k_ref = table.reference_kld
    singles = k_ref + delta[np.arange(6), mixes]  # [N, G]
    if truth_power == 0.0:
        truth = k_ref * np.prod(singles / k_ref, axis=1)
    else:
        truth = k_ref + (singles - k_ref).sum(axis=1)
    measured = truth * np.exp(0.01 * rng.standard_normal(len(truth)))
    c = fit_correction(table, mixes, measured, link_powers=(0.5, 1.0, 0.0))
    assert c.link_power == truth_power
    assert compare(c.predict(table, mixes), truth).median_abs_rel_error < 0.02
    few = fit_correction(table, mixes[:3], measured[:3], link_powers=(0.5, 1.0, 0.0))
    assert few.link_power == 0.5  # too few mixes to choose: the first scale
    with pytest.raises(UserError, match="link powers"):
        fit_correction(table, mixes, measured, link_powers=(2.0,))
