"""Statistics per language: which language does a candidate hurt most, and by how much.

Every chunk holds one language (``data/chunks.py`` builds them that way), so a run's per-chunk
per-token metrics split cleanly by the chunk's label. Each language gets the same statistics as
the pooled run (:func:`ggufopt_ray.metrics.stats.summarize_chunks` on that language's chunks
alone): mean KLD with its token-level and chunk-level standard errors, median, p99, same-top ±
SE, ln(PPL ratio) ± SE and the chunk count. The pooled summary is computed from all chunks exactly
as before, independent of the labels, so adding labels changes no existing number.

A candidate that is fine on average may be poor on the smallest language; the *worst language*
(largest value of a statistic, mean KLD by default) is what a multilingual user needs to see.
Labels are free strings: a language code, or a data source (file, dataset config) for the
local and Hugging Face sources.

numpy only, like the rest of ``metrics/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ggufopt_ray.metrics.kld import TokenMetrics
from ggufopt_ray.metrics.stats import RunSummary, summarize_chunks

#: LanguageSummary fields that can pick the worst language (larger is worse for all of them)
WORST_BY = ("kld_mean", "kld_median", "kld_p99", "composite", "ln_ppl_ratio")


@dataclass
class LanguageSummary:
    """Statistics of one language's chunks (one row of ``languages.parquet`` with a candidate)."""

    lang: str
    n_chunks: int
    n_tokens: int
    kld_mean: float
    kld_mean_se: float  # token-level, as llama-perplexity prints it
    kld_mean_chunk_se: float  # chunks as sampling units: the honest one for ranking
    kld_median: float
    kld_p99: float
    composite: float
    same_top: float
    same_top_se: float
    ln_ppl_ratio: float
    ln_ppl_ratio_se: float

    @classmethod
    def from_run(cls, lang: str, run: RunSummary) -> "LanguageSummary":
        o = run.overall
        return cls(lang=lang, n_chunks=run.n_chunks, n_tokens=o.n_tokens, kld_mean=o.kld_mean,
                   kld_mean_se=o.kld_mean_se, kld_mean_chunk_se=run.kld_mean_chunk_se,
                   kld_median=o.kld_median, kld_p99=o.kld_p99, composite=o.composite,
                   same_top=o.same_top, same_top_se=o.same_top_se, ln_ppl_ratio=o.ln_ppl_ratio,
                   ln_ppl_ratio_se=o.ln_ppl_ratio_se)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (v if k == "lang" else int(v) if k in ("n_chunks", "n_tokens") else float(v))
                for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LanguageSummary":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class LanguageBreakdown:
    """The pooled run summary plus one :class:`LanguageSummary` per label (sorted by label)."""

    pooled: RunSummary
    languages: dict[str, LanguageSummary] = field(default_factory=dict)
    worst_by: str = "kld_mean"

    @property
    def worst(self) -> tuple[str | None, float]:
        """(label, value) of the worst language by ``worst_by``; (None, nan) when none has a value."""
        return worst_language(self.languages.values(), self.worst_by)

    @property
    def worst_language(self) -> str | None:
        return self.worst[0]

    @property
    def worst_language_kld(self) -> float:
        """Mean KLD of the worst language (whatever statistic chose it)."""
        lang = self.worst_language
        return math.nan if lang is None else self.languages[lang].kld_mean

    def rows(self) -> list[dict]:
        """One flat dict per language (add the candidate's columns to make languages.parquet)."""
        return [s.to_dict() for s in self.languages.values()]

    def to_dict(self) -> dict:
        return {"pooled": self.pooled.to_dict(), "languages": self.rows(), "worst_by": self.worst_by,
                "worst_language": self.worst_language, "worst_language_kld": self.worst_language_kld}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LanguageBreakdown":
        langs = [LanguageSummary.from_dict(r) for r in d.get("languages", [])]
        return cls(RunSummary.from_dict(d["pooled"]), {s.lang: s for s in langs}, d.get("worst_by", "kld_mean"))


def _check_labels(per_chunk: Sequence, langs: Sequence[str]) -> list[str]:
    labels = list(langs)
    if len(labels) != len(per_chunk):
        raise ValueError(f"{len(per_chunk)} chunks but {len(labels)} language labels; give one label per chunk")
    bad = [x for x in labels if not isinstance(x, str) or not x]
    if bad:
        raise ValueError(f"language labels must be non-empty strings, got {bad[0]!r}")
    return labels


def group_by_language(per_chunk: Sequence, langs: Sequence[str]) -> dict[str, list[TokenMetrics]]:
    """Label -> that label's chunks (TokenMetrics, in their original order), labels sorted.

    Sorted labels keep tables of different candidates aligned even when early stopping left them
    with different numbers of chunks (and so, possibly, different first-seen orders).
    """
    labels = _check_labels(per_chunk, langs)
    groups: dict[str, list[TokenMetrics]] = {}
    for chunk, lang in zip(per_chunk, labels):
        groups.setdefault(lang, []).append(TokenMetrics.from_arrays(chunk))
    return {k: groups[k] for k in sorted(groups)}


def summarize_languages(per_chunk: Sequence, langs: Sequence[str], *, worst_by: str = "kld_mean",
                        confidence: float = 0.95, n_boot: int = 1000, seed: int = 0,
                        n_boot_per_language: int = 0) -> LanguageBreakdown:
    """Pooled and per-language statistics of per-chunk per-token metrics, one label per chunk.

    per_chunk: TokenMetrics or dicts of their arrays (what ``summarize_chunks`` takes). The pooled
    summary is ``summarize_chunks(per_chunk, confidence, n_boot, seed)``, unchanged by the labels.
    Each language's summary is ``summarize_chunks`` of its chunks; ``n_boot_per_language`` > 0
    also bootstraps its composite interval (off by default: it costs as much as the pooled one,
    per language, and the per-language table does not show it).
    """
    if worst_by not in WORST_BY:
        raise ValueError(f"unknown worst_by {worst_by!r}; choose from {', '.join(WORST_BY)}")
    groups = group_by_language(per_chunk, langs)
    pooled = summarize_chunks(per_chunk, confidence=confidence, n_boot=n_boot, seed=seed)
    per_lang = {lang: LanguageSummary.from_run(lang, summarize_chunks(chunks, confidence=confidence,
                                                                      n_boot=n_boot_per_language, seed=seed))
                for lang, chunks in groups.items()}
    return LanguageBreakdown(pooled, per_lang, worst_by)


def worst_language(summaries, statistic: str = "kld_mean") -> tuple[str | None, float]:
    """(label, value) of the summary with the largest ``statistic``; NaNs are ignored.

    Ties go to the first label in sorted order, so the answer does not depend on input order.
    """
    if statistic not in WORST_BY:
        raise ValueError(f"unknown statistic {statistic!r}; choose from {', '.join(WORST_BY)}")
    best: tuple[str | None, float] = (None, math.nan)
    for s in sorted(summaries, key=lambda s: s.lang):
        v = float(getattr(s, statistic))
        if v == v and (best[0] is None or v > best[1]):
            best = (s.lang, v)
    return best


def relative_to_best(table: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``table[candidate][lang] / min over candidates of table[.][lang]``: the report's heatmap.

    1.0 marks each language's best candidate; 1.3 means 30 % more KLD than the best on that
    language. A language whose best value is not positive gets NaN (no meaningful ratio); a
    missing or NaN cell stays NaN.
    """
    langs = sorted({lang for row in table.values() for lang in row})
    best = {}
    for lang in langs:
        vals = np.array([float(row.get(lang, math.nan)) for row in table.values()], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        best[lang] = float(finite.min()) if finite.size else math.nan
    out: dict[str, dict[str, float]] = {}
    for cand, row in table.items():
        out[cand] = {}
        for lang in langs:
            v, b = float(row.get(lang, math.nan)), best[lang]
            out[cand][lang] = v / b if (b > 0 and math.isfinite(v)) else math.nan
    return out


def language_row_fields(per_chunk: Sequence, langs: Sequence[str], n_boot: int = 200) -> dict:
    """A results row's language columns: the worst language, the mean over languages, and every
    language's statistics as JSON (for languages.parquet). ``langs``: the language of each entry
    of ``per_chunk`` (extra labels, of chunks not evaluated yet, are ignored)."""
    breakdown = summarize_languages(per_chunk, list(langs)[:len(per_chunk)], n_boot=n_boot)
    means = [s.kld_mean for s in breakdown.languages.values()]
    return {"worst_language": breakdown.worst_language or "", "worst_language_kld": breakdown.worst_language_kld,
            "language_mean_kld": float(np.mean(means)) if means else math.nan,
            "languages": json.dumps(breakdown.rows(), default=float)}


__all__ = ["LanguageSummary", "LanguageBreakdown", "summarize_languages", "group_by_language",
           "worst_language", "relative_to_best", "language_row_fields", "WORST_BY"]
