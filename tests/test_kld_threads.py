"""Thread count and block size change how rows are scheduled, never the per-token numbers."""

import numpy as np
import pytest

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.encodings import get_encoding
from ggufopt_ray.metrics.kld import float16_to_float32, kld_per_token, log_softmax


def make(n, v, seed=0):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((n, v))).astype(np.float32)
    cand = (logits + 0.1 * rng.standard_normal((n, v)) + 2.0).astype(np.float32)
    return log_softmax(logits), cand, rng.integers(0, v, n)


def reference_kld(base, cand):
    """float64 textbook KL(base || cand), the independent check."""
    a = base.astype(np.float64)
    b = cand.astype(np.float64)
    la = a - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)) - a.max(1, keepdims=True)
    lb = b - np.log(np.exp(b - b.max(1, keepdims=True)).sum(1, keepdims=True)) - b.max(1, keepdims=True)
    return (np.exp(la) * (la - lb)).sum(1)


@pytest.mark.parametrize("threads", [2, 3])
def test_thread_count_does_not_change_results(threads):
    base, cand, ref = make(41, 2000)
    one = kld_per_token(base, cand, ref, block_elements=6000)
    many = kld_per_token(base, cand, ref, block_elements=6000, threads=threads)
    for k, v in one.to_arrays().items():
        np.testing.assert_array_equal(many.to_arrays()[k], v)
    np.testing.assert_allclose(many.kld, reference_kld(base, cand), rtol=1e-6)


@pytest.mark.parametrize("name", ["exact", "float16", "llamacpp_uint16", "topk", "compact"])
def test_encodings_give_the_same_numbers_on_any_thread_count(name):
    base, cand, ref = make(30, 4096, seed=1)
    enc = get_encoding(name)
    encoded = enc.encode(base, ref)
    one = enc.compare(encoded, cand, ref)
    two = enc.compare(encoded, cand, ref, threads=2)
    for k, v in one.to_arrays().items():
        np.testing.assert_allclose(two.to_arrays()[k], v, rtol=1e-6, atol=1e-12, equal_nan=True)


def test_compact_encode_is_the_same_on_two_threads():
    base, _, ref = make(12, 4096, seed=2)
    enc = get_encoding("compact")
    one = enc.encode(base, ref)
    two = enc.encode(base, ref, threads=2)
    for k, v in one.items():
        np.testing.assert_array_equal(two[k], v)


def test_float16_base_rows_read_exactly():
    # every float16 code, finite or not, converts as numpy's own cast does
    codes = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(64, 1024)
    got = float16_to_float32(codes, np.empty(codes.shape, np.float32))
    want = codes.astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32)[np.isfinite(want)], want.view(np.uint32)[np.isfinite(want)])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    flat = codes.ravel()[np.isfinite(codes.ravel())]
    finite = flat[: flat.size // 64 * 64].reshape(64, -1)  # no inf/NaN: the integer path
    got = float16_to_float32(finite, np.empty(finite.shape, np.float32))
    np.testing.assert_array_equal(got.view(np.uint32), finite.astype(np.float32).view(np.uint32))


def test_bad_thread_counts_are_user_errors():
    base, cand, ref = make(3, 100)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(UserError):
            kld_per_token(base, cand, ref, threads=bad)
