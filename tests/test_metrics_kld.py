"""Per-token KLD and companions against a plain float64 reference written here."""

import numpy as np
import pytest
from scipy.special import logsumexp

from ggufopt_ray.metrics.kld import TokenMetrics, kld_per_token, log_softmax


def reference(base, cand, ref):
    """Row by row, float64, textbook formulas: the independent implementation."""
    n = base.shape[0]
    out = {k: np.empty(n) for k in ("kld", "same_top", "delta_p", "nll_base", "nll_cand")}
    for i in range(n):
        a = base[i].astype(np.float64)
        b = cand[i].astype(np.float64)
        la = a - logsumexp(a)
        lb = b - logsumexp(b)
        p = np.exp(la)
        out["kld"][i] = np.sum(p * (la - lb))
        out["same_top"][i] = float(np.argmax(a) == np.argmax(b))
        out["nll_base"][i] = -la[ref[i]]
        out["nll_cand"][i] = -lb[ref[i]]
        out["delta_p"][i] = np.exp(lb[ref[i]]) - np.exp(la[ref[i]])
    return out


def make(n, v, noise, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, v))).astype(np.float32)
    cand = (logits + noise * rng.standard_normal((n, v)) + 5.0).astype(np.float32)  # + an offset
    return log_softmax(logits), cand, rng.integers(0, v, n)


@pytest.mark.parametrize("noise", [2.0, 0.5, 0.1, 0.05])
def test_matches_float64_reference(noise):
    base, cand, ref = make(48, 3001, noise, seed=1)
    got = kld_per_token(base, cand, ref)
    want = reference(base, cand, ref)
    assert want["kld"].min() > 2e-4  # KLDs of practical size: the 1e-6 claim
    np.testing.assert_allclose(got.kld, want["kld"], rtol=1e-6)
    np.testing.assert_allclose(got.nll_base, want["nll_base"], rtol=1e-6)
    np.testing.assert_allclose(got.nll_cand, want["nll_cand"], rtol=1e-6)
    np.testing.assert_allclose(got.delta_p, want["delta_p"], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(got.same_top, want["same_top"])


@pytest.mark.parametrize("noise,rtol", [(0.01, 1e-4), (1e-3, 1e-3)])
def test_small_divergences_keep_their_digits(noise, rtol):
    # KL ~5e-5 and ~5e-7: a float32 sum p*(log p - log q) has no correct digit here.
    base, cand, ref = make(32, 4096, noise, seed=2)
    got = kld_per_token(base, cand, ref)
    want = reference(base, cand, ref)
    np.testing.assert_allclose(got.kld, want["kld"], rtol=rtol)
    assert (got.kld > 0).all()


def test_distribution_against_itself_is_exactly_zero():
    base, _, ref = make(20, 5000, 0.0, seed=3)
    m = kld_per_token(base, base, ref)
    assert np.all(m.kld == 0.0)
    assert np.all(m.same_top == 1.0) and np.all(m.delta_p == 0.0)
    np.testing.assert_array_equal(m.nll_base, m.nll_cand)


def test_unnormalized_base_is_renormalized():
    base, cand, ref = make(10, 2000, 0.3, seed=4)
    a = kld_per_token(base, cand, ref)
    b = kld_per_token(base + np.float32(7.5), cand, ref)
    np.testing.assert_allclose(a.kld, b.kld, rtol=1e-5)
    np.testing.assert_allclose(a.nll_base, b.nll_base, rtol=1e-6)


def test_block_size_does_not_change_results():
    base, cand, ref = make(37, 1000, 0.2, seed=5)
    a = kld_per_token(base, cand, ref, block_elements=1000)
    b = kld_per_token(base, cand, ref, block_elements=1 << 20)
    for k, v in a.to_arrays().items():
        np.testing.assert_allclose(v, b.to_arrays()[k], rtol=1e-6, atol=1e-12)


def test_extreme_rows_fall_back_to_float64():
    base, cand, ref = make(6, 500, 0.1, seed=6)
    cand = cand.copy()
    base = base.copy()
    cand[0, 7] = base[0, 7] + 300.0  # candidate puts e^300 more mass on a token: expm1 overflows
    base[1, :10] = -np.inf  # tokens the base rules out (p = 0) contribute nothing
    got = kld_per_token(base, cand, ref)
    want = reference(np.where(np.isfinite(base), base, -1e30), cand, ref)
    np.testing.assert_allclose(got.kld, want["kld"], rtol=1e-6)
    assert got.kld[0] > 100
    cand[2, 3] = np.nan
    assert np.isnan(kld_per_token(base, cand, ref).kld[2])


def test_without_reference_tokens_the_extras_are_nan():
    base, cand, _ = make(5, 300, 0.1)
    m = kld_per_token(base, cand)
    assert np.isfinite(m.kld).all()
    assert np.isnan(m.delta_p).all() and np.isnan(m.nll_base).all() and np.isnan(m.nll_cand).all()


def test_inputs_are_checked():
    base, cand, ref = make(5, 300, 0.1)
    with pytest.raises(ValueError):
        kld_per_token(base, cand[:, :200], ref)
    with pytest.raises(ValueError):
        kld_per_token(base, cand, ref[:3])
    with pytest.raises(ValueError):
        kld_per_token(base, cand, ref + 300)


def test_reads_memory_mapped_inputs(tmp_path):
    base, cand, ref = make(9, 700, 0.3)
    np.save(tmp_path / "b.npy", base)
    np.save(tmp_path / "c.npy", cand.astype(np.float16))  # any float dtype is converted per block
    got = kld_per_token(np.load(tmp_path / "b.npy", mmap_mode="r"), np.load(tmp_path / "c.npy", mmap_mode="r"), ref)
    want = reference(base, cand.astype(np.float16).astype(np.float32), ref)
    np.testing.assert_allclose(got.kld, want["kld"], rtol=1e-6)


def test_log_softmax_matches_reference():
    rng = np.random.default_rng(7)
    x = (4 * rng.standard_normal((13, 3000)) + 20).astype(np.float32)
    got = log_softmax(x)
    want = x.astype(np.float64) - logsumexp(x.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-6)
    y = x.copy()
    assert log_softmax(y, out=y) is y
    np.testing.assert_array_equal(y, got)


def test_token_metrics_container():
    m = TokenMetrics(kld=[0.1, 0.2], same_top=[1, 0], delta_p=[0, 0.1], nll_base=[1, 2], nll_cand=[1, 3])
    assert len(m) == 2 and m.kld.dtype == np.float32
    both = TokenMetrics.concat([m, m[1:]])
    assert len(both) == 3
    again = TokenMetrics.from_arrays(both.to_arrays())
    np.testing.assert_array_equal(again.nll_cand, [1, 3, 3])
    with pytest.raises(ValueError):
        TokenMetrics(kld=[0.1], same_top=[1, 0], delta_p=[0], nll_base=[1], nll_cand=[1])
