"""The logits engine on the real llama.cpp runtime and the synthetic model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.errors import UserError
from ggufopt_ray.gguf.inspect import inspect_model

TEXT = ("def quantize(model, value): return the number of the tensor in the matrix\n"
        "The model was made after many years of work, and the people there said it was good. ") * 20


@pytest.fixture(scope="module")
def engine(tiny_model):
    with LogitsEngine(tiny_model, RuntimeSettings(n_ctx=128, n_batch=128, n_ubatch=128)) as e:
        yield e


def _chunks(engine, n_ctx, count):
    stream = engine.tokenize(TEXT)
    assert stream.size >= n_ctx * count
    return [engine.prepare_chunk(stream[i * n_ctx:(i + 1) * n_ctx]) for i in range(count)]


def _log_softmax64(x):
    z = x.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_make_inspect_then_logits_for_several_chunks(tiny_model, engine):
    info = inspect_model(tiny_model)
    assert engine.n_vocab == info.vocab_size
    assert engine.n_ctx_train == info.context_length
    chunks = _chunks(engine, 128, 3)
    for chunk in chunks:
        assert chunk[0] == engine.bos_id  # BOS replaces the first token, as llama-perplexity does
        logits = engine.logits(chunk)
        assert logits.shape == (128, info.vocab_size)
        assert logits.dtype == np.float32
        assert np.isfinite(logits).all()
        # Non-degenerate distributions: entropy well inside (0, ln V), and it varies by position.
        logp = _log_softmax64(logits)
        entropy = -(np.exp(logp) * logp).sum(axis=1)
        assert 0.5 < entropy.mean() < 0.95 * np.log(info.vocab_size)
        assert entropy.std() > 0.01
    # Different chunks give different logits.
    assert not np.allclose(engine.logits(chunks[0]), engine.logits(chunks[1]))


def test_same_chunk_same_logits(engine):
    chunk = _chunks(engine, 128, 2)[1]
    first = engine.logits(chunk)
    engine.logits(_chunks(engine, 128, 1)[0])  # something else in between
    again = engine.logits(chunk)
    np.testing.assert_array_equal(first, again)


def test_changing_threads_keeps_the_numbers(tiny_model):
    """A trial that gets a spare CPU mid-run (distributed/cpu_share.py) switches threads between
    chunks; its logits must be the ones a fresh engine with that many threads gives."""
    settings = RuntimeSettings(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1)
    with LogitsEngine(tiny_model, settings) as one, LogitsEngine(tiny_model, replace(settings, n_threads=2)) as two:
        chunk = _chunks(one, 128, 1)[0]
        before = one.logits(chunk, first=64).copy()
        one.set_threads(2)
        assert one.n_threads == 2
        np.testing.assert_array_equal(one.logits(chunk, first=64), two.logits(chunk, first=64))
        np.testing.assert_array_equal(one.logits(chunk, first=64), before)
        with pytest.raises(UserError, match="n_threads must be positive"):
            one.set_threads(0)


def test_shorter_chunk_than_context(engine):
    chunk = _chunks(engine, 128, 1)[0][:37]
    full = engine.logits(_chunks(engine, 128, 1)[0])
    part = engine.logits(chunk)
    assert part.shape == (37, engine.n_vocab)
    # Causal attention: the first 37 positions do not depend on what follows them.
    np.testing.assert_allclose(part, full[:37], atol=1e-4)


@pytest.mark.parametrize("n_batch,n_ubatch", [(128, 32), (64, 64), (32, 8)])
def test_logits_agree_across_batch_sizes(tiny_model_f16, n_batch, n_ubatch):
    # Tolerance: 1e-3 absolute on logits of std ~2.5; only the order of floating-point sums
    # inside llama.cpp may change with the batch split.
    tol = 1e-3
    with LogitsEngine(tiny_model_f16, RuntimeSettings(n_ctx=128, n_batch=128, n_ubatch=128)) as ref_engine:
        chunk = _chunks(ref_engine, 128, 1)[0]
        ref = ref_engine.logits(chunk)
    with LogitsEngine(tiny_model_f16, RuntimeSettings(n_ctx=128, n_batch=n_batch, n_ubatch=n_ubatch)) as e:
        other = e.logits(chunk)
    diff = float(np.abs(ref - other).max())
    print(f"n_batch={n_batch} n_ubatch={n_ubatch}: max |logit difference| = {diff:.3g} (tolerance {tol})")
    assert diff <= tol


def test_different_seeds_give_different_predictions(tiny_model, tmp_path, engine):
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    other = write_synthetic_model(tmp_path / "seed1.gguf", SynthSpec(seed=1))
    chunk = _chunks(engine, 128, 1)[0]
    with LogitsEngine(other, RuntimeSettings(n_ctx=128, n_batch=128, n_ubatch=128)) as e:
        b = e.logits(chunk)
    a = engine.logits(chunk)
    top_agree = float((a.argmax(1) == b.argmax(1)).mean())
    assert top_agree < 0.2


def test_bad_inputs_raise_user_errors(tiny_model, engine):
    with pytest.raises(UserError, match="training context"):
        LogitsEngine(tiny_model, RuntimeSettings(n_ctx=4096, n_batch=512, n_ubatch=512))
    with pytest.raises(UserError, match="empty token chunk"):
        engine.logits([])
    with pytest.raises(UserError, match="does not fit"):
        engine.logits(np.ones(129, dtype=np.int32))
    with pytest.raises(UserError, match="token ids"):
        engine.logits([1, 5, engine.n_vocab])
    with pytest.raises(UserError, match="n_ubatch"):
        LogitsEngine(tiny_model, RuntimeSettings(n_ctx=128, n_batch=32, n_ubatch=64))


def test_gpu_layers_setting_is_harmless_on_cpu(tiny_model, engine):
    chunk = _chunks(engine, 128, 1)[0]
    with LogitsEngine(tiny_model, RuntimeSettings(n_ctx=128, n_batch=128, n_ubatch=128, n_gpu_layers=99)) as e:
        np.testing.assert_allclose(e.logits(chunk), engine.logits(chunk), atol=1e-5)
