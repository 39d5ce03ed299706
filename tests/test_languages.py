"""Per-language statistics against float64 numpy computed here from each language's tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ggufopt_ray.metrics.kld import kld_per_token, log_softmax
from ggufopt_ray.metrics.languages import (
    LanguageBreakdown, group_by_language, relative_to_best, summarize_languages, worst_language,
)
from ggufopt_ray.metrics.stats import summarize_chunks

V = 256
# three languages with different amounts of damage, chunk counts and chunk lengths
NOISE = {"de": 0.25, "en": 0.1, "code": 0.5}


def _chunk(rng, n, noise):
    logits = (2.0 * rng.standard_normal((n, V))).astype(np.float32)
    cand = (logits + noise * rng.standard_normal((n, V))).astype(np.float32)
    base = log_softmax(logits)
    p = np.exp(base.astype(np.float64))
    ref = np.array([rng.choice(V, p=row / row.sum()) for row in p])
    return kld_per_token(base, cand, ref)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    labels = ["en", "code", "de", "en", "code", "en", "de", "en", "code", "en", "en"]  # interleaved, unequal
    chunks = [_chunk(rng, int(rng.integers(40, 90)), NOISE[lang]) for lang in labels]
    return chunks, labels


def _direct(chunks):
    """Statistics of a language written out with float64 numpy, not through metrics.stats."""
    k = np.concatenate([c.kld for c in chunks]).astype(np.float64)
    top = np.concatenate([c.same_top for c in chunks]).astype(np.float64)
    d = (np.concatenate([c.nll_cand for c in chunks]).astype(np.float64)
         - np.concatenate([c.nll_base for c in chunks]).astype(np.float64))
    n = k.size
    s = np.array([c.kld.astype(np.float64).sum() for c in chunks])
    m = np.array([c.kld.size for c in chunks], np.float64)
    C = len(chunks)
    p = top.mean()
    return {
        "n_chunks": C, "n_tokens": n,
        "kld_mean": k.mean(), "kld_mean_se": k.std(ddof=1) / math.sqrt(n),
        "kld_mean_chunk_se": math.sqrt(C / (C - 1) * ((s - k.mean() * m) ** 2).sum()) / m.sum(),
        "kld_median": np.median(k), "kld_p99": np.percentile(k, 99),
        "same_top": p, "same_top_se": math.sqrt(p * (1 - p) / (n - 1)),
        "ln_ppl_ratio": d.mean(), "ln_ppl_ratio_se": d.std(ddof=1) / math.sqrt(n),
    }


def test_per_language_statistics_equal_direct_computation(data):
    chunks, labels = data
    br = summarize_languages(chunks, labels, n_boot=0)
    assert list(br.languages) == ["code", "de", "en"]
    for lang, s in br.languages.items():
        want = _direct([c for c, l in zip(chunks, labels) if l == lang])
        assert s.lang == lang
        assert (s.n_chunks, s.n_tokens) == (want["n_chunks"], want["n_tokens"])
        for key, value in want.items():
            if key not in ("n_chunks", "n_tokens"):
                assert getattr(s, key) == pytest.approx(value, rel=2e-5, abs=1e-9), (lang, key)
    # the damage levels are far enough apart that the ordering is certain
    means = {lang: _direct([c for c, l in zip(chunks, labels) if l == lang])["kld_mean"] for lang in NOISE}
    assert max(means, key=means.get) == "code"
    assert br.worst_language == "code"
    assert br.worst_language_kld == pytest.approx(means["code"], rel=1e-6)
    assert br.worst == ("code", pytest.approx(means["code"], rel=1e-6))


def test_pooled_statistics_are_unchanged_by_labels(data):
    chunks, labels = data
    before = summarize_chunks(chunks, n_boot=200, seed=3).to_dict()
    br = summarize_languages(chunks, labels, n_boot=200, seed=3)
    assert br.pooled.to_dict() == before
    other = summarize_languages(chunks, ["x"] * len(chunks), n_boot=200, seed=3)
    assert other.pooled.to_dict() == before
    # one label for everything: its summary is the pooled one
    x = other.languages["x"]
    assert x.kld_mean == before["overall"]["kld_mean"]
    assert x.kld_mean_chunk_se == before["kld_mean_chunk_se"]
    assert x.n_chunks == len(chunks)
    # and the pooled mean is the token-weighted mean of the languages' means
    tot = sum(s.n_tokens for s in br.languages.values())
    assert sum(s.kld_mean * s.n_tokens for s in br.languages.values()) / tot == pytest.approx(
        before["overall"]["kld_mean"], rel=1e-6)


def test_dict_arrays_and_round_trip(data):
    chunks, labels = data
    as_dicts = [c.to_arrays() for c in chunks]
    a = summarize_languages(as_dicts, labels, n_boot=0)
    b = summarize_languages(chunks, labels, n_boot=0)
    assert a.to_dict() == b.to_dict()
    back = LanguageBreakdown.from_dict(a.to_dict())
    assert back.to_dict() == a.to_dict()
    rows = a.rows()
    assert [r["lang"] for r in rows] == ["code", "de", "en"]
    assert {"n_chunks", "kld_mean", "kld_mean_se", "kld_median", "kld_p99", "same_top", "same_top_se",
            "ln_ppl_ratio", "ln_ppl_ratio_se"} <= set(rows[0])


def test_grouping_keeps_chunk_order_and_checks_labels(data):
    chunks, labels = data
    g = group_by_language(chunks, labels)
    en = [c for c, l in zip(chunks, labels) if l == "en"]
    assert len(g["en"]) == len(en) and all(a is b for a, b in zip(g["en"], en))
    with pytest.raises(ValueError, match="11 chunks but 2 language labels"):
        summarize_languages(chunks, ["en", "de"])
    with pytest.raises(ValueError, match="non-empty strings"):
        group_by_language(chunks[:2], ["en", None])
    with pytest.raises(ValueError, match="unknown worst_by"):
        summarize_languages(chunks, labels, worst_by="kld_max")


def test_worst_language_by_another_statistic_and_nan(data):
    chunks, labels = data
    br = summarize_languages(chunks, labels, n_boot=0, worst_by="kld_p99")
    p99 = {lang: _direct([c for c, l in zip(chunks, labels) if l == lang])["kld_p99"] for lang in NOISE}
    assert br.worst_language == max(p99, key=p99.get)
    s = list(br.languages.values())
    s[0].kld_mean = math.nan  # a language without a value is skipped, not chosen
    lang, value = worst_language(s, "kld_mean")
    assert lang != s[0].lang and value == max(x.kld_mean for x in s[1:])
    assert worst_language([], "kld_mean")[0] is None


def test_relative_to_best():
    table = {"q4": {"en": 0.02, "de": 0.05}, "q5": {"en": 0.01, "de": 0.06}, "q3": {"en": 0.04}}
    rel = relative_to_best(table)
    assert rel["q5"]["en"] == 1.0 and rel["q4"]["en"] == pytest.approx(2.0) and rel["q3"]["en"] == pytest.approx(4.0)
    assert rel["q4"]["de"] == 1.0 and rel["q5"]["de"] == pytest.approx(1.2)
    assert math.isnan(rel["q3"]["de"])
