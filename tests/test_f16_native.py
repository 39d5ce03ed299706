"""The compiled log-softmax and float16 encoder (engine/f16_kernel.c via engine/f16_native) against
float64/long-double truth and against the numpy path they replace.

The compiled path has its own exponential and summation order, so its log-probs may differ from
numpy's in the last float32 bit; what must hold exactly is its own contract: the codes encoded
from logits are float16 of the compiled log-softmax, and the codes encoded from log-probs are
numpy's float16 cast of them.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax as log_softmax64

from conftest import broad_logits
from ggufopt_ray.engine import f16_native, kld_native
from ggufopt_ray.metrics.encodings import float16_encoder, get_encoding
from ggufopt_ray.metrics.kld import log_softmax


@pytest.fixture(scope="module")
def native(kernel_cache):
    """The compiled encoder (built once into this module's own cache directory)."""
    enc = float16_encoder()
    if enc is None:
        pytest.skip(f"compiled float16 encoder unavailable: {kld_native._entry('f16')[1]}")
    yield enc


@pytest.fixture
def numpy_kernels(monkeypatch):
    """Run the body with GGUFOPT_KLD_KERNEL=numpy (the numpy log-softmax and encoder)."""
    def use_numpy():
        monkeypatch.setenv(kld_native.ENV_KERNEL, "numpy")
    return use_numpy



def logit_rows(kind: str, n: int, v: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "broad":
        return broad_logits(rng, n, v)
    if kind == "peaked":  # the top's probability ~1: the rest of the mass must keep its precision
        x = (2.5 * rng.standard_normal((n, v))).astype(np.float32)
        x[np.arange(n), rng.integers(0, v, n)] += 60
        return x
    if kind == "ties":  # equal maxima: numpy's argmax takes the first
        x = np.round(rng.standard_normal((n, v))).astype(np.float32)
        x[:, sorted({3 % v, v // 2, v - 1})] = 9.0
        return x
    raise ValueError(kind)


def _lsm_long(x):
    x = np.asarray(x, np.longdouble)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


@pytest.mark.parametrize("v", [1, 7, 8, 9, 1000, 49152])
@pytest.mark.parametrize("kind", ["broad", "peaked", "ties"])
def test_compiled_log_softmax_is_float64_rounded_to_float32(native, v, kind):
    x = logit_rows(kind, 6, v, seed=v)
    got = log_softmax(x)
    want = log_softmax64(x.astype(np.float64), axis=1)
    # two float32 roundings ((x - max), then - log-normalizer): within 2 ulp of each value
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 2 * ulp + 1e-7)
    inplace = x.copy()
    assert log_softmax(inplace, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, got)


def test_compiled_log_softmax_keeps_numpys_non_finite_semantics(native):
    x = logit_rows("broad", 4, 300)
    x[1, 17] = np.nan
    x[2, :5] = -np.inf
    x[3, 8] = np.inf
    got = log_softmax(x)
    assert np.isnan(got[1]).all() and np.isnan(got[3]).all()
    assert (got[2, :5] == -np.inf).all() and np.isfinite(got[2, 5:]).all()
    np.testing.assert_allclose(got[0], log_softmax64(x[0].astype(np.float64)), rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("v", [9, 1000, 49152])
@pytest.mark.parametrize("kind", ["broad", "peaked", "ties"])
def test_compiled_float16_encoding_against_long_double(native, v, kind):
    n = 16
    raw = logit_rows(kind, n, v, seed=v + 1)
    ref = np.random.default_rng(2).integers(0, v, n)
    ref[:3] = raw[:3].argmax(axis=1)
    enc = get_encoding("float16")
    x = log_softmax(raw)
    for threads in (1, 2):
        from_logits = enc.encode_logits(raw, ref, threads=threads)
        from_logprobs = enc.encode(x, ref, threads=threads)
        np.testing.assert_array_equal(from_logits["logprobs"].view(np.uint16), x.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(from_logprobs["logprobs"].view(np.uint16), x.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(from_logits["top_id"], raw.argmax(axis=1))
        np.testing.assert_array_equal(from_logprobs["top_id"], x.argmax(axis=1))
        lp, lq = _lsm_long(x), _lsm_long(from_logits["logprobs"])
        corr = (np.exp(lq) * (lp - lq)).sum(axis=1)
        for got in (from_logits, from_logprobs):
            assert np.abs(got["xent_correction"] - corr).max() <= 1e-12 + 1e-6 * np.abs(corr).max()
            np.testing.assert_allclose(got["ref_logprob"].astype(np.longdouble), lp[np.arange(n), ref],
                                       rtol=2e-6, atol=1e-18)


def test_compiled_float16_encoding_of_unnormalized_rows(native):
    """Rows that are not log-probs (positive values, offsets): numpy's float16 cast, and the
    correction against their own softmax."""
    rows = (2.5 * np.random.default_rng(5).standard_normal((8, 3000))).astype(np.float32) + np.float32(4.0)
    got = get_encoding("float16").encode(rows)
    np.testing.assert_array_equal(got["logprobs"], rows.astype(np.float16))
    lp, lq = _lsm_long(rows), _lsm_long(got["logprobs"])
    corr = (np.exp(lq) * (lp - lq)).sum(axis=1)
    assert np.abs(got["xent_correction"] - corr).max() <= 1e-12


def test_compiled_encoder_refuses_what_float16_cannot_hold_naming_the_row(native):
    enc = get_encoding("float16")
    x = log_softmax(logit_rows("broad", 5, 600, 3))
    for bad in (np.nan, -np.inf, -70000.0):
        y = x.copy()
        y[3, 17] = bad
        with pytest.raises(ValueError, match="row 3 is not"):
            enc.encode(y)
    raw = logit_rows("broad", 5, 600, 3)
    raw[2, 5] = np.nan
    with pytest.raises(ValueError, match="row 2 is not"):
        enc.encode_logits(raw)


def test_compiled_and_numpy_paths_agree_to_float32_rounding(native, numpy_kernels):
    raw = logit_rows("broad", 32, 49152, seed=9)
    ref = np.random.default_rng(3).integers(0, 49152, 32)
    enc = get_encoding("float16")
    a, la = enc.encode_logits(raw, ref, threads=2), log_softmax(raw)
    numpy_kernels()
    assert float16_encoder() is None and f16_native.log_softmax(raw, np.empty_like(raw)) is False
    b, lb = enc.encode_logits(raw, ref, threads=2), log_softmax(raw)
    np.testing.assert_array_equal(b["logprobs"], lb.astype(np.float16))  # numpy's own contract
    assert np.abs(la - lb).max() <= 4e-6  # a last-bit difference of the normalizer (values up to ~20)
    assert (a["logprobs"] != b["logprobs"]).mean() < 1e-4  # codes differ only where that bit crosses a rounding
    np.testing.assert_array_equal(a["top_id"], b["top_id"])
    np.testing.assert_allclose(a["xent_correction"], b["xent_correction"], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(a["ref_logprob"], b["ref_logprob"], rtol=1e-6, atol=4e-6)
