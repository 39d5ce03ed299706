"""The race board: one small named actor per sweep where trials post per-chunk results.

Racing (:mod:`ggufopt_ray.metrics.racing`) decides whether a candidate may stop by comparing it
with every other candidate on the chunks they share, so a trial needs the others' per-chunk
values as they come in — across trials that Tune starts at different times, on any node. Why an
actor rather than a Tune ``TrialScheduler``: a scheduler decides in the driver from reported
metrics and can only *stop* a trial, which then never writes its final row (full bootstrap,
adjusted mean, the reason it stopped); with a board the trial itself asks, decides with the same
pure function, and ends with a complete row saying ``dominated_by=<label>``. The board only
stores numbers; every decision is made in the trial.

The board's state is written to ``racing.json`` in the run directory after every post (a few KB),
so a resumed sweep starts from what the finished trials left, and the final adjusted estimates of
every candidate (with the deepest reference the sweep produced) are computed from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RaceBoard:
    """Per candidate label: its size and its per-chunk target values by chunk index."""

    def __init__(self, state_path: str):
        self.path = Path(state_path)
        self.state: dict[str, dict] = load_board(self.path)

    def post(self, label: str, size: float, index: int, value: float) -> dict:
        """Record ``label``'s value on chunk ``index``; returns every candidate's values so far."""
        entry = self.state.setdefault(label, {"size": float(size), "values": {}})
        entry["size"] = float(size)
        entry["values"][str(int(index))] = float(value)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)
        return self.state

    def snapshot(self) -> dict:
        return self.state


def load_board(path: Path) -> dict:
    """The board's state from ``path`` (empty when there is none yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def prefix_values(entry: dict) -> list[float]:
    """A candidate's values on chunks 0, 1, ... up to its first missing chunk."""
    values, out, i = entry["values"], [], 0
    while str(i) in values:
        out.append(values[str(i)])
        i += 1
    return out


def start_board(output_dir: Path, run_tag: str):
    """The sweep's board (named, so the dashboard shows it), holding what a resumed run left."""
    return RaceBoard.options(name=f"race-board-{run_tag}").remote(str(Path(output_dir) / "racing.json"))


def final_estimates(state: dict, cfg) -> dict[str, dict]:
    """Every candidate's regression-adjusted mean with what the whole sweep measured.

    A candidate that stopped early borrowed strength from the deepest candidate *at that time*;
    at the end the reference may have gone further, so the published estimate is recomputed here
    with the final data (same estimator, :func:`ggufopt_ray.metrics.racing.adjusted_mean`)."""
    from ggufopt_ray.metrics.racing import RaceEntry, adjusted_mean

    entries = [RaceEntry(label, e["size"], prefix_values(e)) for label, e in state.items()]
    out = {}
    for e in entries:
        if e.n_chunks:
            out[e.label] = adjusted_mean(entries, e.label, cfg).to_dict()
    return out
