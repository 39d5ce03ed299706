"""Racing: stop candidates whose place is settled, and borrow strength between candidates.

All candidates of a sweep are evaluated on the same chunks in the same order (chunk ``i`` is the
same text for everyone). Chunk difficulty moves every candidate together (per-chunk mean KLD has
a coefficient of variation of 0.25-0.3 between chunks, but log per-chunk means correlate
0.77-0.92 between quant types), so comparisons *on the same chunks* are far sharper than each
candidate's own interval. Two uses of that, both pure functions of the per-chunk values:

1. Dominance (``find_dominator``). Candidate A is *dominated* when another candidate B that is
   no larger (``size_B <= size_A``) has a lower target, shown by a paired one-sided t test on the
   per-chunk differences over the chunks both have (the first ``min(k_A, k_B)`` chunks). A
   dominated candidate cannot be on the size/quality front whatever its remaining chunks say,
   so it stops. Error control (what tests/test_racing.py checks by simulation):

   - Per look: one-sided t bound with ``n - 1`` degrees of freedom on ``d_i = v_B,i - v_A,i``
     (plain differences, ``scale="linear"``, the default). B dominates A when
     ``mean(d) + t_{1 - a, n-1} sd(d) / sqrt(n) < 0``.
   - Repeated looks: racing looks after every chunk. A pair's data change only when its paired
     count ``n`` grows, so a pair is tested at most ``L = max_chunks - min_paired_chunks + 1``
     distinct times; each look gets ``a = alpha_pair / L`` (Bonferroni over looks, i.e. a
     uniform alpha-spending function). By the union bound the chance that a pair *ever* rejects
     falsely is <= ``alpha_pair``, whatever the dependence between looks (they are strongly
     dependent, so this is conservative; simulated rates are far below alpha).
   - Several possible dominators: ``alpha_pair = alpha / m``, ``m`` the number of candidates no
     larger than A (``family="candidate"``: P(a front candidate is ever stopped as dominated)
     <= alpha), or the number of comparable ordered pairs of the whole sweep
     (``family="sweep"``: P(any front candidate is stopped) <= alpha). Holm's procedure would
     give the same decision: stopping needs only one rejection, and Holm's first step is
     Bonferroni. ``m`` must not shrink over time; a sweep that adds candidates as it goes
     (Optuna) should set ``max_comparisons`` to an upper bound (e.g. the trial budget - 1).
   - Why plain differences and not log-ratios: the log-ratio cancels the multiplicative chunk
     factor exactly and is more powerful for large gaps, but it tests the *geometric* mean:
     for log-normal chunks, ``E[log v_B - log v_A] = log(m_B/m_A) - (s_B^2 - s_A^2)/2``, so two
     candidates with equal mean KLD and different chunk-to-chunk noise look different, and
     that bias does not shrink with more chunks. Plain differences estimate exactly the
     difference of the reported (arithmetic) means, and under equality they are symmetric, so
     the t test holds at small n. With the per-look alpha racing needs, the log scale saved
     under one chunk per dominated candidate in simulation, so validity wins. ``scale="log"``
     remains available (and falls back to linear if a value is not positive).

   Targets that are not additive over chunks (percentiles, composite): the paired unit is the
   *per-chunk* statistic (``per_chunk_values``), i.e. dominance means "lower on the typical
   chunk", a close proxy of the pooled statistic when candidates differ by a scale factor.

2. Precision with a control variate (``regression_estimate``). A candidate seen on chunks
   ``S = 0..n-1`` and a control ``x`` seen on ``R = 0..n_R-1 ⊇ S`` (a candidate further ahead,
   or the baseline's own per-chunk entropy, known for every chunk before any trial): the
   regression estimator of the candidate's mean is

       y_reg = mean_S(y) + b (mean_R(x) - mean_S(x)),   b = S_xy / S_xx over S,

   with (double-sampling variance, model y = a + b x + e, residual variance s_e^2 = RSS/(n-2))

       SE^2 = s_e^2 [ (1/n - 1/N) + (mean_R(x) - mean_S(x))^2 / S_xx ]
              + b^2 s_x,R^2 (1/n_R - 1/N)

   ``N`` is the population of chunks: ``population="finite"`` means the mean over the
   sweep's chunks ``0..max_chunks-1`` (what evaluating every chunk would report; the FPC terms
   vanish as n -> N), ``"infinite"`` the mean over the corpus the chunks were drawn from
   (1/N = 0; this is the quantity stopping.py's intervals target). The first term is the
   residual error of the fit (with the slope's own error), the second what the control does not
   know about the unseen chunks. The interval is ``y_reg * exp(± t_df SE / y_reg)`` (log
   scale, as stopping.py: the mean is positive and right-skewed), df by Satterthwaite from the
   two terms (n - 2 for the fit, n_R - 1 for the control's; n - 2 when the control covers the
   whole population). Simulated coverage at 95% (tests/test_racing.py): 0.934-0.949 for the
   finite mean, 0.938-0.945 for the corpus mean, 0.934 at the stop inside a race. The small
   shortfall comes from residuals that grow with chunk difficulty (multiplicative noise), which
   the homoscedastic s_e^2 does not model. Without a control it is the
   plain mean with ``SE^2 = s_y^2 (1/n - 1/N)`` and n - 1 degrees of freedom. The prefix of a
   shuffled chunk list is a random subsample of R, which is what the formula assumes.

   The precision rule (``race_decision``): after ``min_chunks``, stop when the interval's
   half-width is <= ``margin`` * estimate for each of the last ``patience`` prefixes (the
   stopping.py idea that keeps stop-time coverage near nominal). Percentiles/composite keep the
   plain rule of stopping.py on their per-token arrays (``RaceEntry.chunks``): a pooled
   percentile is not a mean of per-chunk values, so the regression estimator does not apply.

3. Staggered orders and the two-way estimator (``chunk_order``, ``twoway_estimate``; the
   default, ``order="staggered"``). With every candidate in the same order, the chunk
   difficulty of a chunk nobody but the deepest candidate reached is known only through that
   one candidate, so borrowing needs one candidate to run (nearly) all chunks. Instead every
   candidate evaluates the same ``anchor`` chunks first (paired chunks for dominance, and a
   connected design), then walks the remaining chunks from its own offset: early stops of
   different candidates cover different chunks, and a two-way fit of ``log y_cj = alpha_c +
   gamma_j`` over every observed cell predicts each candidate's unseen chunks. Dominance then
   pairs two candidates on the chunks both evaluated. Simulated (tests/test_racing.py, 6 types,
   CV 0.3, margin 0.05): 0.58 of the chunks against 0.79 with shared orders, stop-time coverage
   0.946; imatrix twins caught as dominated 89% (others stop by precision) against 100%.

``race_decision`` combines them: dominated -> stop (``dominated_by=<label>``); front candidates
run to the precision target (``precision_reached``) or the cap (``max_chunks``); else
``running``. Decisions depend only on the values given, so a restarted sweep decides the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.stats import STATISTICS, kld_arrays, statistic_of, t_quantile
from ggufopt_ray.metrics.stopping import TARGET_ALIASES, StoppingRule, decide

CONTROLS = ("auto", "twoway", "reference", "entropy", "none")
ORDERS = ("staggered", "shared")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # offsets r * 0.618.. mod 1 spread evenly for any count r


@lru_cache(maxsize=4096)
def _t_upper(p: float, df: int) -> float:
    """The (1 - p) quantile of Student's t (cached: racing asks for the same few many times)."""
    return -t_quantile(p, df)


@dataclass(frozen=True)
class RacingConfig:
    """Racing and precision settings (the sweep maps its Hydra keys onto these).

    alpha: error rate of stopping a front candidate as dominated (per candidate, or per sweep
    with family="sweep"), over all looks. max_chunks: the cap on chunks per candidate, the
    horizon of the looks, and with population="finite" the population the mean refers to.
    """

    target: str = "mean"
    alpha: float = 0.05
    family: str = "candidate"  # candidate | sweep
    min_paired_chunks: int = 3
    scale: str = "linear"  # linear | log: the paired differences
    max_comparisons: int | None = None  # upper bound of m when candidates join over time
    max_chunks: int = 32
    confidence: float = 0.95
    margin: float = 0.05
    min_chunks: int = 8
    patience: int = 3
    control: str = "auto"  # auto | twoway | reference | entropy | none
    order: str = "staggered"  # staggered | shared: the chunk order of each candidate (chunk_order)
    population: str = "finite"  # finite (the sweep's max_chunks chunks) | infinite (the corpus)
    n_boot: int = 500  # percentiles/composite: stopping.py's bootstrap rule
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "target", TARGET_ALIASES.get(self.target, self.target))
        if self.target not in STATISTICS:
            raise UserError(f"racing target {self.target!r} is unknown; use one of {', '.join(STATISTICS)}")
        if not 0 < self.alpha < 1:
            raise UserError(f"racing alpha {self.alpha} must lie strictly between 0 and 1, e.g. 0.05")
        if self.family not in ("candidate", "sweep"):
            raise UserError(f"racing family {self.family!r} is unknown; use candidate or sweep")
        if self.min_paired_chunks < 2:
            raise UserError(f"min_paired_chunks {self.min_paired_chunks} must be at least 2")
        if self.scale not in ("linear", "log"):
            raise UserError(f"racing scale {self.scale!r} is unknown; use linear or log")
        if self.max_comparisons is not None and self.max_comparisons < 1:
            raise UserError(f"max_comparisons {self.max_comparisons} must be at least 1 (or null)")
        if self.max_chunks < max(self.min_paired_chunks, self.min_chunks):
            raise UserError(f"max_chunks {self.max_chunks} is below min_chunks/min_paired_chunks")
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence {self.confidence} must lie strictly between 0 and 1")
        if not self.margin > 0:
            raise UserError(f"margin {self.margin} must be > 0 (a relative half-width)")
        if self.min_chunks < 3:
            raise UserError(f"min_chunks {self.min_chunks} must be at least 3 (a regression needs 3 chunks)")
        if self.patience < 1:
            raise UserError(f"patience {self.patience} must be at least 1")
        if self.control not in CONTROLS:
            raise UserError(f"racing control {self.control!r} is unknown; use one of {', '.join(CONTROLS)}")
        if self.population not in ("finite", "infinite"):
            raise UserError(f"racing population {self.population!r} is unknown; use finite or infinite")
        if self.order not in ORDERS:
            raise UserError(f"racing chunk order {self.order!r} is unknown; use staggered or shared")
        if self.order == "staggered" and self.control in ("reference", "entropy"):
            raise UserError(f"control={self.control} needs every candidate on the same chunk order; "
                            f"set metrics.chunk_order=shared, or use control=auto (two-way with staggered)")

    @property
    def anchor(self) -> int:
        """Chunks every candidate evaluates first, in the same order (paired comparisons start there)."""
        return min(max(self.min_chunks, self.min_paired_chunks), self.max_chunks)

    @property
    def resolved_control(self) -> str:
        """auto: the two-way estimator with staggered orders; with shared orders, a reference
        ahead else the baseline's entropy (see :func:`choose_control`)."""
        if self.control == "auto" and self.order == "staggered":
            return "twoway"
        return self.control

    @property
    def looks(self) -> int:
        """How many distinct paired counts a pair can be tested at."""
        return self.max_chunks - self.min_paired_chunks + 1

    @property
    def population_size(self) -> int | None:
        return self.max_chunks if self.population == "finite" else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RacingConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class RaceEntry:
    """One candidate: its size (no larger is better) and per-chunk target values, chunk 0..k-1.

    chunks: per-token KLD arrays of the same chunks; only needed when the target is a
    percentile or the composite (their precision rule is stopping.py's bootstrap on tokens).
    """

    label: str
    size: float
    values: Sequence[float]
    chunks: Sequence | None = None
    chunk_ids: Sequence[int] | None = None  # the chunk of each value (None: chunks 0, 1, 2, ...)

    @property
    def n_chunks(self) -> int:
        return len(self.values)

    @property
    def ids(self) -> list[int]:
        return list(range(len(self.values))) if self.chunk_ids is None else [int(i) for i in self.chunk_ids]

    def cells(self) -> dict[int, float]:
        """{chunk: value}."""
        return dict(zip(self.ids, (float(v) for v in self.values)))

    def first(self, n: int) -> "RaceEntry":
        """The entry as it was after its first ``n`` chunks (in evaluation order)."""
        ids = None if self.chunk_ids is None else list(self.chunk_ids)[:n]
        chunks = None if self.chunks is None else list(self.chunks)[:n]
        return RaceEntry(self.label, self.size, list(self.values)[:n], chunks, ids)


def chunk_order(race_index: int, n_chunks: int, anchor: int) -> list[int]:
    """The order in which the ``race_index``-th candidate of a sweep evaluates chunks 0..n_chunks-1.

    Every candidate starts with the same ``anchor`` chunks (so every pair has paired chunks for
    the dominance test and the two-way fit is connected), then walks the remaining chunks
    cyclically from its own offset, ``race_index * 0.618... mod 1`` of the way round (offsets of
    any number of candidates spread evenly). Candidates that stop early therefore cover
    *different* chunks together, and the two-way estimator (``twoway_estimate``) learns every
    chunk's difficulty from whoever saw it: chunk coverage is paid once per sweep, not once per
    candidate. The order depends on the index only, never on values, and the chunk list itself
    is shuffled, so each candidate's chunks are still a random sample of the population.
    """
    anchor = max(0, min(anchor, n_chunks))
    rest = n_chunks - anchor
    if rest <= 0:
        return list(range(n_chunks))
    offset = int(((race_index * _GOLDEN) % 1.0) * rest)
    return list(range(anchor)) + [anchor + (offset + i) % rest for i in range(rest)]


def per_chunk_values(chunks: Sequence, target: str = "mean") -> list[float]:
    """The target statistic of each chunk on its own (the paired unit of racing)."""
    target = TARGET_ALIASES.get(target, target)
    return [statistic_of([a], target) for a in kld_arrays(chunks)]


# ---------------------------------------------------------------------------------------------
# Dominance


@dataclass
class PairTest:
    """Paired one-sided test of "``better`` has a lower target than ``worse``".

    estimate: mean per-chunk difference better - worse (log ratio with scale="log"); upper: its
    one-sided upper confidence bound at level 1 - alpha_look. Dominance: upper < 0.
    """

    better: str
    worse: str
    n_paired: int
    estimate: float
    upper: float
    alpha_look: float
    scale: str

    @property
    def significant(self) -> bool:
        return self.upper < 0

    def to_dict(self) -> dict:
        return asdict(self)


def paired_test(better: Sequence[float], worse: Sequence[float], alpha_look: float,
                scale: str = "linear") -> tuple[int, float, float]:
    """(n, mean difference, one-sided upper bound) of better - worse on their common chunks."""
    n = min(len(better), len(worse))
    b = np.asarray(better[:n], np.float64)
    w = np.asarray(worse[:n], np.float64)
    if scale == "log" and np.all(b > 0) and np.all(w > 0):
        d = np.log(b) - np.log(w)
    else:
        d = b - w
    if n < 2:
        return n, float(d.mean()) if n else math.nan, math.inf
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    return n, mean, mean + _t_upper(alpha_look, n - 1) * sd / math.sqrt(n)


def comparisons_for(candidates: Sequence[RaceEntry], label: str, cfg: RacingConfig) -> int:
    """m, the Bonferroni divisor for ``label``'s dominance tests (see the module docstring)."""
    if cfg.max_comparisons is not None:
        return cfg.max_comparisons
    if cfg.family == "sweep":
        m = sum(1 for a in candidates for b in candidates if a.label != b.label and b.size <= a.size)
    else:
        me = _entry(candidates, label)
        m = sum(1 for b in candidates if b.label != label and b.size <= me.size)
    return max(m, 1)


def find_dominator(candidates: Sequence[RaceEntry], label: str, cfg: RacingConfig) -> PairTest | None:
    """The strongest significant test that some no-larger candidate beats ``label``, or None.

    Pairs are compared on the chunks both have evaluated (whatever their orders); only pairs
    with at least ``min_paired_chunks`` common chunks are tested; the per-look alpha
    is ``alpha / (m * looks)`` (Bonferroni over comparisons and over looks).
    """
    me = _entry(candidates, label)
    alpha_look = cfg.alpha / (comparisons_for(candidates, label, cfg) * cfg.looks)
    best: PairTest | None = None
    mine = me.cells()
    for other in candidates:
        if other.label == label or other.size > me.size:
            continue
        theirs = other.cells()
        common = [j for j in mine if j in theirs]
        if len(common) < cfg.min_paired_chunks:
            continue
        n, est, upper = paired_test([theirs[j] for j in common], [mine[j] for j in common], alpha_look, cfg.scale)
        test = PairTest(other.label, label, n, est, upper, alpha_look, cfg.scale)
        if test.significant and (best is None or _relative(test) < _relative(best)):
            best = test
    return best


def _relative(test: PairTest) -> float:
    return test.upper / abs(test.estimate) if test.estimate else test.upper


# ---------------------------------------------------------------------------------------------
# Regression estimator


@dataclass
class AdjustedMean:
    """A mean over chunks, regression-adjusted on a control when there is one, with its interval."""

    estimate: float
    se: float
    lo: float
    hi: float
    df: int
    n_chunks: int
    plain: float  # the unadjusted mean of the chunks seen
    control: str | None = None
    n_control: int = 0
    slope: float = math.nan
    confidence: float = 0.95

    @property
    def rel_half_width(self) -> float:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or not self.estimate:
            return math.inf
        return 0.5 * (self.hi - self.lo) / abs(self.estimate)

    def to_dict(self) -> dict:
        return {**asdict(self), "rel_half_width": self.rel_half_width}


def regression_estimate(y: Sequence[float], x: Sequence[float] | None = None, confidence: float = 0.95,
                        population: int | None = None, control: str | None = None) -> AdjustedMean:
    """Regression estimator of the mean of ``y`` with control ``x`` (formula: module docstring).

    y: values on chunks 0..n-1; x: the control on chunks 0..n_R-1 with n_R >= n (x[:n] pairs
    with y). population: N for the finite-population mean over chunks 0..N-1, None for the
    corpus mean. Without a usable control (none, n_R == n, or x constant over S) this is the
    plain mean with its t interval.
    """
    yv = np.asarray(y, np.float64)
    n = yv.size
    inv_n_pop = 0.0 if population is None else 1.0 / population
    if population is not None and n > population:
        raise ValueError(f"{n} chunks exceed the population of {population}")
    plain = float(yv.mean()) if n else math.nan
    xv = None if x is None else np.asarray(x, np.float64)
    if xv is not None and population is not None:
        xv = xv[:population]
    use_control = xv is not None and xv.size > n >= 3
    if use_control:
        xs = xv[:n]
        sxx = float(((xs - xs.mean()) ** 2).sum())
        use_control = sxx > 0
    if not use_control:
        if n < 2:
            return AdjustedMean(plain, math.nan, math.nan, math.nan, max(n - 1, 0), n, plain, confidence=confidence)
        se = math.sqrt(max(float(yv.var(ddof=1)) * (1.0 / n - inv_n_pop), 0.0))
        return _with_interval(plain, se, n - 1, n, plain, None, 0, math.nan, confidence)
    n_r = xv.size
    xbar_s = float(xs.mean())
    xbar_r = float(xv.mean())
    b = float(((xs - xbar_s) * (yv - plain)).sum()) / sxx
    est = plain + b * (xbar_r - xbar_s)
    resid = yv - plain - b * (xs - xbar_s)
    s2e = float((resid ** 2).sum()) / (n - 2)
    s2x_r = float(xv.var(ddof=1))
    v_fit = s2e * ((1.0 / n - inv_n_pop) + (xbar_r - xbar_s) ** 2 / sxx)
    v_ctl = b * b * s2x_r * (1.0 / n_r - inv_n_pop)
    var = v_fit + v_ctl
    # Satterthwaite: the control's term is estimated from n_R chunks, the fit's from n - 2 df.
    df = n - 2 if v_ctl <= 0 else int(var ** 2 / (v_fit ** 2 / (n - 2) + v_ctl ** 2 / (n_r - 1)))
    return _with_interval(est, math.sqrt(max(var, 0.0)), max(df, n - 2), n, plain, control, n_r, b, confidence)


def _with_interval(est, se, df, n, plain, control, n_control, slope, confidence) -> AdjustedMean:
    if se == 0:
        lo = hi = est
    else:
        tq = _t_upper((1 - confidence) / 2, df)
        if est > 0:
            h = tq * se / est
            lo, hi = est * math.exp(-h), est * math.exp(h)
        else:
            lo, hi = est - tq * se, est + tq * se
    return AdjustedMean(est, se, lo, hi, df, n, plain, control, n_control, slope, confidence)


def choose_control(candidates: Sequence[RaceEntry], label: str, cfg: RacingConfig,
                   entropy: Sequence[float] | None = None) -> tuple[str | None, Sequence[float] | None]:
    """The control for ``label``'s regression estimator: (name, values) or (None, None).

    "reference": the other candidate with the most chunks beyond ``label``'s (ties: nearest
    in size, then label); "entropy": the baseline's per-chunk values (named "entropy");
    "auto": a reference when one is ahead, else the entropy when given. The choice uses only
    chunk counts and sizes, not the data, so it does not bias the interval.
    """
    me = _entry(candidates, label)
    if cfg.control in ("auto", "reference"):
        ahead = [c for c in candidates if c.label != label and c.n_chunks > me.n_chunks]
        if ahead:
            ref = min(ahead, key=lambda c: (-min(c.n_chunks, cfg.max_chunks), abs(c.size - me.size), c.label))
            return ref.label, ref.values
    if cfg.control in ("auto", "entropy") and entropy is not None and len(entropy) > me.n_chunks:
        return "entropy", entropy
    return None, None


def twoway_estimate(candidates: Sequence[RaceEntry], label: str, confidence: float = 0.95,
                    population: int | None = None) -> AdjustedMean:
    """``label``'s mean over the population of chunks, borrowing every chunk's difficulty from
    whichever candidates evaluated it (the estimator of staggered chunk orders, ``chunk_order``).

    Model: ``log y_cj = alpha_c + gamma_j + e_cj``, e iid with variance s^2 (chunk difficulty
    multiplies every candidate's KLD: log per-chunk means correlate 0.77-0.92 between quant
    types), fitted by least squares on every observed cell (chunks < ``population``; the
    anchor chunks every candidate shares connect the design). The finite-population mean
    ``(1/N) sum_j y_cj`` is estimated by the observed cells of ``label`` plus predictions
    ``exp(alpha_c + gamma_j + s^2/2)`` of its unobserved cells: chunks seen by someone else use
    that chunk's fitted difficulty; chunks nobody saw use the mean difficulty of the seen ones.
    Variance (delta method): the fitted parameters' part ``s^2 g' (X'X)^+ g`` (g the gradient of
    the predicted total), the unobserved cells' own noise ``s^2 sum yhat^2``, and for chunks
    nobody saw the sampling variance of the seen chunks' mean difficulty,
    ``S_D^2 (1/n_seen - 1/N)``. Degrees of freedom: residual df of the fit, combined with
    ``n_seen - 1`` by Satterthwaite while some chunks are unseen. ``population=None`` targets
    the corpus mean (every chunk unseen). Interval on the log scale, as elsewhere. Simulated
    coverage at 95% (tests/test_racing.py): see the test's printout. Falls back to the plain
    mean when the fit has under 2 residual degrees of freedom (nobody shares enough chunks
    yet) or a value of ``label`` is not positive, and is the plain mean (no control) when
    ``label`` measured every chunk of a finite population.
    """
    me = _entry(candidates, label)
    limit = math.inf if population is None else population
    mine = {j: v for j, v in me.cells().items() if j < limit}
    plain_y = list(mine.values())
    if len(mine) < 2 or min(plain_y) <= 0:
        return regression_estimate(plain_y, None, confidence, population)
    if population is not None and len(mine) >= population:
        # Every chunk measured: the mean is the candidate's own, nothing is borrowed (no control,
        # so tables show its own mean and standard error rather than this estimator's zero).
        return regression_estimate(plain_y, None, confidence, population)
    table = {label: mine}
    for c in candidates:
        if c.label != label:
            cells = {j: v for j, v in c.cells().items() if j < limit and v > 0}
            if cells:
                table[c.label] = cells
    cands = list(table)
    chunks = sorted({j for cells in table.values() for j in cells})
    col = {j: len(cands) + k for k, j in enumerate(chunks)}
    n_par = len(cands) + len(chunks)
    obs = [(ci, col[j], math.log(v)) for ci, c in enumerate(cands) for j, v in table[c].items()]
    x = np.zeros((len(obs), n_par))
    rows = np.arange(len(obs))
    x[rows, [o[0] for o in obs]] = 1.0
    x[rows, [o[1] for o in obs]] = 1.0
    z = np.array([o[2] for o in obs])
    u, sv, vt = np.linalg.svd(x, full_matrices=False)
    keep = sv > sv[0] * 1e-10
    rank = int(keep.sum())
    dof = len(obs) - rank
    if dof < 2:
        return regression_estimate(plain_y, None, confidence, population)
    inv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
    theta = vt.T @ (inv * (u.T @ z))
    resid = z - x @ theta
    s2 = float(resid @ resid) / dof
    smear = math.exp(s2 / 2)
    alpha = float(theta[0])  # label is cands[0]
    difficulty = np.exp(theta[len(cands):])
    grad = np.zeros(n_par)
    unseen = [j for j in chunks if j not in mine]
    y_unseen = np.array([math.exp(alpha) * difficulty[col[j] - len(cands)] * smear for j in unseen])
    for j, yh in zip(unseen, y_unseen):
        grad[0] += yh
        grad[col[j]] += yh
    n_seen = len(chunks)
    y_new = math.exp(alpha) * float(difficulty.mean()) * smear  # a chunk nobody saw
    s2_new = float(np.var(difficulty, ddof=1)) * (math.exp(alpha) * smear) ** 2 if n_seen > 1 else math.inf
    if population is None:  # the corpus mean: every chunk is one nobody saw
        est = y_new
        g_new = np.zeros(n_par)
        g_new[0] = y_new
        g_new[len(cands):] = y_new * difficulty / difficulty.sum()
        v_fit = s2 * float(g_new @ _cov_unit(vt, inv) @ g_new)
        v_new = s2_new / n_seen
    else:
        n_new = population - n_seen
        total = sum(plain_y) + float(y_unseen.sum()) + n_new * y_new
        if n_new:
            grad[0] += n_new * y_new
            grad[len(cands):] += n_new * y_new * difficulty / difficulty.sum()
        own = s2 * (float((y_unseen ** 2).sum()) + n_new * y_new ** 2)
        v_fit = (s2 * float(grad @ _cov_unit(vt, inv) @ grad) + own) / population ** 2
        v_new = s2_new * (1.0 / n_seen - 1.0 / population) if n_new else 0.0
        est = total / population
    var = v_fit + v_new
    if v_new > 0 and math.isfinite(v_new):
        df = int(var ** 2 / (v_fit ** 2 / dof + v_new ** 2 / max(n_seen - 1, 1)))
    else:
        df = dof
    return _with_interval(est, math.sqrt(var) if math.isfinite(var) else math.inf, max(df, 1), len(mine),
                          float(np.mean(plain_y)), "twoway", n_seen, math.nan, confidence)


def _cov_unit(vt: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """(X'X)^+ from the SVD of X (the parameters' covariance per unit residual variance)."""
    return (vt.T * inv ** 2) @ vt


def adjusted_mean(candidates: Sequence[RaceEntry], label: str, cfg: RacingConfig,
                  entropy: Sequence[float] | None = None, n_chunks: int | None = None) -> AdjustedMean:
    """``label``'s borrowed-strength mean (on its first ``n_chunks`` chunks, default all):
    the two-way estimator with staggered orders, else the regression estimator."""
    me = _entry(candidates, label)
    if cfg.resolved_control == "twoway":
        cut = me.first(min(me.n_chunks, n_chunks if n_chunks is not None else me.n_chunks))
        others = [c for c in candidates if c.label != label]
        return twoway_estimate([cut, *others], label, cfg.confidence, cfg.population_size)
    name, x = choose_control(candidates, label, cfg, entropy)
    y = list(me.values)[: cfg.max_chunks]
    if n_chunks is not None:
        y = y[:n_chunks]
    return regression_estimate(y, x, cfg.confidence, cfg.population_size, name)


# ---------------------------------------------------------------------------------------------
# Decision


@dataclass
class RaceDecision:
    stop: bool
    reason: str  # "dominated_by=<label>" | "precision_reached" | "max_chunks" | "running"
    dominated_by: str | None = None
    adjusted: dict | None = None  # AdjustedMean.to_dict() (mean), or stopping.py's interval
    test: dict | None = None  # the dominance PairTest, when dominated


def race_decision(candidates: Sequence[RaceEntry], label: str, cfg: RacingConfig,
                  entropy: Sequence[float] | None = None) -> RaceDecision:
    """Whether ``label`` stops now, given every candidate's per-chunk values so far. Pure.

    entropy: the baseline's per-chunk values for every chunk (a control known before any
    trial), optional. Order: dominated (stops at once), then precision, then the cap.
    """
    me = _entry(candidates, label)
    k = min(me.n_chunks, cfg.max_chunks)
    adjusted, precise = _precision(candidates, label, cfg, entropy)
    test = find_dominator(candidates, label, cfg)
    if test is not None:
        return RaceDecision(True, f"dominated_by={test.better}", test.better, adjusted, test.to_dict())
    if precise:
        return RaceDecision(True, "precision_reached", None, adjusted)
    if k >= cfg.max_chunks:
        return RaceDecision(True, "max_chunks", None, adjusted)
    return RaceDecision(False, "running", None, adjusted)


def _precision(candidates, label, cfg: RacingConfig, entropy) -> tuple[dict | None, bool]:
    me = _entry(candidates, label)
    k = min(me.n_chunks, cfg.max_chunks)
    if cfg.target != "mean":
        if me.chunks is None:
            raise UserError(f"racing target {cfg.target!r} needs the per-token KLD arrays of "
                            f"{label!r} (RaceEntry.chunks) for its precision rule")
        rule = StoppingRule(target=cfg.target, confidence=cfg.confidence, margin=cfg.margin,
                            min_chunks=cfg.min_chunks, max_chunks=cfg.max_chunks,
                            patience=cfg.patience, n_boot=cfg.n_boot, seed=cfg.seed)
        d = decide(list(me.chunks)[:k], rule)
        return (d.interval.to_dict() if d.interval else None), d.reason == "precision_reached"
    if k == 0:
        return None, False
    adj = adjusted_mean(candidates, label, cfg, entropy, k)
    precise = k >= cfg.min_chunks and adj.rel_half_width <= cfg.margin
    for back in range(1, cfg.patience):
        if not precise:
            break
        precise = (k - back >= cfg.min_chunks
                   and adjusted_mean(candidates, label, cfg, entropy, k - back).rel_half_width <= cfg.margin)
    return adj.to_dict(), precise


def _entry(candidates: Sequence[RaceEntry], label: str) -> RaceEntry:
    for c in candidates:
        if c.label == label:
            return c
    raise KeyError(f"no candidate labelled {label!r}")
