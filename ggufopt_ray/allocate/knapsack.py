"""The exact size/quality frontier of all mixes: a multiple-choice knapsack solved for every budget.

One type per group, total bytes and predicted KLD both sums over groups. The frontier is every
mix that no other mix beats on both (fewer-or-equal bytes and lower-or-equal KLD, one strictly);
the best mix under any budget is on it. Groups are merged one at a time, keeping only the
Pareto-optimal partial (bytes, value) pairs. That is exact because both objectives are additive:
if partial mix A has no more bytes and no more KLD than partial mix B, then A plus any completion
beats or equals B plus the same completion, so B can never be needed.

Why not Lagrangian relaxation (llama.cpp PR #15550) or greedy ΔKLD/Δbyte (ExLlamaV3): both only
reach the points on the lower convex hull of the frontier, and between hull points they can miss
the best mix under a budget by a whole group's step; the size classes a publisher ships fall
wherever they fall.

The partial frontier can grow with every group. ``max_points`` caps it: past the cap the partial
frontier is thinned to one point per size bucket (the lowest-value one), and the result says so:
``exact`` is False and ``size_slack_bytes`` bounds the damage -- for every mix of the exact
frontier there is a returned mix with at most ``size_slack_bytes`` more bytes and no more value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggufopt_ray.errors import UserError


@dataclass(frozen=True)
class FrontierPoint:
    nbytes: int
    value: float
    choice: np.ndarray  # type index per group


@dataclass(frozen=True)
class Frontier:
    """Pareto-optimal mixes, by increasing bytes (and so strictly decreasing value)."""

    nbytes: np.ndarray  # int64 [P], strictly increasing
    value: np.ndarray  # float64 [P], strictly decreasing
    choices: np.ndarray  # int32 [P, G]: the type index of each group
    exact: bool
    size_slack_bytes: int  # 0 when exact; see the module docstring
    largest_partial: int  # the most partial points held at once (what the solve cost)

    def __len__(self) -> int:
        return len(self.nbytes)

    def point(self, i: int) -> FrontierPoint:
        return FrontierPoint(int(self.nbytes[i]), float(self.value[i]), self.choices[i].copy())


def _pareto_keep(sizes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal points, by increasing size; one per distinct (size, value)."""
    order = np.lexsort((values, sizes))
    v = values[order]
    keep = np.empty(len(v), dtype=bool)
    keep[0] = True
    keep[1:] = v[1:] < np.minimum.accumulate(v)[:-1]
    return order[keep]


def pareto_frontier(nbytes, value, fixed_bytes: int = 0, max_points: int | None = None) -> Frontier:
    """All Pareto-optimal (bytes, value) mixes of the table ``nbytes[G, T]``, ``value[G, T]``.

    Cells whose value is NaN or infinite are not allowed. Values are summed in group order
    starting from 0.0, so a point's value is bit-identical to summing its mix's cells in that order.
    """
    nb = np.asarray(nbytes, dtype=np.int64)
    val = np.asarray(value, dtype=np.float64)
    if nb.ndim != 2 or nb.shape != val.shape:
        raise UserError(f"nbytes {nb.shape} and value {val.shape} must be the same [groups, types] table")
    if max_points is not None and max_points < 2:
        raise UserError(f"max_points must be at least 2, not {max_points}")
    G = nb.shape[0]
    sizes = np.array([int(fixed_bytes)], dtype=np.int64)
    vals = np.array([0.0])
    parents, options = [], []
    exact, slack, largest = True, 0, 1
    for g in range(G):
        allowed = np.flatnonzero(np.isfinite(val[g]))
        if len(allowed) == 0:
            raise UserError(f"group {g} has no allowed type (every value is NaN/inf)")
        # A type the group's own other types dominate is never needed.
        opts = allowed[_pareto_keep(nb[g, allowed], val[g, allowed])]
        k = len(opts)
        cand_s = (sizes[:, None] + nb[g, opts][None, :]).ravel()
        cand_v = (vals[:, None] + val[g, opts][None, :]).ravel()
        largest = max(largest, len(cand_s))
        keep = _pareto_keep(cand_s, cand_v)
        if max_points is not None and len(keep) > max_points:
            keep, gap = _thin(cand_s[keep], keep, max_points)
            exact, slack = False, slack + gap
        sizes, vals = cand_s[keep], cand_v[keep]
        parents.append((keep // k).astype(np.int64))
        options.append(opts[keep % k].astype(np.int32))
    choices = np.empty((len(sizes), G), dtype=np.int32)
    at = np.arange(len(sizes))
    for g in range(G - 1, -1, -1):
        choices[:, g] = options[g][at]
        at = parents[g][at]
    return Frontier(nbytes=sizes, value=vals, choices=choices, exact=exact, size_slack_bytes=int(slack),
                    largest_partial=int(largest))


def _thin(sizes: np.ndarray, keep: np.ndarray, max_points: int) -> tuple[np.ndarray, int]:
    """Keep the last (largest, hence lowest-value) point of each of ``max_points`` equal size buckets.

    Returns the kept indices and the largest size step a dropped point's stand-in adds.
    """
    lo, hi = int(sizes[0]), int(sizes[-1])
    width = -(-(hi - lo + 1) // max_points)
    bucket = (sizes - lo) // width
    last = np.empty(len(sizes), dtype=bool)
    last[-1] = True
    last[:-1] = bucket[1:] != bucket[:-1]
    kept_size_of_bucket = np.zeros(int(bucket[-1]) + 1, dtype=np.int64)
    kept_size_of_bucket[bucket[last]] = sizes[last]
    gap = int(np.max(kept_size_of_bucket[bucket] - sizes))
    return keep[last], gap


def best_under(frontier: Frontier, budget: int) -> FrontierPoint | None:
    """The lowest-value mix of at most ``budget`` bytes, or None when even the smallest is larger."""
    i = int(np.searchsorted(frontier.nbytes, budget, side="right")) - 1
    return None if i < 0 else frontier.point(i)


def spread(frontier: Frontier, n: int, lo: int | None = None, hi: int | None = None) -> list[int]:
    """Indices of up to ``n`` frontier points evenly spaced in bytes over [lo, hi] (default: all)."""
    if len(frontier) == 0 or n <= 0:
        return []
    lo = int(frontier.nbytes[0]) if lo is None else lo
    hi = int(frontier.nbytes[-1]) if hi is None else hi
    targets = np.linspace(lo, hi, n)
    idx = np.clip(np.searchsorted(frontier.nbytes, targets, side="right") - 1, 0, len(frontier) - 1)
    return list(dict.fromkeys(int(i) for i in idx))


def cells_of_best(frontier: Frontier, budgets, reference) -> set[tuple[int, int]]:
    """``(group, type)`` index pairs in which the best mix under some budget differs from the
    ``reference`` mix (type indices [G]): the cells whose values decide those mixes."""
    out: set[tuple[int, int]] = set()
    ref = np.asarray(reference)
    for b in budgets:
        point = best_under(frontier, int(b))
        if point is not None:
            out.update((int(g), int(point.choice[g])) for g in np.flatnonzero(point.choice != ref))
    return out
