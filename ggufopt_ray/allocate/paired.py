"""A candidate's mean KLD on the reference's chunks: the paired (ratio) estimate the allocator feeds on.

Why not each candidate's own mean: with racing, candidates stop after a few chunks and each
evaluates its own staggered subset (the shared anchor chunks, then its own offset). Chunks differ
in difficulty far more than most tensor groups change the KLD: on tinycode-a (vocabulary 8,192,
Q4_K_M with an importance matrix) the reference's chunk means spanned 0.77-1.32x their average,
while most single-group changes moved the KLD by 1-10%. A ΔKLD taken between two means over
different chunks is then mostly the chunks' difference: almost every single-group change,
downgrades included, came out ~1e-4 below the reference (6-10% of its KLD), and fifteen such
biases summed to a predicted KLD below zero. The
borrowed-strength (two-way) estimate removes an *additive* chunk effect, but the effect is
multiplicative (a hard chunk raises every candidate's KLD in proportion).

So each candidate is compared with the reference on the chunks both evaluated::

    K_cand ≈ K_ref · Σ_{c∈S} k_cand[c] / Σ_{c∈S} k_ref[c]

with ``K_ref`` the reference's mean over all its chunks (the allocator evaluates the reference on
every chunk, so S is the candidate's own chunks). The ratio estimator is exact when chunk effects
are multiplicative and needs no model of them. On tinycode-a (``bench/allocate.py --imatrix``,
types Q2_K..Q8_0 and IQ4_XS) the corrected predictor's rank correlation with the measured mixes
went from 0.43 to 0.90 and its median relative error from 47% to 5% (the additive model's
predictions had been clamped at zero for 15 of 22 mixes).
"""

from __future__ import annotations

import json
import math
from typing import Mapping

MIN_COMMON_CHUNKS = 3  # fewer shared chunks than this: the candidate's own mean is the better guess


def chunk_means(row: Mapping) -> dict[int, float]:
    """``{chunk index: mean KLD}`` of a results row's ``chunk_kld`` field ({} when it has none)."""
    text = row.get("chunk_kld")
    if not isinstance(text, str) or not text:
        return {}
    try:
        return {int(k): float(v) for k, v in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def reference_mean(reference: Mapping[int, float]) -> float:
    """The reference's mean KLD over all its chunks (chunks hold equal numbers of scored tokens)."""
    return math.fsum(reference.values()) / len(reference) if reference else math.nan


def paired_mean(candidate: Mapping[int, float], reference: Mapping[int, float],
                min_common: int = MIN_COMMON_CHUNKS) -> float | None:
    """The candidate's mean KLD scaled to the reference's chunks (the ratio estimate above), or
    None when they share fewer than ``min_common`` chunks or the reference's share is zero."""
    common = [i for i in candidate if i in reference]
    if len(common) < max(1, min_common):
        return None
    ref_sum = math.fsum(reference[i] for i in common)
    if not ref_sum > 0:
        return None
    return reference_mean(reference) * math.fsum(candidate[i] for i in common) / ref_sum
