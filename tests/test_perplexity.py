"""Perplexity on the synthetic model, checked against a plain float64 computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import logsumexp

from ggufopt_ray.cli import main
from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.errors import UserError
from ggufopt_ray.evaluate import (evaluate_perplexity, ln_ppl_ratio, model_perplexity,
                                  perplexity_from_nll, token_nll)

CTX = 64
TEXT = ("The river ran past the old mill, and the miller counted the sacks of grain twice. "
        "def tokens(text): return [ord(c) for c in text if c.isalpha()]\n") * 12


@pytest.fixture(scope="module")
def engine(tiny_model):
    with LogitsEngine(tiny_model, RuntimeSettings(n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, n_threads=1)) as e:
        yield e


def _chunks(engine, count, seed=0):
    rng = np.random.default_rng(seed)
    return [engine.prepare_chunk(rng.integers(3, engine.n_vocab, size=CTX)) for _ in range(count)]


def _plain_reference(engine, chunks, first):
    """Perplexity written out plainly: loops, float64, scipy's logsumexp."""
    nll = []
    for chunk in chunks:
        logits = engine.logits(chunk).astype(np.float64)
        start = len(chunk) // 2 if first is None else first
        for j in range(start, len(chunk) - 1):
            nll.append(logsumexp(logits[j]) - logits[j][chunk[j + 1]])
    n = len(nll)
    mean = sum(nll) / n
    var = sum((x - mean) ** 2 for x in nll) / (n - 1)
    se = math.sqrt(var / n)
    return n, mean, se, math.exp(mean), math.exp(mean) * se


@pytest.mark.parametrize("first", [None, 0, 10])
def test_matches_an_independent_float64_computation(engine, first):
    chunks = _chunks(engine, 3)
    result = evaluate_perplexity(engine, chunks, first)
    n, ln_ppl, ln_se, ppl, ppl_se = _plain_reference(engine, chunks, first)
    assert result.n_tokens == n == 3 * (CTX - 1 - (CTX // 2 if first is None else first))
    assert result.n_chunks == 3 and sum(result.chunk_n_tokens) == n
    assert result.ln_ppl == pytest.approx(ln_ppl, rel=1e-9)
    assert result.ln_ppl_se == pytest.approx(ln_se, rel=1e-9)
    assert result.ppl == pytest.approx(ppl, rel=1e-9)
    assert result.ppl_se == pytest.approx(ppl_se, rel=1e-9)
    assert result.ppl > 1 and result.ppl_se > 0
    d = result.to_dict()
    assert json.dumps(d) and d["n_tokens"] == n


def test_standard_error_is_positive_and_shrinks_with_more_chunks(engine):
    chunks = _chunks(engine, 12, seed=1)
    few = evaluate_perplexity(engine, chunks[:2])
    many = evaluate_perplexity(engine, chunks)
    assert 0 < many.ln_ppl_se < few.ln_ppl_se
    assert 0 < many.ppl_se
    assert 0 < many.ln_ppl_se_chunks < few.ln_ppl_se_chunks
    # Per-token SE scales about as 1/sqrt(tokens): 6x the tokens, ~2.45x smaller.
    assert 1.6 < few.ln_ppl_se / many.ln_ppl_se < 3.7


def test_statistics_from_given_nll():
    r = perplexity_from_nll([np.array([1.0, 2.0]), np.array([3.0, 4.0, 5.0, 6.0])])
    assert r.ln_ppl == pytest.approx(3.5) and r.ppl == pytest.approx(math.exp(3.5))
    assert r.ln_ppl_se == pytest.approx(np.std([1, 2, 3, 4, 5, 6], ddof=1) / math.sqrt(6))
    # Cluster SE with chunk means 1.5 (2 tokens) and 4.5 (4 tokens): k/(k-1) * sum(w^2 d^2) / W^2.
    assert r.ln_ppl_se_chunks == pytest.approx(math.sqrt(2 * (4 * 4 + 16 * 1)) / 6)
    assert r.chunk_ln_ppl == [1.5, 4.5] and r.chunk_n_tokens == [2, 4]
    with pytest.raises(UserError):
        perplexity_from_nll([])


def test_token_nll_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [3e4, 3e4, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    nll = token_nll(logits, [0, 0, 1], first=0)
    np.testing.assert_allclose(nll, [0.0, math.log(2.0)], atol=1e-12)


def _plain_nll(logits, chunk, start):
    """NLL of each scored token, written plainly: float64 log-sum-exp by hand, one row at a time."""
    out = []
    for j in range(start, len(chunk) - 1):
        row = np.asarray(logits[j], np.float64)
        top = row.max()
        out.append(top + math.log(np.exp(row - top).sum()) - row[chunk[j + 1]])
    return np.array(out)


def test_ratio_of_two_models_and_model_perplexity(engine, tiny_model, tiny_model_f16):
    chunks = _chunks(engine, 2, seed=2)
    settings = RuntimeSettings(n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, n_threads=1)
    a = evaluate_perplexity(engine, chunks)
    with LogitsEngine(tiny_model_f16, settings) as e16:
        b = evaluate_perplexity(e16, chunks)
        nll16 = np.concatenate([_plain_nll(e16.logits(c), c, CTX // 2) for c in chunks])
    nll32 = np.concatenate([_plain_nll(engine.logits(c), c, CTX // 2) for c in chunks])
    d = nll16 - nll32
    assert d.size == 2 * (CTX - 1 - CTX // 2) and np.abs(d).max() > 0  # F16 weights change the numbers
    ratio, ratio_se = ln_ppl_ratio(b, a)
    assert ratio == pytest.approx(d.mean(), rel=1e-7, abs=1e-13)
    assert ratio_se == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=1e-7)
    assert ln_ppl_ratio(a, a) == (0.0, 0.0)  # closed form: identical per-token NLLs

    loaded = model_perplexity(tiny_model, chunks, settings)
    assert loaded.model == str(tiny_model) and loaded.n_tokens == nll32.size
    assert loaded.ln_ppl == pytest.approx(nll32.mean(), rel=1e-9)
    assert loaded.ln_ppl_se == pytest.approx(nll32.std(ddof=1) / math.sqrt(nll32.size), rel=1e-9)
    np.testing.assert_allclose(loaded.nll, nll32, rtol=1e-9, atol=1e-12)
    with pytest.raises(UserError):
        ln_ppl_ratio(a, evaluate_perplexity(engine, chunks[:1]))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


def test_cli_two_models_table_and_json(tiny_model, tiny_model_f16, text_file, capsys):
    args = ["perplexity", str(tiny_model), str(tiny_model_f16), "--text-file", str(text_file),
            "--ctx", "32", "--chunks", "3", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ln(PPL/PPL_1)" in out and str(tiny_model_f16) in out
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["chunks"] == 3 and len(d["models"]) == 2
    ref, f16 = d["models"]
    assert ref["n_tokens"] == f16["n_tokens"] == 3 * (32 - 1 - 16)

    # The same numbers computed here: the text cut as llama-perplexity cuts it (BOS + token stream,
    # consecutive chunks of 32, each chunk's first token replaced by BOS), the second half of each
    # chunk scored, NLLs in float64.
    settings = RuntimeSettings(n_ctx=32, n_batch=32, n_ubatch=32, n_threads=1)
    nll = {}
    for name, path in (("ref", tiny_model), ("f16", tiny_model_f16)):
        with LogitsEngine(path, settings) as e:
            stream = np.concatenate([[e.bos_id], e.tokenize(TEXT)]).astype(np.int32)
            chunks = [np.concatenate([[e.bos_id], stream[i * 32 + 1:(i + 1) * 32]]).astype(np.int32)
                      for i in range(3)]
            nll[name] = np.concatenate([_plain_nll(e.logits(c), c, 16) for c in chunks])
    for got, x in ((ref, nll["ref"]), (f16, nll["f16"])):
        se = x.std(ddof=1) / math.sqrt(x.size)
        assert got["ln_ppl"] == pytest.approx(x.mean(), rel=1e-9)
        assert got["ln_ppl_se"] == pytest.approx(se, rel=1e-9)
        assert got["ppl"] == pytest.approx(math.exp(x.mean()), rel=1e-9)
        assert got["ppl_se"] == pytest.approx(math.exp(x.mean()) * se, rel=1e-9)
    diff = nll["f16"] - nll["ref"]
    assert np.abs(diff).max() > 0
    assert f16["ln_ppl_ratio"] == pytest.approx(diff.mean(), rel=1e-7, abs=1e-13)
    assert f16["ln_ppl_ratio_se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(diff.size), rel=1e-7)
    assert ref["ln_ppl_ratio"] == 0 and ref["ln_ppl_ratio_se"] == 0  # the reference against itself


def _one_line_error(capsys, rc, needle):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("ggufopt perplexity: error:") and needle in lines[0], lines[0]


def test_cli_bad_input(tiny_model, text_file, tmp_path, capsys):
    _one_line_error(capsys, main(["perplexity", str(tmp_path / "missing.gguf"), "--text-file", str(text_file)]),
                    "does not exist")
    _one_line_error(capsys, main(["perplexity", str(tiny_model), "--text-file", str(tmp_path / "none.txt")]),
                    "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("hello there")
    _one_line_error(capsys, main(["perplexity", str(tiny_model), "--text-file", str(short), "--ctx", "64"]),
                    "fewer than one chunk")
    _one_line_error(capsys, main(["perplexity", str(tiny_model), "--text-file", str(text_file), "--ctx", "32",
                                  "--first", "31"]), "first scored position")


def test_text_is_cut_as_llama_perplexity_cuts_it(engine):
    """One token stream with BOS in front, whole chunks, each chunk's first token replaced by BOS."""
    from ggufopt_ray.engine.tokenizer import VocabTokenizer, text_chunks

    assert engine.add_bos
    plain = engine.tokenize(TEXT)
    stream = np.concatenate([[engine.bos_id], plain])
    chunks = text_chunks(engine, TEXT, CTX)
    assert len(chunks) == stream.size // CTX >= 2
    for i, chunk in enumerate(chunks):
        assert chunk[0] == engine.bos_id and chunk.dtype == np.int32
        np.testing.assert_array_equal(chunk[1:], stream[i * CTX + 1:(i + 1) * CTX])
    np.testing.assert_array_equal(chunks[0][1:], plain[:CTX - 1])  # no text token lost at the start
    with VocabTokenizer(engine.model_path) as tok:  # the weight-free tokenizer cuts the same chunks
        for a, b in zip(text_chunks(tok, TEXT, CTX, max_chunks=2), chunks[:2]):
            np.testing.assert_array_equal(a, b)
    assert len(text_chunks(engine, TEXT, CTX, max_chunks=1)) == 1
    with pytest.raises(UserError, match="fewer than one chunk"):
        text_chunks(engine, "tiny", CTX)
