"""Calibration mixes: weighted per-language imatrices equal collections on the weighted chunks.

Per-language imatrices are collected once on the tiny model from two different built-in texts
(English prose, Python code); a mix of them must equal what ``collect_imatrix`` gives on the chunk
list with each language's chunks repeated as the weights say, and llama-quantize must take the
combined file.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ggufopt_ray.engine.imatrix import Imatrix, collect_imatrix, mix_imatrices, weighted_sum
from ggufopt_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
N_CTX = 64


def _llama_quantize() -> Path:
    """llama.cpp's llama-quantize from .ci/build-llama-tools (as tests/test_llama_cpp_parity.py finds
    it): skip without it, fail when CI=true or GGUFOPT_LLAMA_TOOLS says it must be there."""
    env = os.environ.get("GGUFOPT_LLAMA_TOOLS")
    if env:
        d = Path(env)
    else:
        try:
            version = importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        d = Path.home() / ".cache" / "ggufopt_ray-llama-tools" / version
    tool = d / "bin" / "llama-quantize"
    if not tool.is_file():
        why = f"{tool} is missing; run .ci/build-llama-tools"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on") or env:
            pytest.fail(why + " (required: CI or GGUFOPT_LLAMA_TOOLS is set)", pytrace=False)
        pytest.skip(why)
    return tool


@pytest.fixture(scope="module")
def chunks(tiny_model):
    from ggufopt_ray.engine.tokenizer import VocabTokenizer, text_chunks

    builtin = ROOT / "ggufopt_ray" / "data" / "builtin"
    with VocabTokenizer(tiny_model) as tok:
        return {lang: text_chunks(tok, (builtin / f"{lang}.txt").read_text()[:4000], N_CTX, 2)
                for lang in ("en", "code")}


@pytest.fixture(scope="module")
def parts(tiny_model, chunks):
    return {lang: collect_imatrix(tiny_model, c, n_threads=1, dataset_name=lang) for lang, c in chunks.items()}


def _assert_same(a: Imatrix, b: Imatrix, rtol=2e-6):
    assert set(a.entries) == set(b.entries)
    for name, e in a.entries.items():
        assert np.array_equal(e.counts, b.entries[name].counts), name
        np.testing.assert_allclose(e.sums, b.entries[name].sums, rtol=rtol, err_msg=name)


def test_texts_differ_so_the_weights_matter(parts, chunks):
    assert all(len(c) == 2 and all(len(x) == N_CTX for x in c) for c in chunks.values())
    en, code = (parts[k].entries["blk.1.ffn_down.weight"].importance() for k in ("en", "code"))
    assert not np.allclose(en, code, rtol=0.05)  # else a wrong weighting could pass unnoticed


@pytest.mark.parametrize("want, repeats", [({"en": 4, "code": 2}, {"en": 2, "code": 1}),
                                           ({"en": 2, "code": 6}, {"en": 1, "code": 3})])
def test_integer_mix_equals_collecting_on_repeated_chunks(tiny_model, chunks, parts, want, repeats):
    mixed = mix_imatrices(parts, want)
    listed = [c for lang in ("en", "code") for _ in range(repeats[lang]) for c in chunks[lang]]
    direct = collect_imatrix(tiny_model, listed, n_threads=1)
    _assert_same(mixed, direct)
    assert mixed.chunk_count == direct.chunk_count == sum(want.values())
    assert mixed.chunk_size == direct.chunk_size == N_CTX
    assert "mix:code=%d,en=%d" % (want["code"], want["en"]) in mixed.datasets


def test_unit_weights_equal_merge_and_parts_are_untouched(parts):
    before = {k: v.hash() for k, v in parts.items()}
    mixed = mix_imatrices(parts, {"en": 2, "code": 2})
    _assert_same(mixed, parts["en"].merge(parts["code"]), rtol=1e-6)
    assert {k: v.hash() for k, v in parts.items()} == before
    # leaving a language out, or giving it 0, is the other language alone
    _assert_same(mix_imatrices(parts, {"en": 2, "code": 0}), parts["en"], rtol=0)
    _assert_same(mix_imatrices(parts, {"en": 2}), parts["en"], rtol=0)


def test_one_chunks_worth_is_the_mean_over_single_chunks(tiny_model, chunks, parts):
    """1 chunk's worth of a language collected on 2 chunks = the average of its single-chunk imatrices."""
    singles = [collect_imatrix(tiny_model, [c], n_threads=1) for c in chunks["en"]]
    mixed = mix_imatrices(parts, {"en": 1})
    assert mixed.chunk_count == 1
    for name, e in mixed.entries.items():
        expect = (singles[0].entries[name].sums.astype(np.float64) + singles[1].entries[name].sums) / 2
        np.testing.assert_allclose(e.sums, expect, rtol=2e-6, err_msg=name)
        assert e.counts.tolist() == [N_CTX]


def test_fractional_counts_are_rounded_with_exact_importance(parts):
    f = 1 / 3  # en counts 128 / 3 tokens: not a whole number
    mixed = weighted_sum([(parts["en"], f), (parts["code"], 1.0)])
    for name, e in mixed.entries.items():
        a, b = parts["en"].entries[name], parts["code"].entries[name]
        c = f * a.counts[0] + b.counts[0]
        assert e.counts.tolist() == [round(c)]
        want = (f * a.sums.astype(np.float64) + b.sums) / c  # what llama.cpp quantizes with
        np.testing.assert_allclose(e.importance(), want.reshape(-1), rtol=2e-6, err_msg=name)
    assert mixed.chunk_count == round(2 * f + 2)


def test_bad_weights(parts):
    with pytest.raises(UserError, match="'de'.*only for 'code', 'en'"):
        mix_imatrices(parts, {"de": 1})
    with pytest.raises(UserError, match=">= 0"):
        mix_imatrices(parts, {"en": -1})
    with pytest.raises(UserError, match="every imatrix weight is 0"):
        mix_imatrices(parts, {"en": 0, "code": 0})
    with pytest.raises(UserError, match="finite"):
        weighted_sum([(parts["en"], float("nan"))])
    other = parts["en"].copy()
    name = "blk.0.attn_q.weight"
    other.entries[name].sums = other.entries[name].sums[:, :128]
    with pytest.raises(UserError, match="different models"):
        weighted_sum([(parts["code"], 1), (other, 1)])


def test_llama_quantize_accepts_the_combined_file(tiny_model, parts, tmp_path):
    from gguf import GGUFReader

    from ggufopt_ray.engine.quantize import quantize_model

    tool = _llama_quantize()
    mixed = mix_imatrices(parts, {"en": 3, "code": 1})
    saved = mixed.save(tmp_path / "mix.gguf")
    back = Imatrix.load(saved)
    assert back.hash() == mixed.hash() and back.datasets == mixed.datasets
    out = tmp_path / "mix-IQ4_XS.gguf"
    proc = subprocess.run([str(tool), "--imatrix", str(saved), str(tiny_model), str(out), "IQ4_XS", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 0
    cli = {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in GGUFReader(out).tensors}
    # the importance matrix was used: the in-process quantization with it writes the same bytes
    ours = quantize_model(tiny_model, "IQ4_XS", tmp_path / "inproc.gguf", imatrix=mixed, overwrite=True)
    inproc = {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in GGUFReader(ours.path).tensors}
    assert cli.keys() == inproc.keys()
    assert [n for n in cli if cli[n] != inproc[n]] == []
    plain = quantize_model(tiny_model, "IQ4_XS", tmp_path / "plain.gguf", overwrite=True)
    unweighted = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(plain.path).tensors}
    assert any(unweighted[n] != cli[n][1] for n in mixed.entries)
