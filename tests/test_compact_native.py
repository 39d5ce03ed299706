"""The compiled compact encoder (engine/compact_kernel.c via kld_native.compact_encoder) against the
numpy one (CompactEncoding.encode(native=False)): every array identical, bit for bit.

Both follow the encoder's fixed definitions in metrics/encodings.py (_exp64, _lane_sums, libm's log,
np.rint's rounding), so there is no tolerance anywhere in this file.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import broad_logits
from ggufopt_ray.engine import kld_native
from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.encodings import CompactEncoding, compact_encoder, get_encoding
from ggufopt_ray.metrics.kld import kld_per_token, log_softmax


@pytest.fixture(scope="module")
def native(kernel_cache):
    """The compiled encoder (built once into this module's own cache directory)."""
    enc = compact_encoder()
    if enc is None:
        pytest.skip(f"compiled compact encoder unavailable: {kld_native._entry('compact')[1]}")
    yield enc



def rows(kind: str, n: int, v: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "broad":
        x = broad_logits(rng, n, v)
    elif kind == "peaked":
        x = (8 * rng.standard_normal((n, v))).astype(np.float32)
        x[:, rng.integers(0, v)] += 30
    elif kind == "flat":
        x = (0.05 * rng.standard_normal((n, v))).astype(np.float32)
    elif kind == "ties":  # many equal values, ties at the anchor and in the top T
        x = np.round(2 * rng.standard_normal((n, v))).astype(np.float32)
        x[0] = -3.0
        x[0, 5] = 0.0
    elif kind == "clamped":  # -inf clamped to very negative values, as the baseline pass does
        x = broad_logits(rng, n, v)
        x[:, rng.random(v) < 0.3] = -1e30
        x[-1, :] = np.float32(-3e38)
        x[-1, : v // 2] = rng.standard_normal(v // 2)
    else:
        raise ValueError(kind)
    return log_softmax(x) if kind != "clamped" else x


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        # bytes: also tells -0.0 from 0.0
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs at {np.flatnonzero(a[name] != b[name])[:8]}"


@pytest.mark.parametrize("kind", ["broad", "peaked", "flat", "ties", "clamped"])
@pytest.mark.parametrize("v", [1000, 1001, 4099, 32000, 50257])
def test_native_identical_to_numpy(native, kind, v):
    x = rows(kind, 5, v, seed=v)
    ref = np.random.default_rng(v).integers(0, v, x.shape[0])
    enc = CompactEncoding()
    for r in (ref, None):
        assert_identical(enc.encode(x, r, native=False), enc.encode(x, r, native=native))


@pytest.mark.parametrize("v", [128256, 262144])
def test_native_identical_at_big_vocabularies(native, v):
    x = rows("broad", 3, v, seed=v)
    ref = np.random.default_rng(1).integers(0, v, 3)
    enc = CompactEncoding()
    assert_identical(enc.encode(x, ref, native=False), enc.encode(x, ref))  # native: the default


@pytest.mark.parametrize("params", [{"top": 4}, {"top": 100}, {"budget": 0.5}, {"budget": 0.2}, {"budget": 0.4}])
def test_native_identical_for_other_layouts(native, params):
    v = 20000
    x = rows("broad", 3, v, seed=3)
    enc = CompactEncoding(**params)
    assert_identical(enc.encode(x, None, native=False), enc.encode(x, None, native=native))


def test_native_threads_and_non_contiguous_input(native):
    v = 8000
    x = rows("broad", 9, 2 * v, seed=4)[:, ::2]  # a strided view
    ref = np.arange(9) * 7
    enc = CompactEncoding()
    want = enc.encode(x, ref, native=False)
    assert_identical(want, enc.encode(x, ref, threads=3))
    assert_identical(want, enc.encode(np.ascontiguousarray(x).astype(np.float64), ref))


def test_round_trip_unchanged(native):
    """Same arrays, so the decoded rows and every compared metric are the same as numpy's."""
    v = 32000
    rng = np.random.default_rng(6)
    logits = broad_logits(rng, 8, v)
    base = log_softmax(logits)
    cand = (logits + 0.05 * rng.standard_normal(logits.shape)).astype(np.float32)
    ref = rng.integers(0, v, 8)
    enc = get_encoding("compact")
    a = enc.encode(base, ref, native=False)
    b = enc.encode(base, ref)
    np.testing.assert_array_equal(enc.decode_logprobs(a, v), enc.decode_logprobs(b, v))
    ma, mb = enc.compare(a, cand, ref), enc.compare(b, cand, ref)
    for f in ("kld", "same_top", "delta_p", "nll_base", "nll_cand"):
        np.testing.assert_array_equal(getattr(ma, f), getattr(mb, f))
    exact = kld_per_token(base, cand, ref).kld.astype(np.float64)
    assert abs(mb.kld.astype(np.float64).mean() / exact.mean() - 1) < 0.01
    # the base compared with itself: ~0 (the cross-entropy correction)
    assert np.abs(enc.compare(b, logits, ref).kld).max() < 1e-5


def test_non_finite_rows_refused_on_both_paths(native):
    x = rows("broad", 2, 1000)
    x[1, 3] = -np.inf
    enc = CompactEncoding()
    for nat in (False, None):
        with pytest.raises(ValueError, match="finite"):
            enc.encode(x, native=nat)


def test_numpy_selected_by_environment(native, monkeypatch):
    monkeypatch.setenv(kld_native.ENV_KERNEL, "numpy")
    assert compact_encoder() is None
    x = rows("broad", 2, 1000)
    assert_identical(CompactEncoding().encode(x, native=False), CompactEncoding().encode(x))
    monkeypatch.setenv(kld_native.ENV_KERNEL, "bogus")
    with pytest.raises(UserError):
        compact_encoder()


def test_fallback_without_a_compiler(native, monkeypatch, tmp_path, caplog):
    x = rows("broad", 2, 1000)
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails: the library cannot be built
    monkeypatch.setenv(kld_native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv(kld_native.ENV_KERNEL, "auto")
    with caplog.at_level(logging.WARNING):
        # the numpy encoder under the same settings (its correction uses the KLD and log-softmax
        # kernels, which fall back to numpy here too)
        want = CompactEncoding().encode(x, native=False)
        assert compact_encoder() is None
        assert compact_encoder() is None
    # one warning for the whole fallback (every compiled kernel fails for the same reason)
    warned = [r.message for r in caplog.records if r.name == kld_native.__name__]
    assert len(warned) == 1 and "unavailable" in warned[0] and "numpy" in warned[0], warned
    assert_identical(want, CompactEncoding().encode(x))
    monkeypatch.setenv(kld_native.ENV_KERNEL, "native")
    with pytest.raises(UserError, match="compact encoder is unavailable"):
        compact_encoder()
