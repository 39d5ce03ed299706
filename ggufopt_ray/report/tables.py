"""One row per trial, the best row and the Pareto front, written as Parquet, CSV and JSON.

Every row carries what produced it (fingerprints, versions, runtime settings, seeds) so a number
in a table can always be traced back. The Pareto front is over size (bits per weight) and
quality (the composite KLD score): a candidate is on it when no other is both smaller and closer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ggufopt_ray.evaluation import parse_chunk_ids
from ggufopt_ray.report.format import fmt_interval, fmt_num, fmt_pm
from ggufopt_ray.store.results import ResultsStore

PARETO_X = "bits_per_weight"
PARETO_Y = "composite"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def pareto_front(rows: list[dict], x: str = PARETO_X, y: str = PARETO_Y) -> list[dict]:
    """Rows not dominated in (x, y), both minimised; sorted by x."""
    pts = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    pts.sort(key=lambda r: (r[x], r[y]))
    front, best_y = [], math.inf
    for r in pts:
        if r[y] < best_y:
            front.append(r)
            best_y = r[y]
    return front


def _write_table(rows: list[dict], path_stem: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in df.columns:  # Parquet needs one type per column
        if df[col].dtype == object:
            df[col] = df[col].map(lambda v: v if isinstance(v, str) or v is None else json.dumps(v, default=str))
    tmp_pq = path_stem.with_name(path_stem.name + ".parquet.partial")
    df.to_parquet(tmp_pq, index=False)
    tmp_pq.replace(path_stem.with_suffix(".parquet"))
    tmp_csv = path_stem.with_name(path_stem.name + ".csv.partial")
    df.to_csv(tmp_csv, index=False)
    tmp_csv.replace(path_stem.with_suffix(".csv"))


def _write_token_values(rows: list[dict], path: Path) -> None:
    """Per-token KLD of every evaluated trial (float32), so distributions can be plotted from the
    results folder alone, without the cache."""
    labels, chunks, kld = [], [], []
    seen = set()
    for r in rows:
        root = r.get("results_store")
        if not root or root in seen or not Path(root).exists() or not r.get("chunks"):
            continue  # a candidate evaluated twice (Optuna may repeat a point) counts once
        seen.add(root)
        store = ResultsStore.open(root)
        ids = parse_chunk_ids(r["chunk_ids"]) if r.get("chunk_ids") else range(int(r["chunks"]))
        for i in ids:
            if not store.has(i):
                break
            values = store.read(i)["kld"].astype(np.float32)
            kld.append(values)
            labels += [r["label"]] * len(values)
            chunks.append(np.full(len(values), i, np.int32))
    if not kld:
        if path.exists():
            path.unlink()  # never leave an earlier run's values looking current
        return
    table = pa.table({"label": pa.array(labels, pa.string()), "chunk": pa.array(np.concatenate(chunks)),
                      "kld": pa.array(np.concatenate(kld))})
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp)
    tmp.replace(path)


def finalize_results(rows: list[dict], history: list[dict], output_dir: Path, provenance: dict,
                     bub: bool = False, imatrix_threshold: float = 0.01) -> tuple[list[dict], dict | None, list[dict]]:
    """Add provenance, pick the best row and the Pareto set, write everything under output_dir."""
    output_dir = Path(output_dir)
    rows = [{**r, **{f"prov.{k}": v for k, v in provenance.items()}} for r in rows]
    if bub:
        ok = [r for r in rows if _finite(r.get("tokens_per_s"))]
        best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
        pareto: list[dict] = []
        rows.sort(key=lambda r: -(r.get("tokens_per_s") or 0))
    else:
        ok = [r for r in rows if _finite(r.get("objective")) and r.get("stop_reason") != "over_size_budget"]
        best = min(ok, key=lambda r: r["objective"]) if ok else None
        pareto = pareto_front(ok)
        rows.sort(key=lambda r: (-(r.get("bits_per_weight") or 0), r.get("label", "")))
    if rows:
        _write_table(rows, output_dir / "results")
    if history:
        keep = [{k: v for k, v in h.items() if isinstance(v, (int, float, str, bool)) or v is None} for h in history]
        _write_table(keep, output_dir / "chunks")
    if pareto:
        _write_table(pareto, output_dir / "pareto")
    _write_token_values(rows, output_dir / "tokens.parquet")
    if best is not None and any("config.imatrix_chunks" in r for r in rows) and len(
            {r.get("config.imatrix_chunks") for r in rows}) > 1:
        best = {**best, "imatrix_growth": imatrix_growth(rows, imatrix_threshold)}
    (output_dir / "best.json").write_text(json.dumps(best, indent=2, default=str))
    return rows, best, pareto


def imatrix_growth(rows: list[dict], threshold: float) -> dict:
    """The seed's iterative calibration, decided from the scored sizes: grow the importance
    matrix while the next size still lowers the composite score by more than ``threshold``
    (relative); the recommended size is where growth stops paying.

    Growth is judged among real imatrix sizes (one calibration chunk and up). The size-0 row,
    the type quantized without an imatrix, is the reference the recommendation is compared with:
    a tiny imatrix can be worse than none (it overfits a few chunks), which must not stop the
    growth before it starts.
    """
    by_size: dict[int, float] = {}
    for r in rows:
        k, v = r.get("config.imatrix_chunks"), r.get("composite")
        if k is not None and _finite(v):
            by_size[int(k)] = min(float(v), by_size.get(int(k), math.inf))
    sizes = sorted(k for k in by_size if k > 0)
    steps, chosen = [], sizes[0] if sizes else None
    for a, b in zip(sizes, sizes[1:]):
        gain = (by_size[a] - by_size[b]) / by_size[a] if by_size[a] > 0 else 0.0
        steps.append({"from": a, "to": b, "composite_from": by_size[a], "composite_to": by_size[b],
                      "relative_gain": gain})
        if gain < threshold:
            break
        chosen = b
    none = by_size.get(0)
    gain_over_none = None
    if chosen is not None and none is not None and none > 0:
        gain_over_none = (none - by_size[chosen]) / none
    return {"threshold": threshold, "steps": steps, "recommended_imatrix_chunks": chosen,
            "composite_without_imatrix": none, "gain_over_no_imatrix": gain_over_none}


def _fmt(x, spec=".4f") -> str:
    return format(float(x), spec) if _finite(x) else "-"


def format_results_table(rows: list[dict], bub: bool = False) -> str:
    """A fixed-width table a person can read in a terminal (also valid Markdown)."""
    if not rows:
        return "(no results)"
    if bub:
        # Optuna may time one setting twice: one line per setting, the median of its timings.
        timings: dict[tuple, list[float]] = {}
        for r in rows:
            if _finite(r.get("tokens_per_s")):
                timings.setdefault((r.get("n_batch"), r.get("n_ubatch")), []).append(float(r["tokens_per_s"]))
        medians = {k: float(np.median(v)) for k, v in timings.items()}
        lines = ["| n_batch | n_ubatch | tokens/s | trials |", "|---:|---:|---:|---:|"]
        for (n_batch, n_ubatch), median in sorted(medians.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {n_batch} | {n_ubatch} | {_fmt(median, '.1f')} | {len(timings[(n_batch, n_ubatch)])} |")
        return "\n".join(lines)
    langs = any(r.get("worst_language") for r in rows)
    head = ("| candidate | bpw | size MiB | KLD mean ± SE | median | p99 | composite [95% CI] | same top | "
            "ln PPL ratio ± SE | " + ("worst language: KLD | " if langs else "") + "chunks | stop |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if langs else "") + "---:|---|"]
    # A sampler may propose the same candidate twice (and fitting mixes to a budget can map two
    # proposals to one mix): one line per candidate, the one that saw the most chunks.
    repeats: dict[str, int] = {}
    kept: dict[str, dict] = {}
    for r in rows:
        label = str(r.get("label"))
        repeats[label] = repeats.get(label, 0) + 1
        if label not in kept or (r.get("chunks") or 0) > (kept[label].get("chunks") or 0):
            kept[label] = r
    order = list(dict.fromkeys(str(r.get("label")) for r in rows))
    for r in (kept[label] for label in order):
        size = r.get("size_bytes")
        n = repeats[str(r.get("label"))]
        # Significant digits, not fixed decimals: a good Q8_0 has KLD ~5e-5, which "0.00005" hides.
        same_top = fmt_pm(100 * r["same_top"], 100 * r.get("same_top_se", math.nan)) + "%" \
            if _finite(r.get("same_top")) else "-"
        lines.append(
            f"| {r.get('label')}{f' ({n} trials)' if n > 1 else ''} | {_fmt(r.get('bits_per_weight'), '.3f')} | "
            f"{_fmt(size / 2**20 if _finite(size) else None, '.2f')} | "
            f"{_mean_cell(r)} | "
            f"{fmt_num(r.get('kld_median'), 3, trim=False)} | {fmt_num(r.get('kld_p99'), 3, trim=False)} | "
            f"{fmt_interval(r.get('composite'), r.get('composite_lo'), r.get('composite_hi'))} | "
            f"{same_top} | {fmt_pm(r.get('ln_ppl_ratio'), r.get('ln_ppl_ratio_se'))} | "
            + (f"{r.get('worst_language') or '-'}: {fmt_num(r.get('worst_language_kld'), 3, trim=False)} | "
               if langs else "")
            + f"{r.get('chunks')} | {r.get('stop_reason')} |")
    controls = {r.get("kld_mean_adj_control") for r in kept.values() if _borrowed(r)}
    if controls:
        lines.append("")
        if controls == {"twoway"}:
            lines.append("* mean of all chunks estimated from the chunks evaluated plus every chunk's difficulty "
                         "as the other candidates measured it (two-way fit, log KLD = candidate + chunk); "
                         "its SE is that estimator's")
        else:
            lines.append("* mean of all chunks estimated from the chunks evaluated, with another candidate (or the "
                         "two-way fit of chunk difficulty) as a control; its SE is that estimator's")
    return "\n".join(lines)


def _borrowed(r: dict) -> bool:
    """Whether the row's mean borrows strength from another candidate (it stopped before it)."""
    return bool(r.get("kld_mean_adj_control")) and _finite(r.get("kld_mean_adj"))


def _mean_cell(r: dict) -> str:
    if _borrowed(r):
        return fmt_pm(r.get("kld_mean_adj"), r.get("kld_mean_adj_se")) + "*"
    return fmt_pm(r.get("kld_mean"), r.get("kld_mean_se"))
