"""Statistics of per-token comparisons: per chunk and overall, each with its uncertainty.

What llama-perplexity's KL-divergence mode prints, computed the same way (so numbers can be set
side by side), plus what a sweep needs to rank candidates honestly:

- KLD mean ± standard error, median, p90, p95, p99, p99.9, min, max. Percentiles are exact, from
  the stored per-token float32 values, by linear interpolation between order statistics at
  position ``q * (n - 1)`` (llama.cpp's ``percentile``; numpy's default "linear" method).
- Same-top-p ± its binomial standard error; mean and RMS Δp ± standard error.
- PPL(base), PPL(candidate) ± standard error, the correlation of the per-token NLLs, and
  ln(PPL(candidate)/PPL(base)) ± standard error. llama.cpp takes the latter from the two NLL
  variances and their covariance; that equals the standard error of the mean per-token NLL
  difference, which is how it is computed here (no cancellation).
- The composite score of the original toolkit, ``median^(1/3) * (KLD99 + 4 KLD95 + 5 KLD90)^(2/3)``
  (real cube roots, so slightly negative KLDs from a compact baseline do not give NaN).

Token-level standard errors (llama.cpp's) treat tokens as independent. Tokens of one chunk share
a context and are not, so the overall summary also gives a chunk-level (cluster) standard error
of the mean and a bootstrap-over-chunks interval for the composite score (whole chunks resampled,
seeded; see ``bootstrap_interval``): these are the honest uncertainties when ranking candidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.special import stdtrit

from ggufopt_ray.metrics.kld import TokenMetrics

# Name -> fraction for the KLD percentiles that are reported.
QUANTILES: dict[str, float] = {"median": 0.5, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p99.9": 0.999}
# Statistics a bootstrap (or the stopping rule) can target.
STATISTICS = ("mean", *QUANTILES, "composite")



def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom.

    ``scipy.special.stdtrit`` is the function ``scipy.stats.t.ppf`` evaluates, without importing
    ``scipy.stats``: that import costs ~1.5 s, paid again by every Ray worker that decides a stop.
    For upper tails (``q`` near 1) it uses the symmetry ``t_q = -t_{1-q}``, which keeps the small
    tail probability exact instead of rounding ``1 - q``.
    """
    if q > 0.5:
        return -float(stdtrit(df, 1.0 - q))
    return float(stdtrit(df, q))

def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation at ``fraction * (n - 1)`` of an ascending array (llama.cpp's rule)."""
    v = sorted_values
    n = v.shape[0]
    if n == 0:
        return math.nan
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    h = fraction * (n - 1)
    i = int(math.floor(h))
    f = h - i
    j = min(i + 1, n - 1)
    return float((1.0 - f) * float(v[i]) + f * float(v[j]))


def composite_from_quantiles(median, p90, p95, p99):
    """``median^(1/3) * (p99 + 4 p95 + 5 p90)^(2/3)``; works element-wise on arrays too."""
    return np.cbrt(median) * np.cbrt(np.asarray(p99) + 4 * np.asarray(p95) + 5 * np.asarray(p90)) ** 2


def composite_score(kld: np.ndarray) -> float:
    """The original toolkit's composite score of a set of per-token KLD values (lower is better)."""
    v = np.sort(np.asarray(kld, dtype=np.float32).reshape(-1))
    if v.size == 0:
        return math.nan
    q = {k: percentile(v, f) for k, f in QUANTILES.items()}
    return float(composite_from_quantiles(q["median"], q["p90"], q["p95"], q["p99"]))


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / n) with the n-1 variance (NaN SE below 2 values)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    m = float(x.mean())
    if n < 2:
        return m, math.nan
    return m, float(math.sqrt(((x - m) ** 2).sum() / (n - 1) / n))


@dataclass
class KLDSummary:
    """Statistics of one set of scored tokens (a chunk, or all chunks together)."""

    n_tokens: int
    kld_mean: float
    kld_mean_se: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_min: float
    kld_max: float
    composite: float
    same_top: float
    same_top_se: float
    delta_p_mean: float
    delta_p_mean_se: float
    delta_p_rms: float
    delta_p_rms_se: float
    ppl_base: float
    ppl_base_se: float
    ppl_cand: float
    ppl_cand_se: float
    nll_correlation: float
    ln_ppl_ratio: float
    ln_ppl_ratio_se: float

    def to_dict(self) -> dict:
        return {k: (int(v) if k == "n_tokens" else float(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "KLDSummary":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _as_metrics(x) -> TokenMetrics:
    return TokenMetrics.from_arrays(x)


def summarize(metrics) -> KLDSummary:
    """Statistics of one set of tokens (a TokenMetrics or a dict of its arrays)."""
    m = _as_metrics(metrics)
    n = len(m)
    kld = np.sort(m.kld)
    q = {k: percentile(kld, f) for k, f in QUANTILES.items()}
    kmean, kse = mean_and_se(m.kld)

    top = float(np.mean(m.same_top, dtype=np.float64)) if n else math.nan
    top_se = math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else math.nan

    dp = m.delta_p.astype(np.float64)
    dp_mean, dp_se = mean_and_se(dp)
    mse, mse_se = mean_and_se(dp * dp)
    rms = math.sqrt(mse) if mse == mse else math.nan
    rms_se = 0.5 / rms * mse_se if rms > 0 else math.nan

    nb = m.nll_base.astype(np.float64)
    nc = m.nll_cand.astype(np.float64)
    lb, lb_se = mean_and_se(nb)
    lc, lc_se = mean_and_se(nc)
    ratio, ratio_se = mean_and_se(nc - nb)
    if n > 1 and np.isfinite(nb).all() and np.isfinite(nc).all():
        sb, sc = nb.std(), nc.std()
        cor = float(((nb - nb.mean()) * (nc - nc.mean())).mean() / (sb * sc)) if sb > 0 and sc > 0 else math.nan
    else:
        cor = math.nan
    ppl_b, ppl_c = math.exp(lb) if lb == lb else math.nan, math.exp(lc) if lc == lc else math.nan

    return KLDSummary(
        n_tokens=n, kld_mean=kmean, kld_mean_se=kse,
        kld_median=q["median"], kld_p90=q["p90"], kld_p95=q["p95"], kld_p99=q["p99"], kld_p999=q["p99.9"],
        kld_min=float(kld[0]) if n else math.nan, kld_max=float(kld[-1]) if n else math.nan,
        composite=float(composite_from_quantiles(q["median"], q["p90"], q["p95"], q["p99"])) if n else math.nan,
        same_top=top, same_top_se=top_se,
        delta_p_mean=dp_mean, delta_p_mean_se=dp_se, delta_p_rms=rms, delta_p_rms_se=rms_se,
        ppl_base=ppl_b, ppl_base_se=ppl_b * lb_se, ppl_cand=ppl_c, ppl_cand_se=ppl_c * lc_se,
        nll_correlation=cor, ln_ppl_ratio=ratio, ln_ppl_ratio_se=ratio_se,
    )


# --------------------------------------------------------------------------- chunk bootstrap

def kld_arrays(chunks) -> list[np.ndarray]:
    """Per-chunk float32 KLD arrays from KLD arrays, TokenMetrics or dicts with a "kld" entry."""
    out = []
    for c in chunks:
        if isinstance(c, TokenMetrics):
            out.append(c.kld)
        elif isinstance(c, Mapping):
            out.append(np.asarray(c["kld"], dtype=np.float32).reshape(-1))
        else:
            out.append(np.asarray(c, dtype=np.float32).reshape(-1))
    return out


def chunk_bootstrap(chunks, statistic: str = "composite", n_boot: int = 1000, seed: int = 0,
                    batch: int = 256) -> np.ndarray:
    """Bootstrap replicates of a KLD statistic, resampling whole chunks with replacement.

    chunks: per-chunk KLD arrays (or TokenMetrics / dicts with "kld"). statistic: "mean", a
    QUANTILES name or "composite". Each replicate draws as many chunks as there are, with
    replacement, and evaluates the statistic on the union of their tokens; percentiles use the
    same interpolation as ``percentile``. Deterministic for a given seed.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
    arrays = kld_arrays(chunks)
    n_chunks = len(arrays)
    if n_chunks == 0:
        return np.full(n_boot, np.nan)
    sizes = np.array([a.size for a in arrays], np.int64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_chunks, np.full(n_chunks, 1.0 / n_chunks), size=n_boot)  # [B, C]
    if statistic == "mean":
        sums = np.array([a.sum(dtype=np.float64) for a in arrays])
        return (weights @ sums) / (weights @ sizes)

    values = np.concatenate(arrays)
    owner = np.repeat(np.arange(n_chunks), sizes)
    order = np.argsort(values, kind="stable")
    v = values[order].astype(np.float64)
    owner = owner[order]
    names = ["median", "p90", "p95", "p99"] if statistic == "composite" else [statistic]
    fracs = np.array([QUANTILES[k] for k in names])
    result = np.empty((n_boot, len(names)))
    n = v.size
    for b0 in range(0, n_boot, batch):
        w = weights[b0:b0 + batch]
        nb = w.shape[0]
        # Replicate r is the sorted sequence with element i repeated w[r, owner[i]] times; element
        # i covers expanded positions [cum[i-1], cum[i]). Offsetting each replicate's cum by
        # r * stride makes all replicates one ascending array: a single searchsorted finds them.
        cum = np.cumsum(w[:, owner], axis=1)
        total = cum[:, -1].astype(np.float64)
        stride = int(total.max()) + 2
        offs = (np.arange(nb, dtype=np.int64) * stride)[:, None]
        flat = (cum + offs).ravel()
        h = fracs[None, :] * (total[:, None] - 1)  # [nb, Q] position in the expanded sequence
        lo = np.floor(h)
        frac = h - lo
        lo_i = lo.astype(np.int64) + offs
        before = np.arange(nb, dtype=np.int64)[:, None] * n  # elements of the earlier replicates
        # element holding expanded position j = number of elements whose range ends at or before j
        i_lo = np.minimum(np.searchsorted(flat, lo_i.ravel(), side="right").reshape(nb, -1) - before, n - 1)
        i_hi = np.minimum(np.searchsorted(flat, (lo_i + 1).ravel(), side="right").reshape(nb, -1) - before, n - 1)
        result[b0:b0 + batch] = (1 - frac) * v[i_lo] + frac * v[i_hi]
    if statistic == "composite":
        return composite_from_quantiles(result[:, 0], result[:, 1], result[:, 2], result[:, 3])
    return result[:, 0]


def bootstrap_interval(chunks, statistic: str = "composite", confidence: float = 0.95,
                       n_boot: int = 1000, seed: int = 0, method: str = "log_t") -> tuple[float, float]:
    """Confidence interval of a KLD statistic from ``chunk_bootstrap`` replicates.

    method "log_t" (default): ``estimate * exp(± t_{C-1} * sd(log replicates))``. The statistics are
    positive and right-skewed, which the log scale symmetrizes; the t quantile accounts for having
    few chunks; and a standard deviation is a steadier function of the replicates than their tail
    quantiles, so the width is less noisy (this matters when it decides a stop: simulated coverage
    is closer to nominal than with the percentile interval). It falls back to "percentile" (the
    alpha/2 and 1 - alpha/2 quantiles of the replicates) when a value is not positive.
    NaNs with fewer than 2 chunks.
    """
    arrays = kld_arrays(chunks)
    c = len(arrays)
    if c < 2:
        return math.nan, math.nan
    reps = chunk_bootstrap(arrays, statistic, n_boot=n_boot, seed=seed)
    alpha = 1.0 - confidence
    if method == "log_t":
        est = statistic_of(arrays, statistic)
        if est > 0 and np.all(reps > 0):
            h = t_quantile(1 - alpha / 2, c - 1) * float(np.std(np.log(reps), ddof=1))
            return est * math.exp(-h), est * math.exp(h)
    elif method != "percentile":
        raise ValueError(f"unknown bootstrap interval method {method!r}")
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def statistic_of(chunks, statistic: str) -> float:
    """A KLD statistic ("mean", a QUANTILES name, "composite") over all tokens of the chunks."""
    arrays = kld_arrays(chunks)
    if statistic == "mean":
        total = sum(a.size for a in arrays)
        return float(sum(a.sum(dtype=np.float64) for a in arrays) / total) if total else math.nan
    v = np.sort(np.concatenate(arrays)) if arrays else np.zeros(0, np.float32)
    if statistic == "composite":
        return composite_score(v)
    if statistic not in QUANTILES:
        raise ValueError(f"unknown statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
    return percentile(v, QUANTILES[statistic])


def chunk_mean_se(chunks) -> float:
    """Cluster-robust standard error of the overall mean KLD, chunks as the sampling units.

    Ratio estimator: mean = sum S_c / sum n_c, SE^2 = C/(C-1) * sum (S_c - mean n_c)^2 / (sum n_c)^2.
    """
    arrays = kld_arrays(chunks)
    c = len(arrays)
    if c < 2:
        return math.nan
    s = np.array([a.sum(dtype=np.float64) for a in arrays])
    n = np.array([a.size for a in arrays], np.float64)
    mean = s.sum() / n.sum()
    return float(math.sqrt(c / (c - 1) * ((s - mean * n) ** 2).sum()) / n.sum())


@dataclass
class RunSummary:
    """Statistics over the chunks evaluated so far: overall, per chunk, and chunk-level intervals."""

    overall: KLDSummary
    chunks: list[KLDSummary] = field(default_factory=list)
    kld_mean_chunk_se: float = math.nan
    composite_lo: float = math.nan
    composite_hi: float = math.nan
    confidence: float = 0.95
    n_boot: int = 0
    seed: int = 0

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def to_dict(self) -> dict:
        return {"overall": self.overall.to_dict(), "chunks": [c.to_dict() for c in self.chunks],
                "n_chunks": self.n_chunks, "kld_mean_chunk_se": self.kld_mean_chunk_se,
                "composite_lo": self.composite_lo, "composite_hi": self.composite_hi,
                "confidence": self.confidence, "n_boot": self.n_boot, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunSummary":
        return cls(overall=KLDSummary.from_dict(d["overall"]),
                   chunks=[KLDSummary.from_dict(c) for c in d.get("chunks", [])],
                   kld_mean_chunk_se=d["kld_mean_chunk_se"], composite_lo=d["composite_lo"],
                   composite_hi=d["composite_hi"], confidence=d["confidence"],
                   n_boot=d["n_boot"], seed=d["seed"])

    def to_flat_dict(self) -> dict:
        """Overall statistics plus the chunk-level ones, one level deep (a results-table row)."""
        return {**self.overall.to_dict(), "n_chunks": self.n_chunks,
                "kld_mean_chunk_se": self.kld_mean_chunk_se, "composite_lo": self.composite_lo,
                "composite_hi": self.composite_hi, "confidence": self.confidence}


def summarize_chunks(per_chunk: Sequence, confidence: float = 0.95, n_boot: int = 1000,
                     seed: int = 0) -> RunSummary:
    """Per-chunk and overall statistics of chunks of per-token metrics (TokenMetrics or dicts)."""
    parts = [_as_metrics(c) for c in per_chunk]
    overall = summarize(TokenMetrics.concat(parts))
    lo, hi = bootstrap_interval(parts, "composite", confidence, n_boot, seed) if n_boot else (math.nan, math.nan)
    return RunSummary(overall=overall, chunks=[summarize(p) for p in parts],
                      kld_mean_chunk_se=chunk_mean_se(parts), composite_lo=lo, composite_hi=hi,
                      confidence=confidence, n_boot=n_boot, seed=seed)
