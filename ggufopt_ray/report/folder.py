"""Read a sweep's results folder back into memory, so the report needs nothing but that folder.

A sweep (``ggufopt_ray.sweep.run_sweep`` via ``report.tables.finalize_results``) leaves
``results.parquet`` (one row per trial), ``chunks.parquet`` (every per-chunk report),
``tokens.parquet`` (per-token KL-divergence), ``pareto.parquet``, ``best.json`` and ``sweep.json``
(provenance, baseline, errors). Only ``results.parquet`` is required; everything else is optional
and the report leaves out what is missing. The best row and the Pareto set are taken from the
files the sweep wrote, and recomputed the same way the sweep does when those files are absent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ggufopt_ray.errors import UserError


@dataclass
class ResultsFolder:
    """Everything a report is made of; ``results`` is sorted in report order (best first)."""

    root: Path
    results: pd.DataFrame
    kind: str  # "quality" (KLD against a baseline) or "bub" (batch/ubatch throughput)
    chunks: pd.DataFrame | None = None
    tokens: pd.DataFrame | None = None
    best_id: str | None = None
    pareto_ids: list[str] = field(default_factory=list)
    sweep: dict = field(default_factory=dict)
    hydra_config: str | None = None
    hydra_overrides: str | None = None

    @property
    def is_bub(self) -> bool:
        return self.kind == "bub"

    @property
    def best(self) -> dict | None:
        if self.best_id is None:
            return None
        hit = self.results[self.results["trial_id"] == self.best_id]
        return hit.iloc[0].to_dict() if len(hit) else None

    @property
    def provenance(self) -> dict:
        """What produced the numbers: sweep.json's provenance, else the rows' ``prov.*`` columns."""
        prov = dict(self.sweep.get("provenance") or {})
        if not prov and len(self.results):
            first = self.results.iloc[0]
            prov = {c[5:]: first[c] for c in self.results.columns if c.startswith("prov.")}
        return prov

    @property
    def errors(self) -> list[str]:
        return [str(e) for e in (self.sweep.get("errors") or [])]

    @property
    def confidence(self) -> float:
        c = numeric(self.results, "confidence").dropna()
        return float(c.iloc[0]) if len(c) else 0.95


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    return df if len(df) else None


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def numeric(df: pd.DataFrame, column: str) -> pd.Series:
    """``df[column]`` as floats (NaN where missing or not a number; all NaN without the column)."""
    if column not in df:
        return pd.Series(math.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def quality_ok(results: pd.DataFrame) -> pd.Series:
    """Rows that count for the best row and the Pareto front (as ``tables.finalize_results``)."""
    obj = numeric(results, "objective")
    ok = obj.notna() & (obj.abs() != math.inf)
    if "stop_reason" in results:
        ok &= results["stop_reason"] != "over_size_budget"
    return ok


def _pareto_ids(results: pd.DataFrame, pareto: pd.DataFrame | None) -> list[str]:
    if pareto is not None and "trial_id" in pareto:
        known = set(results["trial_id"])
        return [t for t in pareto["trial_id"].astype(str) if t in known]
    if not {"bits_per_weight", "composite"} <= set(results.columns):
        return []
    from ggufopt_ray.report.tables import pareto_front

    rows = results[quality_ok(results)][["trial_id", "bits_per_weight", "composite"]].to_dict("records")
    return [r["trial_id"] for r in pareto_front(rows)]


def _best_id(results: pd.DataFrame, kind: str, best: dict | None) -> str | None:
    if isinstance(best, dict) and str(best.get("trial_id")) in set(results["trial_id"]):
        return str(best["trial_id"])
    if kind == "bub":
        tps = numeric(results, "tokens_per_s")
        return None if tps.notna().sum() == 0 else str(results.loc[tps.idxmax(), "trial_id"])
    ok = results[quality_ok(results)]
    if not len(ok):
        return None
    return str(ok.loc[numeric(ok, "objective").idxmin(), "trial_id"])


def _sort(results: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Best first: by throughput for bub sweeps; else by the sweep's objective, rows that could not
    be ranked (failed, pruned before a score, over the size budget) last, larger models first."""
    df = results.copy()
    if kind == "bub":
        df["_k1"] = (-numeric(df, "tokens_per_s")).fillna(math.inf)
        return df.sort_values(["_k1", "label"], kind="stable").drop(columns="_k1").reset_index(drop=True)
    ok = quality_ok(df)
    df["_k0"] = (~ok).astype(int)
    df["_k1"] = numeric(df, "objective").where(ok, math.inf)
    df["_k2"] = -numeric(df, "bits_per_weight").fillna(0)
    return (df.sort_values(["_k0", "_k1", "_k2", "label"], kind="stable")
              .drop(columns=["_k0", "_k1", "_k2"]).reset_index(drop=True))


def load_results_folder(results_dir: str | Path) -> ResultsFolder:
    """Read a results folder; ``UserError`` when it is missing or holds no ``results.parquet``."""
    root = Path(results_dir).expanduser()
    if not root.exists():
        raise UserError(f"{root} does not exist; pass the output folder of a sweep (it holds results.parquet)")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass the output folder of a sweep (it holds results.parquet)")
    path = root / "results.parquet"
    if not path.is_file():
        hint = ("; no trial produced a result: its sweep.json lists the errors" if (root / "sweep.json").is_file()
                else "; pass the output folder of a finished sweep")
        raise UserError(f"{root} holds no results.parquet{hint}")
    try:
        results = pd.read_parquet(path)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise UserError(f"cannot read {path}: {exc}") from None
    if "label" not in results:
        raise UserError(f"{path} has no 'label' column; it is not a ggufopt sweep results table")
    results["label"] = results["label"].astype(str)
    if "trial_id" not in results:
        results["trial_id"] = [f"row{i}" for i in range(len(results))]
    results["trial_id"] = results["trial_id"].astype(str)
    kind = "bub" if "tokens_per_s" in results and "composite" not in results else "quality"

    chunks = _read_parquet(root / "chunks.parquet")
    if chunks is not None and "trial_id" in chunks:
        chunks["trial_id"] = chunks["trial_id"].astype(str)
    tokens = _read_parquet(root / "tokens.parquet")
    if tokens is not None and not {"label", "kld"} <= set(tokens.columns):
        tokens = None
    pareto = _read_parquet(root / "pareto.parquet") if kind == "quality" else None
    if pareto is not None and "trial_id" in pareto:
        pareto["trial_id"] = pareto["trial_id"].astype(str)

    hydra_dir = root / ".hydra"
    read = lambda p: p.read_text() if p.is_file() else None  # noqa: E731
    return ResultsFolder(
        root=root.resolve(), results=_sort(results, kind), kind=kind, chunks=chunks, tokens=tokens,
        best_id=_best_id(results, kind, _read_json(root / "best.json")),
        pareto_ids=_pareto_ids(results, pareto) if kind == "quality" else [],
        sweep=_read_json(root / "sweep.json") or {},
        hydra_config=read(hydra_dir / "config.yaml"), hydra_overrides=read(hydra_dir / "overrides.yaml"))
