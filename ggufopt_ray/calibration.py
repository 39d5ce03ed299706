"""Calibration mixes: which calibration chunks of each language an importance matrix is made of.

A calibration mix is a weighting of the calibration set's languages (or data sources) and a total
number of chunks: ``{en: 0.5, code: 0.5}`` over 8 chunks asks for 4 chunks' worth of English and
4 of code. An importance matrix is a sum of squared activations and a token count per column, so
the imatrix of a mix is the sum of per-language imatrices: each language is collected once, on
the first chunks of that language the mix needs, and the parts are added with their factors
(:func:`ggufopt_ray.engine.imatrix.mix_imatrices`). A whole number of chunks per language is then
exactly the collection on those chunks; a fractional share weights the last chunk; asking for
more chunks of a language than the calibration set has weights each of its chunks more (the
proportions, which are all the quantizer uses, stay exact; the note in the results says so).

This module is plain data and arithmetic: the trial collects the parts (Ray tasks) and combines
them with :func:`combine_parts`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ggufopt_ray.engine.imatrix import weighted_sum
from ggufopt_ray.errors import UserError

_SAFE = re.compile(r"[^A-Za-z0-9]+")


def normalize_mix(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """Weights -> proportions that sum to 1, in language order, zero shares dropped, rounded to
    4 decimals (so equal mixes from different weight vectors are one candidate)."""
    bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise UserError(f"calibration mix weights must be numbers >= 0, got {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        return ()
    shares = [(lang, round(float(w) / total, 4)) for lang, w in sorted(weights.items()) if w > 0]
    return tuple((lang, share) for lang, share in shares if share > 0)


def mix_label(mix: Sequence[tuple[str, float]]) -> str:
    """``(("code", 0.5), ("en", 0.5))`` -> ``code50+en50`` (percent shares; readable in a table)."""
    return "+".join(f"{lang}{_percent(share)}" for lang, share in mix)


def mix_file_label(mix: Sequence[tuple[str, float]]) -> str:
    """The mix in a file name: language names reduced to letters and digits."""
    return "-".join(f"{_SAFE.sub('', lang) or 'x'}{_percent(share)}" for lang, share in mix)


def _percent(share: float) -> str:
    p = 100.0 * float(share)
    return f"{p:.0f}" if abs(p - round(p)) < 0.05 else f"{p:.1f}"


@dataclass(frozen=True)
class MixPart:
    """One language's part of a mix: collect on ``indices`` (its first calibration chunks), then
    scale by ``chunks / len(indices)`` so the part holds ``chunks`` chunks' worth of it."""

    lang: str
    indices: tuple[int, ...]  # positions in the calibration set
    chunks: float  # chunks' worth of this language in the mix

    @property
    def factor(self) -> float:
        return self.chunks / len(self.indices)

    @property
    def extrapolated(self) -> bool:
        return self.factor > 1.0 + 1e-9


def mix_parts(mix: Sequence[tuple[str, float]], total: int, calib_langs: Sequence[str]) -> list[MixPart]:
    """The parts of ``mix`` over ``total`` chunks, from the calibration set's language labels.

    Each language takes its first ``ceil(total * share)`` chunks (at most as many as it has), so
    mixes of one total share their collections: the same language prefix is collected once."""
    if total < 1:
        raise UserError(f"a calibration mix needs at least 1 chunk in total, not {total}")
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(calib_langs):
        by_lang.setdefault(str(lang), []).append(i)
    parts = []
    for lang, share in mix:
        have = by_lang.get(lang)
        if not have:
            raise UserError(f"the calibration mix names {lang!r}, but the calibration chunks are of "
                            f"{', '.join(sorted(by_lang)) or 'no language'}; add it to dataset.langs "
                            "(with dataset.calib_chunks > 0)")
        want = total * float(share)
        n = min(len(have), max(1, math.ceil(want - 1e-9)))
        parts.append(MixPart(lang, tuple(have[:n]), want))
    return parts


def combine_parts(parts: Sequence[MixPart], imatrices: Sequence, label: str):
    """The mix's imatrix from each part's collection (``imatrices[i]`` collected on ``parts[i]``)."""
    for part, im in zip(parts, imatrices):
        if im.chunk_count != len(part.indices):
            raise ValueError(f"the imatrix of {part.lang} holds {im.chunk_count} chunks, "
                             f"not the {len(part.indices)} of its part")
    return weighted_sum([(im, part.factor) for part, im in zip(parts, imatrices)], label=label)
