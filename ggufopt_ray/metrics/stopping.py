"""Early stopping that depends on the data: stop once the target statistic is known well enough.

Rule: after at least ``min_chunks`` chunks, stop when the confidence interval of the target
(mean KLD, a KLD percentile, or the composite score) has a half-width of at most ``margin``
times the estimate, at the given confidence, after each of the last ``patience`` chunks.
``max_chunks`` (or running out of chunks) ends a run that never gets there. A candidate whose
KLD varies more from chunk to chunk has a wider interval at the same number of chunks, so it
runs longer. The original toolkit's rule stopped after a count fixed in advance, whatever the
data (research/seed-original.md, B-1..B-3).

Why chunks, and which interval
------------------------------
Tokens of one chunk share their context (and usually a document), so their KLDs are correlated:
token-level standard errors (llama.cpp's) are too small, by a factor that differs between
candidates. Chunks are drawn independently from the corpus, so they are the sampling units:

- ``mean``: t interval on the chunk totals: ratio estimator (sum KLD / sum tokens) with the
  cluster-robust standard error and C - 1 degrees of freedom, taken on the log scale
  (``mean * exp(± t se / mean)``) because the mean KLD is positive and its sampling
  distribution right-skewed. It needs only the chunk sums and costs nothing.
- percentiles and ``composite``: bootstrap over chunks (whole chunks resampled with
  replacement, the statistic recomputed on their tokens; no distributional assumption, and the
  only practical interval for the composite score, a non-linear function of four percentiles),
  summarized as ``estimate * exp(± t sd(log replicates))`` (see ``stats.bootstrap_interval``).
  The bootstrap seed is derived from ``seed`` and the number of chunks, so a decision is a pure
  function of the data and the rule: a restarted run makes the same decisions.

Checking after every chunk is a sequential procedure: stopping the first time an interval happens
to be narrow makes the final interval cover the truth less often than nominal. Requiring the
criterion for ``patience`` consecutive chunks (default 3) and using intervals whose width is a
steady function of the data keeps the simulated coverage near nominal (tests/test_stopping.py
prints it: about 0.93-0.95 for the mean, 0.88-0.93 for the composite at 95%). Tail percentiles
(p99 and beyond) from short chunks are the hardest case and cover less: prefer the mean or the
composite as the target.

``StoppingState`` carries the rule and the decision history in a JSON-safe form
(``to_dict``/``from_dict``), so a run killed and restarted continues where it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.stats import STATISTICS, bootstrap_interval, kld_arrays, statistic_of, t_quantile

TARGET_ALIASES = {"score": "composite", "p999": "p99.9", "p50": "median"}


@dataclass(frozen=True)
class StoppingRule:
    """When to stop. target: mean | median | p90 | p95 | p99 | p99.9 | composite."""

    target: str = "mean"
    confidence: float = 0.95
    margin: float = 0.05  # stop when the half-width <= margin * |estimate|
    min_chunks: int = 8
    max_chunks: int | None = None
    patience: int = 3  # ... after each of this many consecutive chunks
    method: str = "auto"  # auto: t for the mean, bootstrap otherwise; or "t" / "bootstrap"
    n_boot: int = 500
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "target", TARGET_ALIASES.get(self.target, self.target))
        if self.target not in STATISTICS:
            raise UserError(f"early-stopping target {self.target!r} is unknown; use one of {', '.join(STATISTICS)}")
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence {self.confidence} must lie strictly between 0 and 1, e.g. 0.95")
        if not self.margin > 0:
            raise UserError(f"margin {self.margin} must be > 0 (a relative half-width, e.g. 0.05 for ±5%)")
        if self.min_chunks < 2:
            raise UserError(f"min_chunks {self.min_chunks} must be at least 2 (an interval needs two chunks)")
        if self.max_chunks is not None and self.max_chunks < self.min_chunks:
            raise UserError(f"max_chunks {self.max_chunks} is below min_chunks {self.min_chunks}")
        if self.patience < 1:
            raise UserError(f"patience {self.patience} must be at least 1")
        if self.method not in ("auto", "t", "bootstrap"):
            raise UserError(f"interval method {self.method!r} is unknown; use auto, t or bootstrap")
        if self.method == "t" and self.target != "mean":
            raise UserError("the t interval applies to the mean only; "
                            "use method=bootstrap for percentiles and composite")
        if self.n_boot < 50:
            raise UserError(f"n_boot {self.n_boot} is too small for an interval; use at least 200")

    @property
    def resolved_method(self) -> str:
        if self.method == "auto":
            return "t" if self.target == "mean" else "bootstrap"
        return self.method

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "StoppingRule":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def interval(self, chunks: Sequence) -> "Interval":
        return target_interval(chunks, self)

    def decide(self, chunks: Sequence, n_available: int | None = None) -> "StopDecision":
        return decide(chunks, self, n_available)


@dataclass
class Interval:
    """A point estimate of the target with its confidence interval, from ``n_chunks`` chunks."""

    estimate: float
    lo: float
    hi: float
    n_chunks: int
    method: str

    @property
    def rel_half_width(self) -> float:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or not self.estimate:
            return math.inf
        return 0.5 * (self.hi - self.lo) / abs(self.estimate)

    def to_dict(self) -> dict:
        return {**asdict(self), "rel_half_width": self.rel_half_width}


@dataclass
class StopDecision:
    stop: bool
    reason: str  # "precision_reached" | "max_chunks" | "need_min_chunks" | "continue"
    interval: Interval | None = None


def t_interval_mean(chunks: Sequence, confidence: float = 0.95) -> Interval:
    """Interval of the overall mean KLD with chunks as clusters: ``mean * exp(± t se / mean)``.

    Ratio estimator mean = sum KLD / sum tokens, cluster-robust standard error
    ``se^2 = C/(C-1) * sum (S_c - mean n_c)^2 / (sum n_c)^2``, t quantile with C - 1 degrees of
    freedom; on the log scale (delta method), or linear if the mean is not positive.
    """
    arrays = kld_arrays(chunks)
    c = len(arrays)
    s = np.array([a.sum(dtype=np.float64) for a in arrays])
    n = np.array([a.size for a in arrays], np.float64)
    if c == 0 or n.sum() == 0:
        return Interval(math.nan, math.nan, math.nan, c, "t")
    mean = float(s.sum() / n.sum())
    if c < 2:
        return Interval(mean, math.nan, math.nan, c, "t")
    se = math.sqrt(c / (c - 1) * ((s - mean * n) ** 2).sum()) / n.sum()
    tq = t_quantile(0.5 + confidence / 2, c - 1)
    if mean > 0:
        h = tq * se / mean
        return Interval(mean, mean * math.exp(-h), mean * math.exp(h), c, "t")
    return Interval(mean, mean - tq * se, mean + tq * se, c, "t")


def _derived_seed(seed: int, n_chunks: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(n_chunks)]).generate_state(1)[0])


def target_interval(chunks: Sequence, rule: StoppingRule) -> Interval:
    """The rule's target with its interval, from the per-chunk KLD arrays seen so far."""
    arrays = kld_arrays(chunks)
    c = len(arrays)
    if rule.resolved_method == "t":
        return t_interval_mean(arrays, rule.confidence)
    est = statistic_of(arrays, rule.target)
    lo, hi = bootstrap_interval(arrays, rule.target, rule.confidence, rule.n_boot,
                                seed=_derived_seed(rule.seed, c), method="log_t")
    return Interval(est, lo, hi, c, "bootstrap")


def decide(chunks: Sequence, rule: StoppingRule, n_available: int | None = None) -> StopDecision:
    """Whether to stop after the chunks given (all chunks so far, in order). Pure function.

    chunks: per-chunk KLD arrays (or TokenMetrics, or dicts with a "kld" array). Stops when the
    interval has been narrow enough after each of the last ``rule.patience`` chunks (earlier
    prefixes are evaluated only when the current one passes), or at the chunk limit (the rule's
    ``max_chunks`` or ``n_available``, the number of chunks the run has, if given).
    """
    arrays = kld_arrays(chunks)
    c = len(arrays)
    limit = rule.max_chunks
    if n_available is not None:
        limit = n_available if limit is None else min(limit, n_available)
    at_limit = limit is not None and c >= limit
    if c < rule.min_chunks:
        return StopDecision(True, "max_chunks", None) if at_limit else StopDecision(False, "need_min_chunks", None)
    iv = target_interval(arrays, rule)
    narrow = iv.rel_half_width <= rule.margin
    for k in range(1, rule.patience):
        if not narrow:
            break
        narrow = c - k >= rule.min_chunks and target_interval(arrays[: c - k], rule).rel_half_width <= rule.margin
    if narrow:
        return StopDecision(True, "precision_reached", iv)
    if at_limit:
        return StopDecision(True, "max_chunks", iv)
    return StopDecision(False, "continue", iv)


@dataclass
class StoppingState:
    """The rule, the decision after each chunk, and whether (and why) the run stopped."""

    rule: StoppingRule = field(default_factory=StoppingRule)
    n_chunks: int = 0
    stopped: bool = False
    stop_chunk: int | None = None  # number of chunks used when the run stopped
    reason: str = "running"
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rule": self.rule.to_dict(), "n_chunks": self.n_chunks, "stopped": self.stopped,
                "stop_chunk": self.stop_chunk, "reason": self.reason,
                "history": [dict(h) for h in self.history]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "StoppingState":
        return cls(rule=StoppingRule.from_dict(d["rule"]), n_chunks=int(d["n_chunks"]),
                   stopped=bool(d["stopped"]),
                   stop_chunk=None if d.get("stop_chunk") is None else int(d["stop_chunk"]),
                   reason=str(d["reason"]), history=[dict(h) for h in d.get("history", [])])


def update(state: StoppingState, chunks: Sequence, n_available: int | None = None) -> StoppingState:
    """The state after deciding on ``chunks`` (every chunk so far); ``state`` is not modified.

    Deciding again on the same chunks (e.g. after a restart) gives an equal state; a stopped
    state stays as it is.
    """
    if state.stopped:
        return state
    decision = decide(chunks, state.rule, n_available)
    entry: dict = {"n_chunks": len(chunks), "reason": decision.reason}
    if decision.interval is not None:
        iv = decision.interval
        entry.update(estimate=iv.estimate, lo=iv.lo, hi=iv.hi, rel_half_width=iv.rel_half_width)
    history = [h for h in state.history if h["n_chunks"] < len(chunks)] + [entry]
    return replace(state, n_chunks=len(chunks), history=history, stopped=decision.stop,
                   stop_chunk=len(chunks) if decision.stop else None,
                   reason=decision.reason if decision.stop else "running")
