"""The compiled KLD kernel (engine/kld_native.py, kld_kernel.c) against float64 and the numpy kernel.

The reference here is written independently: textbook float64 log-softmax and sum p (log p - log q)
on the same (float16 or float32) inputs. Tolerances are the numpy kernel's own
(tests/test_metrics_kld.py): 1e-6 relative for KLDs of practical size, 1e-4 at ~5e-5, 1e-3 at
~5e-7.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import broad_logits
from ggufopt_ray.engine import kld_native
from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.encodings import get_encoding
from ggufopt_ray.metrics.kld import compare_rows, kld_per_token, log_softmax, row_kernel

FIELDS = ("kld", "same_top", "delta_p", "nll_base", "nll_cand")


@pytest.fixture(scope="module")
def native(kernel_cache):
    """The compiled kernel (built once into this module's own cache directory)."""
    if kld_native.library() is None:
        pytest.skip(f"compiled KLD kernel unavailable: {kld_native.why_not()}")
    yield kld_native.compare


def reference(base, cand, ref=None):
    """float64 textbook formulas on the given inputs (float16 or float32); p = 0 terms count 0."""
    a = np.asarray(base, np.float64)
    b = np.asarray(cand, np.float64)
    la = a - a.max(1, keepdims=True)
    la -= np.log(np.exp(la).sum(1, keepdims=True))
    lb = b - b.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    p = np.exp(la)
    with np.errstate(invalid="ignore"):
        kld = np.where(p > 0, p * (la - lb), 0.0).sum(1)
    out = {"kld": kld, "same_top": (a.argmax(1) == b.argmax(1)).astype(np.float64)}
    if ref is not None:
        rows = np.arange(a.shape[0])
        out["nll_base"] = -la[rows, ref]
        out["nll_cand"] = -lb[rows, ref]
        out["delta_p"] = np.exp(lb[rows, ref]) - np.exp(la[rows, ref])
    return out



def make(n, v, noise, seed=0, scale=3.0, kind="normal"):
    rng = np.random.default_rng(seed)
    if kind == "broad":
        logits = broad_logits(rng, n, v)
    else:
        logits = (scale * rng.standard_normal((n, v))).astype(np.float32)
    cand = (logits + noise * rng.standard_normal((n, v)) + 5.0).astype(np.float32)
    return log_softmax(logits), cand, rng.integers(0, v, n)


def assert_kld_close(got, want, factor=1.0):
    """The numpy kernel's tolerances by KL size: 1e-6 relative from 2e-4 up, 1e-4 from 1e-6 up, 1e-3
    below (times ``factor``)."""
    want = np.asarray(want, np.float64)
    rtol = factor * np.where(want >= 2e-4, 1e-6, np.where(want >= 1e-6, 1e-4, 1e-3))
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= rtol * np.abs(want) + 1e-12), (err / np.abs(want)).max()


def check_against_reference(got, want):
    assert_kld_close(got.kld, want["kld"])
    np.testing.assert_array_equal(got.same_top, want["same_top"])
    if "nll_base" in want:
        np.testing.assert_allclose(got.nll_base, want["nll_base"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.nll_cand, want["nll_cand"], rtol=1e-6, atol=1e-6)
        assert_delta_p_close(got.delta_p, want["delta_p"], want["nll_base"], want["nll_cand"])


def assert_delta_p_close(got, want, nll_base, nll_cand):
    """Δp is a difference of two probabilities: its error scales with them (float32 NLLs near 10)."""
    p_max = np.maximum(np.exp(-np.asarray(nll_base, np.float64)), np.exp(-np.asarray(nll_cand, np.float64)))
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= 1e-6 * np.abs(want) + 3e-6 * p_max + 1e-9), err.max()


# ----------------------------------------------------------------------------- against float64


# (V = 2 is left to the comparison with the numpy kernel: with two tokens, the float32 rounding of the
# logit differences, which both kernels share, is ~2e-6 of the KLD)
@pytest.mark.parametrize("v", [3, 7, 8, 9, 15, 17, 1000, 3001, 4096, 50021])
@pytest.mark.parametrize("noise", [2.0, 0.1])
@pytest.mark.parametrize("base_dtype", [np.float32, np.float16])
def test_matches_float64(native, v, noise, base_dtype):
    base, cand, ref = make(24, v, noise, seed=v)
    base = base.astype(base_dtype)
    got = kld_per_token(base, cand, ref, kernel=native)
    want = reference(base, cand, ref)
    check_against_reference(got, want)


@pytest.mark.parametrize("kind,scale", [("broad", 0), ("normal", 12.0), ("normal", 0.3)])  # broad, peaked, flat
@pytest.mark.parametrize("base_dtype", [np.float32, np.float16])
def test_realistic_rows_at_large_vocabularies(native, kind, scale, base_dtype):
    base, cand, ref = make(6, 131101, 0.05, seed=3, scale=scale, kind=kind)
    base = base.astype(base_dtype)
    got = kld_per_token(base, cand, ref, kernel=native)
    check_against_reference(got, reference(base, cand, ref))


def test_largest_vocabulary(native):
    base, cand, ref = make(3, 262144, 0.2, seed=4, kind="broad")
    got = kld_per_token(base.astype(np.float16), cand, ref, kernel=native)
    check_against_reference(got, reference(base.astype(np.float16), cand, ref))


@pytest.mark.parametrize("noise,rtol", [(0.01, 1e-4), (1e-3, 1e-3)])
def test_small_divergences_keep_their_digits(native, noise, rtol):
    base, cand, ref = make(32, 4096, noise, seed=2)
    got = kld_per_token(base, cand, ref, kernel=native)
    np.testing.assert_allclose(got.kld, reference(base, cand)["kld"], rtol=rtol)
    assert (got.kld > 0).all()


def test_one_token_vocabulary_gives_zero(native):
    base = np.zeros((4, 1), np.float32)
    cand = np.arange(4, dtype=np.float32)[:, None]
    m = kld_per_token(base, cand, np.zeros(4, np.int64), kernel=native)
    assert np.all(m.kld == 0) and np.all(m.same_top == 1)
    np.testing.assert_array_equal(m.nll_base, 0)
    np.testing.assert_array_equal(m.nll_cand, 0)


@pytest.mark.parametrize("v", [5, 5000, 128003])
@pytest.mark.parametrize("base_dtype", [np.float32, np.float16])
def test_distribution_against_itself_is_exactly_zero(native, v, base_dtype):
    base, _, ref = make(6, v, 0.0, seed=5)
    base = base.astype(base_dtype)
    m = kld_per_token(base, base.astype(np.float32), ref, kernel=native)
    assert np.all(m.kld == 0.0)
    assert np.all(m.same_top == 1.0) and np.all(m.delta_p == 0.0)
    np.testing.assert_array_equal(m.nll_base, m.nll_cand)


def test_non_finite_and_overflowing_rows_fall_back_to_float64(native):
    base, cand, ref = make(8, 501, 0.1, seed=6)
    base, cand = base.copy(), cand.copy()
    cand[0, 7] = base[0, 7] + 300.0  # candidate puts e^300 more mass on a token: overflows float32
    base[1, :10] = -np.inf  # tokens the base rules out (p = 0) contribute nothing
    base[2, 499] = -np.inf  # in the last, partial vector
    cand[3, 3] = -np.inf  # the candidate rules a token out: infinite KL
    cand[4, 0] = 1e30  # finite but absurd
    got = kld_per_token(base, cand, ref, kernel=native)
    want = reference(np.where(np.isfinite(base), base, -1e30), cand, ref)
    for r in (0, 1, 2, 4, 5, 6, 7):
        np.testing.assert_allclose(got.kld[r], want["kld"][r], rtol=1e-6)
        np.testing.assert_allclose(got.nll_cand[r], want["nll_cand"][r], rtol=1e-6, atol=1e-6)
    assert got.kld[0] > 100 and np.isinf(got.kld[3])
    np.testing.assert_array_equal(got.same_top, kld_per_token(base, cand, ref, kernel="numpy").same_top)
    cand[5, 3] = np.nan
    base[6, 4] = np.nan
    m = kld_per_token(base, cand, ref, kernel=native)
    assert np.isnan(m.kld[5]) and np.isnan(m.kld[6]) and np.isfinite(m.kld[7])
    np.testing.assert_array_equal(m.same_top, kld_per_token(base, cand, ref, kernel="numpy").same_top)


# ----------------------------------------------------------------------------- against the numpy kernel


@pytest.mark.parametrize("v,noise", [(2, 0.1), (13, 1.0), (3001, 0.5), (4099, 0.05), (32000, 0.2)])
@pytest.mark.parametrize("with_ref", [True, False])
def test_agrees_with_the_numpy_kernel(native, v, noise, with_ref):
    base, cand, ref = make(20, v, noise, seed=7)
    ref = ref if with_ref else None
    for b16 in (False, True):
        a = base.astype(np.float16) if b16 else base
        nat = kld_per_token(a, cand, ref, kernel=native)
        num = kld_per_token(a, cand, ref, kernel="numpy")
        assert_kld_close(nat.kld, num.kld, factor=2)  # two approximations of the same value
        np.testing.assert_array_equal(nat.same_top, num.same_top)
        for k in ("nll_base", "nll_cand"):
            np.testing.assert_allclose(getattr(nat, k), getattr(num, k), rtol=1e-6, atol=1e-6, equal_nan=True)
        if with_ref:
            assert_delta_p_close(nat.delta_p, num.delta_p, num.nll_base, num.nll_cand)
        else:
            assert np.isnan(nat.delta_p).all()


def test_base_top_and_loaders(native):
    """base_top given, a loader that is no plain array, float64 and non-contiguous candidates."""
    base, cand, ref = make(13, 2053, 0.3, seed=8)
    top = base.argmax(1)

    def loader(r0, r1, out):  # what the compact encoding's decoder looks like to compare_rows
        out[:] = base[r0:r1]
        return out

    want = kld_per_token(base, cand, ref, kernel="numpy")
    for load, c in [(loader, cand), (loader, cand.astype(np.float64)), (loader, np.asfortranarray(cand))]:
        got = compare_rows(load, c, ref, base_top=top, kernel=native, block_elements=5000)
        for k in FIELDS:
            np.testing.assert_allclose(getattr(got, k), getattr(want, k), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError):
        compare_rows(loader, cand, ref, base_top=top + 5000, kernel=native)


@pytest.mark.parametrize("name", ["exact", "float16", "llamacpp_uint16", "topk", "compact"])
def test_encodings_agree_with_the_numpy_kernel(native, name, monkeypatch):
    base, cand, ref = make(20, 4096, 0.1, seed=9)
    enc = get_encoding(name)
    encoded = enc.encode(base, ref)
    nat = enc.compare(encoded, cand, ref)
    monkeypatch.setenv(kld_native.ENV_KERNEL, "numpy")
    num = enc.compare(encoded, cand, ref)
    for k in FIELDS:
        np.testing.assert_allclose(getattr(nat, k), getattr(num, k), rtol=2e-6, atol=1e-9, equal_nan=True)


# ----------------------------------------------------------------------------- threads and selection


@pytest.mark.parametrize("threads", [2, 3])
def test_thread_count_does_not_change_results(native, threads):
    base, cand, ref = make(41, 70001, 0.1, seed=10)
    b16 = base.astype(np.float16)
    one = kld_per_token(b16, cand, ref, kernel=native)
    many = kld_per_token(b16, cand, ref, kernel=native, threads=threads)
    small_blocks = kld_per_token(b16, cand, ref, kernel=native, threads=threads, block_elements=1)
    for k in FIELDS:
        np.testing.assert_array_equal(getattr(many, k), getattr(one, k))
        np.testing.assert_array_equal(getattr(small_blocks, k), getattr(one, k))


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_sharing_rows_with_bad_ones_among_them(native, threads):
    """Threads take rows from a counter inside the kernel, several rows at a time (15 at this V,
    so 59 rows end in a partial take): every row is done once, bad rows wherever they fall are
    redone in float64, and nothing depends on which thread took which rows."""
    assert kld_native.SHARED_STEP_ELEMENTS // 4099 == 15
    base, cand, ref = make(59, 4099, 0.3, seed=12)
    base, cand = base.copy(), cand.copy()
    cand[0, 5] = base[0, 5] + 300.0  # overflows float32: float64 fallback
    cand[14, 2] = np.nan  # last row of the first take
    base[15, 9] = np.nan  # first row of the second take
    cand[58, 4098] = -np.inf  # last row, last entry: infinite KL
    one = kld_per_token(base, cand, ref, kernel=native)
    many = kld_per_token(base, cand, ref, kernel=native, threads=threads)
    for k in FIELDS:
        np.testing.assert_array_equal(getattr(many, k), getattr(one, k))
    numpy_kernel = kld_per_token(base, cand, ref, kernel="numpy")
    assert np.isnan(many.kld[14]) and np.isnan(many.kld[15]) and np.isinf(many.kld[58])
    np.testing.assert_allclose(many.kld[0], numpy_kernel.kld[0], rtol=1e-6)
    np.testing.assert_array_equal(many.same_top, numpy_kernel.same_top)
    fine = np.setdiff1d(np.arange(59), [0, 14, 15, 58])
    assert_kld_close(many.kld[fine], numpy_kernel.kld[fine])


def test_default_kernel_is_the_compiled_one(native, monkeypatch):
    monkeypatch.delenv(kld_native.ENV_KERNEL, raising=False)
    assert row_kernel() is kld_native.compare
    monkeypatch.setenv(kld_native.ENV_KERNEL, "native")
    assert row_kernel() is kld_native.compare
    monkeypatch.setenv(kld_native.ENV_KERNEL, "numpy")
    assert row_kernel() is None
    monkeypatch.setenv(kld_native.ENV_KERNEL, "fast")
    with pytest.raises(UserError, match="auto, native or numpy"):
        row_kernel()


def test_without_a_compiler_the_numpy_kernel_is_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(kld_native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(kld_native.ENV_KERNEL, raising=False)
    base, cand, ref = make(9, 1500, 0.2, seed=11)
    with caplog.at_level(logging.WARNING, logger=kld_native.__name__):
        assert row_kernel() is None
        got = kld_per_token(base, cand, ref)
        kld_per_token(base, cand, ref)
    warnings = [r for r in caplog.records if r.name == kld_native.__name__]
    # one warning, though the KLD kernel and the log-softmax kernel (which kld_per_token's
    # reference computation uses) both fell back
    assert len(warnings) == 1 and "numpy" in warnings[0].getMessage()
    want = kld_per_token(base, cand, ref, kernel="numpy")
    for k in FIELDS:
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k))
    monkeypatch.setenv(kld_native.ENV_KERNEL, "native")
    with pytest.raises(UserError) as err:
        kld_per_token(base, cand, ref)
    assert len(str(err.value).splitlines()) == 1 and "GGUFOPT_KLD_KERNEL=numpy" in str(err.value)
    assert not list((tmp_path / "cache").glob("*.so")) if (tmp_path / "cache").exists() else True


def test_concurrent_builds_share_one_library(tmp_path):
    """Two processes building into the same empty cache: both load, one library, no leftovers."""
    if kld_native._compiler() is None:
        pytest.skip("no C compiler")
    code = ("from ggufopt_ray.engine import kld_native as k; lib = k.library(); "
            "print('ok' if lib is not None else k.why_not())")
    env = {**os.environ, kld_native.ENV_CACHE: str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=str(Path(__file__).resolve().parents[1])) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(o[0].strip() == "ok" for o in outs), outs
    assert len(list(tmp_path.glob("kld_kernel-*.so"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
