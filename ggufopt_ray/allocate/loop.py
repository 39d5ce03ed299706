"""Predict, measure, correct, repeat: the allocator's loop, as a pure function of a ``measure`` callback.

Each round:

1. solve the exact frontier of the current (corrected) additive table;
2. pick the points worth a real evaluation: the predicted best mix under each requested budget,
   else its nearest unmeasured neighbour below it on the frontier, then a few points spread over
   the size range of the budgets (they teach the correction what the budget points alone cannot:
   how the error bends with total degradation);
3. measure them (``measure(mix)`` or one ``measure_batch(mixes)`` call per round, for parallel
   evaluation), recording the prediction made *before* measuring, so the reported predicted-vs-
   measured agreement is out of sample;
4. refit the correction (:func:`~.predictor.fit_correction`) on every mix measured so far.

**Local corrections.** Interactions grow with the total damage, so one set of group scales cannot
be right at Q3- and at Q5-sized budgets at once. Each budget's pick therefore comes from a
correction fitted with weights ``max(exp(-½ (log(bytes/budget)/local_bandwidth)²), local_floor)``:
the mixes measured near that budget dominate, the rest keep it stable (``local_bandwidth=None``:
one global fit). Spread points and the final ``frontier`` use the global fit.

**When the measured frontier stops improving.** The measured frontier is the Pareto set of
measured (bytes, KLD). A round improves it if, at some requested budget, the best measured KLD
that fits drops by more than ``min_rel_improvement`` (or the first mix fitting that budget gets
measured). The loop stops after ``patience`` rounds without improvement, when a round finds
nothing new to measure (every point it would pick is measured already), or when
``max_measurements`` evaluations are spent.

The answer at a budget is the best *measured* mix that fits, never the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ggufopt_ray.allocate.knapsack import Frontier, pareto_frontier, spread
from ggufopt_ray.allocate.predictor import (IDENTITY, Correction, MixTable, PredictionReport, compare,
                                            fit_correction)
from ggufopt_ray.errors import UserError


@dataclass(frozen=True)
class Measurement:
    """One evaluated mix: its size, what was predicted before measuring it, and what was measured."""

    choice: tuple[int, ...]  # type index per group
    mix: dict  # {group: type}
    nbytes: int
    predicted: float  # with the correction of the round it was picked in
    predicted_additive: float  # the uncorrected additive model
    measured: float
    round: int
    reason: str  # "budget", "neighbour", "spread" or "given"


@dataclass(frozen=True)
class RoundReport:
    round: int
    n_new: int
    correction: Correction  # the one its predictions were made with
    vs_measured: PredictionReport  # this round's predictions vs measurements (out of sample)
    additive_vs_measured: PredictionReport  # the uncorrected model on the same mixes
    best_under_budget: dict  # budget -> best measured KLD that fits so far (None: nothing fits)
    improved: bool


@dataclass
class LoopResult:
    table: MixTable
    measurements: list[Measurement]
    rounds: list[RoundReport]
    correction: Correction  # fitted to every measurement
    frontier: Frontier  # the final predicted frontier (of the corrected additive table)
    stop_reason: str
    overall: PredictionReport = field(default=None)  # all loop predictions vs measurements
    overall_additive: PredictionReport = field(default=None)

    def measured_frontier(self) -> list[Measurement]:
        """Measured mixes no other measured mix beats on both bytes and KLD, by increasing bytes."""
        out, best = [], np.inf
        for m in sorted(self.measurements, key=lambda m: (m.nbytes, m.measured)):
            if m.measured < best:
                out.append(m)
                best = m.measured
        return out

    def best_measured_under(self, budget: int) -> Measurement | None:
        fits = [m for m in self.measurements if m.nbytes <= budget]
        return min(fits, key=lambda m: (m.measured, m.nbytes)) if fits else None


def _best_per_budget(measurements: Sequence[Measurement], budgets: Sequence[int]) -> dict:
    out = {}
    for b in budgets:
        fits = [m.measured for m in measurements if m.nbytes <= b]
        out[b] = min(fits) if fits else None
    return out


def _improved(before: dict, after: dict, min_rel: float) -> bool:
    for b, new in after.items():
        old = before.get(b)
        if new is not None and (old is None or new < old * (1.0 - min_rel)):
            return True
    return False


def _local_weights(sizes, budget: int, bandwidth: float | None, floor: float) -> np.ndarray | None:
    """Gaussian kernel in log(bytes / budget): the mixes near a budget dominate its correction."""
    if bandwidth is None:
        return None
    z = np.log(np.asarray(sizes, dtype=np.float64) / float(budget)) / bandwidth
    return np.maximum(np.exp(-0.5 * z * z), floor)


def _first_unmeasured(frontier: Frontier, budget: int, measured: set) -> tuple[int, str] | None:
    """The predicted best mix under ``budget``, else the nearest unmeasured one below it."""
    top = int(np.searchsorted(frontier.nbytes, budget, side="right")) - 1
    for i in range(top, -1, -1):
        if tuple(int(x) for x in frontier.choices[i]) not in measured:
            return i, "budget" if i == top else "neighbour"
    return None


def allocate_loop(table: MixTable, budgets: Sequence[int], measure: Callable[[Mapping[str, str]], float] | None = None,
                  *, measure_batch: Callable[[list], list] | None = None, max_measurements: int = 24,
                  per_round: int | None = None, n_spread: int = 2, min_rel_improvement: float = 0.01,
                  patience: int = 2, max_rounds: int = 20, include_reference: bool = True,
                  given: Sequence[tuple[Mapping[str, str], float]] = (), max_points: int | None = None,
                  spread_margin: float = 0.15, local_bandwidth: float | None = 0.1, local_floor: float = 0.1,
                  fit_options: Mapping | None = None) -> LoopResult:
    """Run the loop on ``table`` for the byte ``budgets``; see the module docstring.

    ``measure(mix) -> mean KLD`` (or ``measure_batch([mix, ...]) -> [KLD, ...]``) evaluates a
    ``{group: type}`` mix for real. ``given`` are mixes measured before the loop (e.g. from an
    earlier run); with ``include_reference`` the reference mix counts as measured at
    ``table.reference_kld``. Neither counts against ``max_measurements``.
    """
    if measure is None and measure_batch is None:
        raise UserError("allocate_loop needs measure(mix) or measure_batch(mixes)")
    budgets = sorted(int(b) for b in budgets)
    if not budgets:
        raise UserError("allocate_loop needs at least one byte budget")
    per_round = per_round or (len(budgets) + n_spread)
    fit_options = dict(fit_options or {})

    def run_batch(mixes: list[dict]) -> list[float]:
        if measure_batch is not None:
            out = list(measure_batch(mixes))
            if len(out) != len(mixes):
                raise UserError(f"measure_batch returned {len(out)} values for {len(mixes)} mixes")
            return [float(v) for v in out]
        return [float(measure(m)) for m in mixes]

    measurements: list[Measurement] = []
    seen: set = set()

    def record(idx, kld, pred, pred_add, rnd, why):
        key = tuple(int(x) for x in idx)
        seen.add(key)
        measurements.append(Measurement(choice=key, mix=table.mix(key), nbytes=int(table.size(idx)),
                                        predicted=float(pred), predicted_additive=float(pred_add),
                                        measured=float(kld), round=rnd, reason=why))

    if include_reference:
        ref = table.reference_index()
        record(ref, table.reference_kld, table.reference_kld, table.reference_kld, -1, "given")
    for mix, kld in given:
        idx = table.index(mix)
        record(idx, kld, table.additive(idx), table.additive(idx), -1, "given")

    def fit(weights=None) -> Correction:
        if not measurements:
            return IDENTITY
        return fit_correction(table, [m.choice for m in measurements], [m.measured for m in measurements],
                              weights=weights, **fit_options)

    def solve(corr: Correction) -> Frontier:
        return pareto_frontier(table.nbytes, corr.delta_table(table), table.fixed_bytes, max_points)

    rounds: list[RoundReport] = []
    spent, stale = 0, 0
    stop_reason = f"max_rounds={max_rounds} reached"
    correction = fit()
    frontier = solve(correction)
    for rnd in range(max_rounds):
        if spent >= max_measurements:
            stop_reason = f"measurement budget of {max_measurements} spent"
            break
        limit = min(per_round, max_measurements - spent)
        # (type indices, why, prediction): budget picks from each budget's own local correction
        picks: list[tuple[tuple, str, float]] = []
        taken = set(seen)
        for b in budgets:
            local = correction if local_bandwidth is None else fit(
                _local_weights([m.nbytes for m in measurements], b, local_bandwidth, local_floor))
            f = frontier if local is correction else solve(local)
            hit = _first_unmeasured(f, b, taken)
            if hit is not None:
                key = tuple(int(x) for x in f.choices[hit[0]])
                taken.add(key)
                picks.append((key, hit[1], float(local.predict(table, np.array(key)))))
        if n_spread > 0 and len(frontier):
            lo, hi = int(budgets[0] * (1.0 - spread_margin)), budgets[-1]
            for i in spread(frontier, n_spread + 2, lo, hi)[1:-1]:  # the ends sit at the budgets already
                key = tuple(int(x) for x in frontier.choices[i])
                if key not in taken:
                    taken.add(key)
                    picks.append((key, "spread", float(correction.predict(table, np.array(key)))))
        picks = picks[:limit]
        if not picks:
            stop_reason = "nothing new to measure: the predicted frontier's picks are all measured"
            break
        idxs = [np.array(k) for k, _, _ in picks]
        preds = [p for _, _, p in picks]
        adds = [float(table.additive(idx)) for idx in idxs]
        before = _best_per_budget(measurements, budgets)
        values = run_batch([table.mix(idx) for idx in idxs])
        for idx, (_, why, _), p, a, v in zip(idxs, picks, preds, adds, values):
            record(idx, v, p, a, rnd, why)
        spent += len(idxs)
        after = _best_per_budget(measurements, budgets)
        improved = _improved(before, after, min_rel_improvement)
        rounds.append(RoundReport(round=rnd, n_new=len(idxs), correction=correction,
                                  vs_measured=compare(preds, values), additive_vs_measured=compare(adds, values),
                                  best_under_budget=after, improved=improved))
        correction = fit()
        frontier = solve(correction)
        stale = 0 if improved else stale + 1
        if stale >= patience:
            stop_reason = (f"measured frontier did not improve by more than {min_rel_improvement:.1%} "
                           f"at any budget for {patience} round(s)")
            break
    loop_ms = [m for m in measurements if m.round >= 0]
    return LoopResult(table=table, measurements=measurements, rounds=rounds, correction=correction,
                      frontier=frontier, stop_reason=stop_reason,
                      overall=compare([m.predicted for m in loop_ms], [m.measured for m in loop_ms]),
                      overall_additive=compare([m.predicted_additive for m in loop_ms], [m.measured for m in loop_ms]))
