"""The baseline pass's fast path gives the numbers of the plain path (issue 14).

``evaluation.baseline_payloads`` reads each chunk's rows straight from llama.cpp's
buffer (``LogitsEngine.map_logits``) and encodes raw logits (``encode_logits``, which fuses the
log-softmax into the float16 encoder); ``evaluation.baseline_payload`` copies the rows, runs
``kld.log_softmax`` and then ``encode``. The float16 encoder itself works in float32 with bit
arithmetic for the float16 rounding and a moment expansion for the correction; here it is held
to a long-double evaluation of the definitions, and both paths to each other.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.metrics.encodings import _round_float16, get_encoding
from ggufopt_ray.metrics.kld import log_softmax

TEXT = ("def quantize(model, value): return the number of the tensor in the matrix\n"
        "The model was made after many years of work, and the people there said it was good. ") * 40


def _lsm_long(x):
    x = np.asarray(x, np.longdouble)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def _logit_rows(n, v, seed, scale=2.5):
    return (scale * np.random.default_rng(seed).standard_normal((n, v))).astype(np.float32)


def test_float16_rounding_by_bits_equals_numpys_cast():
    rng = np.random.default_rng(0)
    # every float32 from -65504 to -2**-14 is in reach of the bit arithmetic; ties included
    bits = rng.integers(0x38800000, 0x477FE000 + 1, 2_000_000, dtype=np.uint32) | np.uint32(0x80000000)
    ties = (np.arange(0x38800000, 0x477FE000, 0x1000, dtype=np.uint32) | np.uint32(0x80000000))
    x = np.concatenate([bits, ties]).view(np.float32).reshape(1, -1)
    codes = np.empty(x.shape, np.uint16)
    rounded = _round_float16(x, codes, np.empty(x.shape, np.uint32))
    np.testing.assert_array_equal(codes, x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(rounded, x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("v", [1000, 8192, 49152])
@pytest.mark.parametrize("sharpen", [1.0, 6.0, 40.0])
def test_float16_encoding_against_long_double(v, sharpen):
    """Codes are float16(log_softmax(logits)); the correction and the reference log-prob are the
    definitions evaluated in long double; both entry points store the same codes."""
    n = 24 if v > 8192 else 64
    raw = _logit_rows(n, v, seed=v) * np.float32(sharpen)  # x40: tops with p ~ 1 (float16 subnormal)
    ref = np.random.default_rng(1).integers(0, v, n)
    ref[:4] = raw[:4].argmax(axis=1)  # the top token: log-probs near 0 keep their precision
    enc = get_encoding("float16")
    x = log_softmax(raw)
    from_logits = enc.encode_logits(raw, ref, threads=2)
    from_logprobs = enc.encode(x, ref, threads=1)
    for k in ("logprobs", "top_id"):
        np.testing.assert_array_equal(np.asarray(from_logits[k]).view(np.uint8),
                                      np.asarray(from_logprobs[k]).view(np.uint8), err_msg=k)
    np.testing.assert_array_equal(from_logits["logprobs"], x.astype(np.float16))
    np.testing.assert_array_equal(from_logits["top_id"], raw.argmax(axis=1))
    lp = _lsm_long(x)
    lq = _lsm_long(from_logits["logprobs"])
    corr = (np.exp(lq) * (lp - lq)).sum(axis=1)
    ref_lp = lp[np.arange(n), ref]
    for got in (from_logits, from_logprobs):
        # the correction is ~1e-6 (unsharpened) and enters every KLD: within float32 rounding
        assert np.abs(got["xent_correction"] - corr).max() <= 1e-12 + 1e-6 * np.abs(corr).max()
        # (atol: the long-double reference itself is only good to ~1e-19 near 0)
        np.testing.assert_allclose(got["ref_logprob"].astype(np.longdouble), ref_lp, rtol=2e-6, atol=1e-18)


def test_float16_encoding_refuses_what_float16_cannot_hold():
    enc = get_encoding("float16")
    x = log_softmax(_logit_rows(4, 600, 3))
    for bad in (np.nan, -np.inf, -70000.0):
        y = x.copy()
        y[2, 17] = bad
        with pytest.raises(ValueError, match="finite"):
            enc.encode(y)
    raw = _logit_rows(4, 600, 3)
    raw[1, 5] = np.nan
    with pytest.raises(ValueError, match="finite"):
        enc.encode_logits(raw)


def test_float16_encode_of_unnormalized_rows_is_still_exact():
    """Rows that are not log-probs (positive values, offsets) get numpy's cast where the bit
    arithmetic does not apply, and a correction computed against their own softmax."""
    enc = get_encoding("float16")
    rows = _logit_rows(8, 3000, 5) + np.float32(4.0)
    got = enc.encode(rows)
    np.testing.assert_array_equal(got["logprobs"], rows.astype(np.float16))
    lp, lq = _lsm_long(rows), _lsm_long(got["logprobs"])
    corr = (np.exp(lq) * (lp - lq)).sum(axis=1)
    assert np.abs(got["xent_correction"] - corr).max() <= 1e-12


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_model_f16"])
def test_map_logits_hands_out_llama_cpp_rows_without_copying(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    n_ctx, first = 128, 40
    with LogitsEngine(model, RuntimeSettings(n_ctx=n_ctx, n_batch=3 * n_ctx, n_ubatch=n_ctx)) as e:
        stream = e.tokenize(TEXT)
        chunks = [e.prepare_chunk(stream[i * n_ctx:(i + 1) * n_ctx]) for i in range(5)]
        expected = e.logits_many(chunks, first)  # the same decodes, copied out
        for got, alone in zip(expected, (e.logits(c, first) for c in chunks)):
            assert np.abs(got - alone).max() <= 1e-4  # packing may only reorder sums (cf. test_engine_outputs)
        seen = []

        def check(i, rows):
            assert not rows.flags.writeable and not rows.flags.owndata  # a view, read-only
            np.testing.assert_array_equal(rows, expected[i])
            seen.append(i)
            return float(rows[0, 0])

        assert e.map_logits(chunks, check, first) == [float(r[0, 0]) for r in expected]
        assert seen == list(range(5))
        # the last position alone is padded with one more output row, as logits() does
        last = e.map_logits(chunks[:1], lambda i, rows: np.array(rows), first=n_ctx - 1)[0]
        np.testing.assert_array_equal(last, e.logits(chunks[0])[n_ctx - 1:])
        alone = [e.logits(c, first) for c in chunks[:2]]
    with LogitsEngine(model, RuntimeSettings(n_ctx=n_ctx, n_batch=48, n_ubatch=16)) as e:
        # a chunk longer than n_batch is decoded in pieces into an array of its own
        got = e.map_logits(chunks[:2], lambda i, rows: np.array(rows), first)
        for a, b in zip(got, alone):
            assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("encoding", ["float16", "exact", "llamacpp_uint16"])
def test_baseline_payloads_equal_baseline_payload(tiny_model, encoding):
    from ggufopt_ray.evaluation import baseline_payloads
    from ggufopt_ray.evaluation import baseline_payload

    n_ctx, first = 128, 64
    with LogitsEngine(tiny_model, RuntimeSettings(n_ctx=n_ctx, n_batch=4 * n_ctx, n_ubatch=n_ctx)) as e:
        stream = e.tokenize(TEXT)
        chunks = [e.prepare_chunk(stream[i * n_ctx:(i + 1) * n_ctx]) for i in range(6)]
        plain = [baseline_payload(e, c, encoding, first) for c in chunks]
        ready = []
        fast = baseline_payloads(e, chunks, encoding, first, on_payload=lambda j, p: ready.append(j))
    assert ready == list(range(6))
    for a, b in zip(plain, fast):
        assert a.keys() == b.keys()
        for k in a:
            if encoding == "float16" and k in ("xent_correction", "ref_logprob"):
                np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-12, err_msg=k)
            else:
                np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_compute_into_store_commits_every_chunk(tiny_model, tmp_path):
    from ggufopt_ray.commands.logits import compute_into_store
    from ggufopt_ray.evaluation import baseline_payloads
    from ggufopt_ray.store.baseline import BaselineStore

    n_ctx, first = 64, 32
    header = {"model_fingerprint": "m", "vocab_fingerprint": "v", "corpus_fingerprint": "c", "n_ctx": n_ctx,
              "n_vocab": 1024, "encoding": "float16", "encoding_params": {}, "first": first, "n_chunks": 7}
    store = BaselineStore.create_or_open(tmp_path / "store", header)
    with LogitsEngine(tiny_model, RuntimeSettings(n_ctx=n_ctx, n_batch=2 * n_ctx, n_ubatch=n_ctx)) as e:
        stream = e.tokenize(TEXT)
        chunks = [e.prepare_chunk(stream[i * n_ctx:(i + 1) * n_ctx]) for i in range(7)]
        done = []
        compute_into_store(e, store, chunks, [0, 2, 3, 4, 5, 6], "float16", first, progress=done.append)
        want = baseline_payloads(e, chunks, "float16", first)
    assert sum(done) == 6 and store.committed() == [0, 2, 3, 4, 5, 6]
    for i in store.committed():
        got = store.read_payload(i)
        np.testing.assert_array_equal(store.read_tokens(i), chunks[i])
        for k, v in want[i].items():
            np.testing.assert_array_equal(got[k], v)
