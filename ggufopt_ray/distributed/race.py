"""The race board: one small named actor per sweep where trials post per-chunk results.

Racing (:mod:`ggufopt_ray.metrics.racing`) decides whether a candidate may stop by comparing it
with every other candidate on the chunks they share, so a trial needs the others' per-chunk
values as they come in — across trials that Tune starts at different times, on any node. Why an
actor rather than a Tune ``TrialScheduler``: a scheduler decides in the driver from reported
metrics and can only *stop* a trial, which then never writes its final row (full bootstrap,
adjusted mean, the reason it stopped); with a board the trial itself asks, decides with the same
pure function, and ends with a complete row saying ``dominated_by=<label>``. The board only
stores numbers; every decision is made in the trial.
A trial's side of it is :class:`RaceRule`, the stop rule its chunk loop asks after each chunk.

The board's state is written to ``racing.json`` in the run directory after every post (a few KB),
so a resumed sweep starts from what the finished trials left, and the final adjusted estimates of
every candidate (with the deepest reference the sweep produced) are computed from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray

from ggufopt_ray.metrics.racing import (RaceDecision, RaceEntry, RacingConfig, adjusted_mean, chunk_order,
                                        per_chunk_values, race_decision)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RaceBoard:
    """Per candidate label: its size and its per-chunk target values by chunk index."""

    def __init__(self, state_path: str):
        self.path = Path(state_path)
        self.state: dict[str, dict] = load_board(self.path)

    def join(self, label: str, size: float) -> int:
        """``label``'s place in the race (0, 1, ... in the order candidates first joined): it
        picks the candidate's chunk order. A candidate that joined before (a retried trial, a
        resumed sweep) keeps its place, so it finds its committed chunks again."""
        entry = self.state.setdefault(label, {"size": float(size), "values": {}})
        if "race_index" not in entry:
            entry["race_index"] = 1 + max((e.get("race_index", -1) for e in self.state.values()), default=-1)
            self._save()
        return int(entry["race_index"])

    def post(self, label: str, size: float, index: int, value: float) -> dict:
        """Record ``label``'s value on chunk ``index``; returns every candidate's values so far."""
        entry = self.state.setdefault(label, {"size": float(size), "values": {}})
        entry["size"] = float(size)
        entry["values"][str(int(index))] = float(value)
        self._save()
        return self.state

    def _save(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)

    def snapshot(self) -> dict:
        return self.state


def load_board(path: Path) -> dict:
    """The board's state from ``path`` (empty when there is none yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def board_entries(state: dict, exclude: str | None = None) -> list:
    """The board's candidates as RaceEntry (values with their chunk ids; their order is irrelevant
    to every decision about *other* candidates)."""
    out = []
    for label, e in state.items():
        if label == exclude or not e.get("values"):
            continue
        ids = sorted(int(i) for i in e["values"])
        out.append(RaceEntry(label, e["size"], [e["values"][str(i)] for i in ids], chunk_ids=ids))
    return out


def start_board(output_dir: Path, run_tag: str):
    """The sweep's board (named, so the dashboard shows it), holding what a resumed run left."""
    return RaceBoard.options(name=f"race-board-{run_tag}").remote(str(Path(output_dir) / "racing.json"))


def close_board(board, cfg: RacingConfig) -> dict[str, dict]:
    """End the sweep's board; every candidate's final adjusted estimate (:func:`final_estimates`)."""
    state = ray.get(board.snapshot.remote())
    ray.kill(board)
    return final_estimates(state, cfg)


def final_estimates(state: dict, cfg) -> dict[str, dict]:
    """Every candidate's regression-adjusted mean with what the whole sweep measured.

    A candidate that stopped early borrowed strength from what the others had measured *at that
    time*; at the end they have measured more, so the published estimate is recomputed here
    with the final data (same estimator, :func:`ggufopt_ray.metrics.racing.adjusted_mean`)."""
    entries = board_entries(state)
    out = {}
    for e in entries:
        if e.n_chunks:
            out[e.label] = adjusted_mean(entries, e.label, cfg).to_dict()
    return out


class RaceRule:
    """The racing stop rule of one trial: post each chunk's value to ``board``, decide with
    everyone's values (:func:`ggufopt_ray.metrics.racing.race_decision`, a pure function)."""

    def __init__(self, board, cfg: RacingConfig, label: str, size: float):
        self.board, self.cfg, self.label, self.size = board, cfg, label, float(size)
        self.values: list[float] = []
        self.decision: RaceDecision | None = None
        self.race_index = ray.get(board.join.remote(label, self.size))
        # The chunks this candidate evaluates, in order (staggered: its own offset after the
        # shared anchor chunks; racing.chunk_order).
        self.order = (chunk_order(self.race_index, cfg.max_chunks, cfg.anchor) if cfg.order == "staggered"
                      else list(range(cfg.max_chunks)))

    def __call__(self, per_chunk: list[dict]) -> tuple[bool, str]:
        cfg = self.cfg
        self.values.extend(per_chunk_values(per_chunk[len(self.values):], cfg.target))
        k = len(self.values)
        state = ray.get(self.board.post.remote(self.label, self.size, self.order[k - 1], self.values[-1]))
        others = board_entries(state, exclude=self.label)
        me = RaceEntry(self.label, self.size, list(self.values), chunks=per_chunk if cfg.target != "mean" else None,
                       chunk_ids=self.order[:k])
        self.decision = race_decision([me, *others], self.label, cfg)
        return self.decision.stop, self.decision.reason

    def row_fields(self) -> dict:
        """The decision in the results row: who dominated, and the borrowed-strength mean."""
        d = self.decision
        if d is None:
            return {}
        out = {"dominated_by": d.dominated_by or ""}
        adj = d.adjusted or {}
        if self.cfg.target == "mean" and adj:
            out.update({"kld_mean_adj": adj.get("estimate"), "kld_mean_adj_se": adj.get("se"),
                        "kld_mean_adj_lo": adj.get("lo"), "kld_mean_adj_hi": adj.get("hi"),
                        "kld_mean_adj_control": adj.get("control") or ""})
        return out
