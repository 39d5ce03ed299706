"""Predicted KLD and exact size of any mix, from one measurement per (group, type), and the
correction that measured mixes teach it.

**Additive model.** A mix assigns one type to every group. Its reference is one such mix (e.g.
every group at Q8_0, or at a middle type to measure down as well as up) with measured mean KLD
``K_ref``. For every (group g, type t) the sensitivity search measures the reference with only g
changed to t; ``Δ[g, t] = KLD(ref with g -> t) - K_ref`` (zero at the reference's own type). The
prediction of a mix m is ``K_ref + Σ_g Δ[g, m_g]``. Why additive: each group's quantization adds a
small, nearly independent perturbation to the logits, and KLD is to first order a quadratic form in
the logit perturbation, so the variances, hence the KLDs, add. Sizes are exactly additive: a mix in
which every group is named gives each tensor that group's type, so its bytes are
``fixed_bytes + Σ_g nbytes[g, m_g]`` (``fixed_bytes``: norms and other tensors no group owns).

**The scale on which changes add.** Summed as KLDs, single-group changes can overshoot: the
improvements of many groups, each measured with all the others still degraded, sum to more
than the total. On tinycode-a (vocabulary 8,192, Q4_K_M base with an importance matrix, every
single measured on all 16 chunks) the plain sums predicted 16 measured mixes of 30 groups 35%
too low on average (the 30 groups' best single improvements summed to 1.1x the reference's
whole KLD); summed as log KLDs they were 8% low. With 16 coarser groups the plain sums were 8%
low, square roots of KLDs 1% low, logs 4% high. Physically: KLD is a quadratic form in the logit
perturbation, so independent perturbations add as KLDs, and perfectly aligned ones as square
roots of KLDs. So the table is read on a Box-Cox scale ``φ(K) = (K^λ - 1)/λ`` (``λ = 0``:
``log K``; ``λ = 1``: the plain KLD): ``φ(K(m)) = φ(K_ref) + Σ_g [φ(K_ref + Δ[g, m_g]) -
φ(K_ref)]``. Any λ keeps the sum additive over groups, so the knapsack stays exact;
:func:`fit_correction` picks λ from ``link_powers`` by how well each fits the measured mixes.

**Interactions, and how they are modelled.** Real mixes deviate from additivity in two ways:
errors compound through the layers, so many degraded groups together cost more than the sum of
their separate costs (a super-additive bend that grows with the total), and some groups matter more
in company than alone (a group's damage is amplified or masked by what the others do). The
correction models the first with a global power law and the second with one multiplicative scale
per group::

    KLD(m) ≈ exp(a) · P(m)^b,   φ(P(m)) = φ(K_ref) + Σ_g s_g · Δφ[g, m_g],   s_g = exp(u_g)

with ``Δφ[g, t] = φ(K_ref + Δ[g, t]) - φ(K_ref)`` (with λ = 1 simply ``P(m) = K_ref + Σ_g s_g Δ[g, m_g]``),
fitted in log space (relative errors, since KLDs span decades) to the measured mixes, with ridge
penalties that pull ``u_g`` to 0 and ``b`` to 1: with no measured mix it is the additive model (on scale λ),
with one or two it only rescales (``a``), from three on it bends (``b``), and from
``min_points_for_groups`` on it moves the group scales, each only as far as the measurements
that involve that group support. The per-group part keeps the objective additive (``s_g·Δφ`` is a
new table), so the knapsack still solves it exactly; the power law is monotone (``b > 0``) and so
never changes which mix is best at a given size -- it makes the reported numbers right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ggufopt_ray.errors import UserError

_FLOOR = 1e-6  # relative floor on P(m): a corrected sum must stay positive for the power law


@dataclass
class MixTable:
    """Everything the allocator knows per (group, type): exact bytes and measured ΔKLD.

    ``delta_kld[g, t]`` is NaN where the type is not a candidate for that group (not measured, or
    not allowed, e.g. an IQ type without an importance matrix); such cells are never chosen.
    """

    groups: list[str]
    types: list[str]
    nbytes: np.ndarray  # int64 [G, T]
    delta_kld: np.ndarray  # float64 [G, T]; 0 at the reference's type
    reference: dict[str, str]  # group -> its type in the reference mix
    reference_kld: float  # measured mean KLD of the reference mix
    fixed_bytes: int = 0  # bytes of tensors outside every group

    def __post_init__(self):
        self.nbytes = np.asarray(self.nbytes, dtype=np.int64)
        self.delta_kld = np.asarray(self.delta_kld, dtype=np.float64)
        G, T = len(self.groups), len(self.types)
        if self.nbytes.shape != (G, T) or self.delta_kld.shape != (G, T):
            raise UserError(f"nbytes {self.nbytes.shape} and delta_kld {self.delta_kld.shape} must both be "
                            f"[groups={G}, types={T}]")
        missing = [g for g in self.groups if g not in self.reference]
        if missing:
            raise UserError(f"the reference mix names no type for group(s) {missing}")
        for g, name in enumerate(self.groups):
            t = self.type_index(self.reference[name])
            if not self.delta_kld[g, t] == 0.0:  # NaN fails too
                raise UserError(f"ΔKLD of {name} at its reference type {self.types[t]} must be 0, "
                                f"not {self.delta_kld[g, t]}")

    @classmethod
    def from_measurements(cls, groups: Sequence[str], types: Sequence[str], nbytes, reference: Mapping[str, str],
                          reference_kld: float, single_kld: Mapping[tuple[str, str], float],
                          fixed_bytes: int = 0) -> "MixTable":
        """From measured mean KLDs of "the reference with only group g at type t" (keys (g, t)).

        Cells not in ``single_kld`` (other than the reference's own types) are not candidates.
        """
        groups, types = list(groups), list(types)
        delta = np.full((len(groups), len(types)), np.nan)
        for (g, t), kld in single_kld.items():
            delta[groups.index(g), types.index(t)] = float(kld) - float(reference_kld)
        for g, name in enumerate(groups):
            delta[g, types.index(reference[name])] = 0.0
        return cls(groups=groups, types=types, nbytes=nbytes, delta_kld=delta, reference=dict(reference),
                   reference_kld=float(reference_kld), fixed_bytes=int(fixed_bytes))

    # -- mixes as index vectors ------------------------------------------------------------------
    def index(self, mix: Mapping[str, str]) -> np.ndarray:
        """``{group: type}`` naming every group -> type indices [G]."""
        missing = [g for g in self.groups if g not in mix]
        if missing:
            raise UserError(f"mix names no type for group(s) {missing}")
        return np.array([self.type_index(mix[g]) for g in self.groups], dtype=np.int64)

    def type_index(self, qtype: str) -> int:
        for t in (qtype, str(qtype).upper()):
            if t in self.types:
                return self.types.index(t)
        raise UserError(f"type {qtype!r} is not one of the table's types {self.types}")

    def mix(self, idx) -> dict[str, str]:
        return {g: self.types[int(t)] for g, t in zip(self.groups, idx)}

    def size(self, idx) -> int:
        """Exact bytes of the mix (type indices [G], or [N, G] for many)."""
        idx = np.asarray(idx)
        return self.fixed_bytes + self.nbytes[np.arange(len(self.groups)), idx].sum(axis=-1)

    def additive(self, idx, delta: np.ndarray | None = None) -> np.ndarray | float:
        """``K_ref + Σ_g delta[g, idx_g]`` (the uncorrected prediction with the default table)."""
        d = self.delta_kld if delta is None else delta
        idx = np.asarray(idx)
        return self.reference_kld + d[np.arange(len(self.groups)), idx].sum(axis=-1)

    def reference_index(self) -> np.ndarray:
        return self.index(self.reference)


def to_link(k, power: float, floor: float):
    """Box-Cox ``φ(K) = (K^λ - 1)/λ`` (``log K`` at λ = 0) of KLDs clamped at ``floor`` > 0."""
    k = np.maximum(np.asarray(k, dtype=np.float64), floor)
    return np.log(k) if power == 0 else (k ** power - 1.0) / power


def from_link(p, power: float, floor: float):
    """The inverse of :func:`to_link`, never below ``floor``."""
    p = np.asarray(p, dtype=np.float64)
    if power == 0:
        return np.maximum(np.exp(p), floor)
    return np.maximum(np.maximum(1.0 + power * p, 0.0) ** (1.0 / power), floor)


def unlinked_sum(delta_sum, reference_kld: float, power: float):
    """``φ⁻¹(φ(K_ref) + delta_sum)``: a sum of Δφ back to a KLD, never below the floor (at λ = 1
    the plain ``K_ref + delta_sum``, without the round trip's rounding)."""
    floor = _FLOOR * reference_kld
    total = np.asarray(delta_sum, dtype=np.float64)
    if power == 1:
        return np.maximum(reference_kld + total, floor)
    return from_link(to_link(reference_kld, power, floor) + total, power, floor)


def linked_delta(table: MixTable, power: float) -> np.ndarray:
    """``Δφ[g, t] = φ(K_ref + Δ[g, t]) - φ(K_ref)`` (NaN stays NaN; exactly Δ at λ = 1)."""
    if power == 1:
        return table.delta_kld
    floor = _FLOOR * table.reference_kld
    return to_link(table.reference_kld + table.delta_kld, power, floor) - to_link(table.reference_kld, power, floor)


@dataclass(frozen=True, eq=False)  # eq=False: an ndarray field has no truth value
class Correction:
    """``KLD ≈ exp(a) · P^b`` with ``φ(P) = φ(K_ref) + Σ_g exp(u_g)·Δφ[g, m_g]`` -- see the module
    docstring (λ = ``link_power``; λ = 1: ``P = K_ref + Σ_g exp(u_g)·Δ[g, m_g]``)."""

    log_scale: float = 0.0  # a
    exponent: float = 1.0  # b
    group_log_scale: np.ndarray | None = None  # u [G]; None = all zero
    n_points: int = 0  # measured mixes it was fitted to
    link_power: float = 1.0  # λ: the Box-Cox scale on which single-group changes add

    def scales(self, n_groups: int) -> np.ndarray:
        return np.ones(n_groups) if self.group_log_scale is None else np.exp(self.group_log_scale)

    def delta_table(self, table: MixTable) -> np.ndarray:
        """The additive table the knapsack should minimise: ``s_g · Δφ[g, t]``."""
        return linked_delta(table, self.link_power) * self.scales(len(table.groups))[:, None]

    def transform(self, delta_sum, reference_kld: float):
        """A mix's sum over ``delta_table`` -> predicted KLD (monotone increasing in the sum)."""
        return np.exp(self.log_scale) * unlinked_sum(delta_sum, reference_kld, self.link_power) ** self.exponent

    def predict(self, table: MixTable, idx):
        idx = np.asarray(idx)
        total = self.delta_table(table)[np.arange(len(table.groups)), idx].sum(axis=-1)
        return self.transform(total, table.reference_kld)


IDENTITY = Correction()


def fit_correction(table: MixTable, mixes, measured, *, weights=None, ridge_groups: float = 0.1,
                   ridge_exponent: float = 0.1, min_points_for_exponent: int = 3, min_points_for_groups: int = 5,
                   exponent_bounds: tuple[float, float] = (0.25, 4.0),
                   max_abs_group_log_scale: float = math.log(10.0), link_powers: Sequence[float] = (1.0,),
                   min_points_for_link: int = 4) -> Correction:
    """Fit :class:`Correction` to measured mixes (type-index rows [N, G], or ``{group: type}`` dicts).

    Least squares on ``log(measured) - log(predicted)``, plus ridge residuals
    ``sqrt(ridge_groups)·u_g`` and ``sqrt(ridge_exponent)·(b - 1)``. The ridge keeps the fit
    stable with few points: a group scale moves only as far as the measured mixes that changed
    that group pay for; groups no measured mix changed keep ``s_g = 1`` exactly. ``weights`` (one
    per mix) make a local fit: :mod:`.loop` weights the mixes near each budget.

    ``link_powers``: the candidate scales λ, the first the default; from ``min_points_for_link``
    measured mixes on, each is fitted and the one with the lowest cost kept (the same number of
    parameters each, so the costs compare).
    """
    powers = [float(x) for x in link_powers] or [1.0]
    if any(not 0.0 <= x <= 1.0 for x in powers):
        raise UserError(f"link powers must be in [0, 1], not {powers}")
    idx = np.array([table.index(m) if isinstance(m, Mapping) else np.asarray(m) for m in mixes], dtype=np.int64)
    y = np.asarray(measured, dtype=np.float64)
    n = len(y)
    if n == 0:
        return Correction(link_power=powers[0])
    if idx.shape != (n, len(table.groups)):
        raise UserError(f"mixes must be [N={n}, G={len(table.groups)}] type indices, got {idx.shape}")
    if not np.all(y > 0):
        raise UserError("measured KLDs must be positive to fit a correction in log space")
    if not np.all(np.isfinite(table.delta_kld[np.arange(len(table.groups)), idx])):
        raise UserError("a measured mix uses a (group, type) cell with no measured ΔKLD")
    sw = np.ones(n) if weights is None else np.sqrt(np.asarray(weights, dtype=np.float64))
    if sw.shape != (n,) or not np.all(np.isfinite(sw)) or np.any(sw < 0):
        raise UserError(f"weights must be {n} non-negative numbers")
    if n < min_points_for_link:
        powers = powers[:1]
    fits = [_fit_one(table, idx, np.log(y), sw, power, ridge_groups, ridge_exponent, min_points_for_exponent,
                     min_points_for_groups, exponent_bounds, max_abs_group_log_scale) for power in powers]
    return min(fits, key=lambda f: f[1])[0]


def _fit_one(table, idx, log_y, sw, power, ridge_groups, ridge_exponent, min_points_for_exponent,
             min_points_for_groups, exponent_bounds, max_abs_group_log_scale) -> tuple[Correction, float]:
    """:func:`fit_correction` at one link power, on checked inputs: (the correction, its cost)."""
    n, G = idx.shape
    x = linked_delta(table, power)[np.arange(G), idx]  # [N, G] per-group Δφ of each measured mix
    free_b = n >= min_points_for_exponent
    # Only groups that some measured mix changed can be informed by the data.
    active = np.flatnonzero(np.any(x != 0.0, axis=0)) if n >= min_points_for_groups else np.array([], dtype=np.int64)

    def unpack(theta):
        a = theta[0]
        b = theta[1] if free_b else 1.0
        u = np.zeros(G)
        u[active] = theta[2 if free_b else 1:]
        return a, b, u

    def residuals(theta):
        a, b, u = unpack(theta)
        p = unlinked_sum(x @ np.exp(u), table.reference_kld, power)
        r = sw * (a + b * np.log(p) - log_y)
        extra = [math.sqrt(ridge_groups) * u[active]]
        if free_b:
            extra.append(np.array([math.sqrt(ridge_exponent) * (b - 1.0)]))
        return np.concatenate([r, *extra])

    theta0 = np.zeros(1 + (1 if free_b else 0) + len(active))
    lo = np.full_like(theta0, -np.inf)
    hi = np.full_like(theta0, np.inf)
    if free_b:
        theta0[1] = 1.0
        lo[1], hi[1] = exponent_bounds
    lo[len(theta0) - len(active):] = -max_abs_group_log_scale
    hi[len(theta0) - len(active):] = max_abs_group_log_scale
    from scipy import optimize  # deferred: scipy.optimize costs every Ray worker ~1 s to import

    sol = optimize.least_squares(residuals, theta0, bounds=(lo, hi), method="trf", x_scale=1.0)
    a, b, u = unpack(sol.x)
    return Correction(log_scale=float(a), exponent=float(b), group_log_scale=u, n_points=n,
                      link_power=power), float(sol.cost)


@dataclass(frozen=True)
class PredictionReport:
    """How well predictions matched measurements: rank agreement and relative error."""

    n: int
    spearman: float  # NaN with fewer than 3 points or constant inputs
    median_abs_rel_error: float
    max_abs_rel_error: float
    mean_rel_error: float  # signed: > 0 means the predictor overestimates

    def to_dict(self) -> dict:
        return {"n": self.n, "spearman": self.spearman, "median_abs_rel_error": self.median_abs_rel_error,
                "max_abs_rel_error": self.max_abs_rel_error, "mean_rel_error": self.mean_rel_error}


def compare(predicted, measured) -> PredictionReport:
    """Predicted vs measured KLD of the same mixes (relative error = (predicted - measured)/measured)."""
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape:
        raise UserError(f"predicted {p.shape} and measured {m.shape} must have the same shape")
    n = int(p.size)
    if n == 0:
        return PredictionReport(0, math.nan, math.nan, math.nan, math.nan)
    rel = (p - m) / m
    rho = math.nan
    if n >= 3 and np.ptp(p) > 0 and np.ptp(m) > 0:
        from scipy import stats  # deferred, as scipy.optimize above

        rho = float(stats.spearmanr(p, m).statistic)
    return PredictionReport(n=n, spearman=rho, median_abs_rel_error=float(np.median(np.abs(rel))),
                            max_abs_rel_error=float(np.max(np.abs(rel))), mean_rel_error=float(np.mean(rel)))
