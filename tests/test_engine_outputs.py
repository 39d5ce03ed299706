"""Scored-rows-only logits and several chunks per decode, checked against all-position rows.

``LogitsEngine.logits(tokens, first)`` marks only positions ``first ..`` as outputs and
``logits_many`` packs chunks as separate sequences of one decode (llama-perplexity's speed
tricks). Neither may change a number: every row is compared with the same position's row from a
plain all-position call (``first=0``, one chunk at a time) — the engine's behaviour before these
options existed — on the real llama.cpp runtime.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.errors import UserError

TEXT = ("def quantize(model, value): return the number of the tensor in the matrix\n"
        "The model was made after many years of work, and the people there said it was good. ") * 40
N_CTX = 128


def _chunks(engine, count, n_ctx=N_CTX):
    stream = engine.tokenize(TEXT)
    assert stream.size >= n_ctx * count
    return [engine.prepare_chunk(stream[i * n_ctx:(i + 1) * n_ctx]) for i in range(count)]


def _settings(n_batch, n_ubatch, n_ctx=N_CTX):
    return RuntimeSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch)


def _log_softmax64(x):
    z = np.asarray(x, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# (n_batch, n_ubatch, first): whole chunk in one batch; first inside the second and the third
# of 48-token pieces (so whole pieces have no output at all); the last position only; a first
# exactly on a piece boundary; and first=0.
SPLITS = [(128, 128, 64), (48, 16, 64), (48, 16, 100), (40, 40, 127), (32, 32, 64), (128, 32, 0)]


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_model_f16"])
@pytest.mark.parametrize("n_batch,n_ubatch,first", SPLITS)
def test_rows_from_first_are_the_all_position_rows(request, model_fixture, n_batch, n_ubatch, first):
    model = request.getfixturevalue(model_fixture)
    with LogitsEngine(model, _settings(n_batch, n_ubatch)) as e:
        chunk = _chunks(e, 2)[1]
        full = e.logits(chunk)
        part = e.logits(chunk, first=first)
        into = np.full((N_CTX - first, e.n_vocab), np.nan, np.float32)
        assert e.logits(chunk, first=first, out=into) is into
    assert part.shape == (N_CTX - first, full.shape[1]) and part.dtype == np.float32
    diff = float(np.abs(part - full[first:]).max())
    print(f"{model_fixture} n_batch={n_batch} n_ubatch={n_ubatch} first={first}: max |diff| = {diff:.3g}")
    # Measured: bit-identical on this machine, including first=127 (a lone output row, which the
    # engine pads to two rows: llama.cpp's one-row kernels would differ by up to 1.2e-3 on F16).
    # Tolerance 1e-4 absolute on logits of std ~2.5, in case another CPU picks other kernels for
    # the smaller last-layer matmuls.
    assert diff <= 1e-4
    np.testing.assert_array_equal(into, part)


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_model_f16"])
def test_packed_chunks_equal_one_chunk_at_a_time(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    first = 40
    with LogitsEngine(model, _settings(N_CTX, N_CTX)) as single:
        assert single.n_seq == 1
        chunks = _chunks(single, 6)
        # Different lengths pack too: 128, 100, 128, 77 | 128, 128 with 4 sequences per batch.
        chunks[1], chunks[3] = chunks[1][:100], chunks[3][:77]
        ref = [single.logits(c)[first:] for c in chunks]  # all positions, one chunk per decode
        assert all(np.array_equal(a, b) for a, b in zip(single.logits_many(chunks, first), ref))
    with LogitsEngine(model, _settings(4 * N_CTX, 4 * N_CTX)) as packed:
        assert packed.n_seq == 4 and packed.n_batch == 4 * N_CTX
        got = packed.logits_many(chunks, first)
        again = packed.logits(chunks[2], first)  # one sequence after a packed decode
        whole = packed.logits(chunks[0])  # and every position, as the imatrix collector asks
    assert [g.shape for g in got] == [r.shape for r in ref]
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    print(f"{model_fixture}: packed vs one chunk at a time, max |logit diff| = {diff:.3g}")
    # Tolerance as for different batch splits (test_engine): only the order of sums may change
    # inside llama.cpp; measured 0 here.
    assert diff <= 1e-3
    assert float(np.abs(again - ref[2]).max()) <= 1e-3
    assert float(np.abs(whole[first:] - ref[0]).max()) <= 1e-3


def test_chunk_longer_than_a_batch_falls_back_to_pieces(tiny_model):
    # n_batch 256 with n_ctx 128 gives 2 sequences, but 128-token chunks then fill a batch two at
    # a time; with n_batch 96 (< n_ctx) there is one sequence and each chunk goes in pieces.
    with LogitsEngine(tiny_model, _settings(96, 32)) as e:
        assert e.n_seq == 1
        chunks = _chunks(e, 3)
        got = e.logits_many(chunks, first=70)
        ref = [e.logits(c)[70:] for c in chunks]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_bad_first_and_bad_chunks_raise_before_running(tiny_model):
    with LogitsEngine(tiny_model, _settings(2 * N_CTX, N_CTX)) as e:
        chunk = _chunks(e, 1)[0]
        with pytest.raises(UserError, match="first output position"):
            e.logits(chunk, first=N_CTX)
        with pytest.raises(UserError, match="first output position"):
            e.logits(chunk, first=-1)
        with pytest.raises(UserError, match="first output position"):
            e.logits_many([chunk, chunk[:10]], first=20)
        with pytest.raises(UserError, match="token ids"):
            e.logits_many([chunk, np.array([1, e.n_vocab], np.int32)], first=0)


def test_baseline_payload_and_compare_chunk_on_scored_rows(tiny_model, tmp_path):
    """The evaluation glue requests rows from ``first`` only; its numbers are checked against
    a float64 numpy log-softmax / KL-divergence of all-position logits of two models."""
    from ggufopt_ray.evaluation import baseline_payload, compare_chunk
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    other = write_synthetic_model(tmp_path / "seed1.gguf", SynthSpec(seed=1))
    first = 64
    with LogitsEngine(tiny_model, _settings(N_CTX, N_CTX)) as base:
        chunk = _chunks(base, 1)[0]
        base_full = base.logits(chunk)
        payload = baseline_payload(base, chunk, "exact", first)
    with LogitsEngine(other, _settings(N_CTX, N_CTX)) as cand:
        cand_full = cand.logits(chunk)
        metrics = compare_chunk(cand, chunk, payload, "exact", first, keep_logprobs=True)
    p = _log_softmax64(base_full[first:-1])
    q = _log_softmax64(cand_full[first:-1])
    assert payload["logprobs"].shape == p.shape
    np.testing.assert_allclose(payload["logprobs"], p, atol=2e-5)
    np.testing.assert_allclose(metrics["candidate_logprobs"], q, atol=2e-5)
    kld = (np.exp(p) * (p - q)).sum(axis=1)
    assert kld.mean() > 0.1  # two different models: a real divergence to reproduce
    np.testing.assert_allclose(metrics["kld"], kld, rtol=1e-4, atol=1e-5)


def test_perplexity_through_packed_engine(tiny_model):
    """evaluate_perplexity asks for the scored rows only, packed; checked against float64 NLLs
    of all-position logits from a one-sequence engine."""
    from ggufopt_ray.evaluate import evaluate_perplexity

    with LogitsEngine(tiny_model, _settings(N_CTX, N_CTX)) as single:
        chunks = _chunks(single, 3)
        nll = []
        for c in chunks:
            lp = _log_softmax64(single.logits(c))
            nll.append(-lp[np.arange(N_CTX // 2, N_CTX - 1), c[N_CTX // 2 + 1:]])
    with LogitsEngine(tiny_model, _settings(2 * N_CTX, N_CTX)) as packed:
        result = evaluate_perplexity(packed, chunks)
    expected = np.concatenate(nll)
    assert result.n_tokens == expected.size == 3 * (N_CTX // 2 - 1)
    np.testing.assert_allclose(result.nll, expected, rtol=1e-6, atol=1e-6)
