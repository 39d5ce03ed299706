"""PNG plots of a sweep's results folder (matplotlib, Agg, no display needed).

Each plot is drawn only when its data is in the folder:

- ``pareto.png``: size (bits per weight) against quality (composite KLD score) for every
  candidate, with the composite's bootstrap interval as error bars and the Pareto front and the
  best candidate highlighted (quality sweeps);
- ``chunk_curves.png``: running mean KLD and composite of the leading candidates as chunks are
  evaluated, with their uncertainty bands, showing why a trial stopped when it did (chunks.parquet);
- ``kld_distributions.png``: per-token KLD of the leading candidates as log-x histograms and
  ECDFs with the median, p90, p99 and p99.9 marked (tokens.parquet);
- ``bub_heatmap.png``: throughput over n_batch x n_ubatch, median of repeated trials (bub sweeps);
- ``zfp.png``: ZFP rate against weight SNR and against mean KLD, one line per block
  dimensionality (ZFP trials).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state) and written
atomically (``NAME.png.partial`` renamed when complete).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ggufopt_ray.report.folder import ResultsFolder, numeric, quality_ok

N_LEADING = 6  # candidates drawn in the per-candidate plots (curves, distributions)
DPI = 110
Z95 = 1.959963984540054
PERCENTILES = (("median", 50.0, "o"), ("p90", 90.0, "s"), ("p99", 99.0, "^"), ("p99.9", 99.9, "D"))


@dataclass
class Plot:
    """One written plot: file name (relative to the report folder), title and caption."""

    name: str
    path: Path
    title: str
    caption: str


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg: renders without a display, whatever pyplot's backend is
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, format="png", dpi=DPI)
    tmp.replace(path)


def _log_if_wide(ax, values, axis: str = "y", ratio: float = 20.0) -> None:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if len(v) and (v > 0).all() and v.max() / v.min() > ratio:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _short(label: str, width: int = 44) -> str:
    """Mix labels run to 200 characters; a legend that wide squeezes the axes to nothing."""
    label = str(label)
    return label if len(label) <= width else label[: width - 1] + "…"


def _colors(labels: list[str]) -> dict[str, str]:
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def leading_rows(folder: ResultsFolder, n: int = N_LEADING) -> pd.DataFrame:
    """The first ``n`` rankable quality rows in report order (one per label)."""
    df = folder.results[quality_ok(folder.results)] if not folder.is_bub else folder.results.iloc[0:0]
    return df.drop_duplicates("label").head(n)


def _kind(recipe) -> str:
    try:
        return str(json.loads(recipe).get("kind") or "candidate")
    except (TypeError, ValueError, AttributeError):
        return "candidate"


def _annotate(ax, points: list[tuple[float, float, str, str]], min_gap_px: float = 11.0) -> None:
    """Label points, nudging labels up so that neighbours do not print over each other."""
    ax.autoscale_view()
    placed: list[tuple[float, float]] = []
    to_px = ax.transData.transform
    for px, py, text, color in sorted(points, key=lambda p: (to_px((p[0], p[1]))[1], p[2])):
        dx, dy = to_px((px, py))
        ty = dy + 4
        for ox, oy in sorted(placed, key=lambda q: q[1]):
            if abs(ox - dx) < 90 and abs(oy - ty) < min_gap_px:
                ty = oy + min_gap_px
        placed.append((dx, ty))
        ax.annotate(text, (px, py), xytext=(7, ty - dy), textcoords="offset pixels", fontsize=8, color=color,
                    zorder=6, arrowprops=dict(arrowstyle="-", color=color, lw=0.5, alpha=0.5) if ty - dy > 8 else None)


# --------------------------------------------------------------------------------------------
def plot_pareto(folder: ResultsFolder, path: Path) -> Plot | None:
    df = folder.results
    x, y = numeric(df, "bits_per_weight"), numeric(df, "composite")
    have = x.notna() & y.notna()
    if folder.is_bub or not have.any():
        return None
    lo, hi = numeric(df, "composite_lo"), numeric(df, "composite_hi")
    kinds = df["recipe"].map(_kind) if "recipe" in df else pd.Series("candidate", index=df.index)
    markers = dict(zip(sorted(kinds[have].unique()), "os^vDP"))
    on_front = df["trial_id"].isin(folder.pareto_ids)
    over = (df["stop_reason"] == "over_size_budget") if "stop_reason" in df else pd.Series(False, index=df.index)
    conf = folder.confidence

    fig, ax = _figure(8.5, 5.8)
    for kind, marker in markers.items():
        sel = have & (kinds == kind) & ~on_front
        if not sel.any():
            continue
        err = np.vstack([(y - lo).clip(lower=0).fillna(0)[sel], (hi - y).clip(lower=0).fillna(0)[sel]])
        name = "candidates" if len(markers) == 1 else f"{kind} candidates"
        ax.errorbar(x[sel], y[sel], yerr=err, fmt=marker, color="0.55", ecolor="0.75", ms=5, capsize=2,
                    lw=1, label=name, mfc="none" if over[sel].all() else None, zorder=2)
    if on_front.any():
        f = df[on_front & have].assign(_x=x, _y=y).sort_values("_x")
        fx, fy = f["_x"], f["_y"]
        err = np.vstack([(fy - lo[f.index]).clip(lower=0).fillna(0), (hi[f.index] - fy).clip(lower=0).fillna(0)])
        ax.plot(fx, fy, "-", color="C3", lw=1.5, alpha=0.6, zorder=3)
        ax.errorbar(fx, fy, yerr=err, fmt="o", color="C3", ecolor="C3", ms=6, capsize=3, lw=1.2,
                    label=f"Pareto front ({len(f)})", zorder=4)
    best = df["trial_id"] == folder.best_id
    if (best & have).any():
        ax.plot(x[best & have], y[best & have], "*", ms=18, mfc="gold", mec="black", mew=1,
                label="best (objective)", zorder=5)
    if (over & have).any():
        ax.plot(x[over & have], y[over & have], "x", color="C7", ms=7, label="over size budget", zorder=3)
    _log_if_wide(ax, pd.concat([y[have], lo[have].dropna(), hi[have].dropna()]).clip(lower=1e-12))
    ax.margins(x=0.1)
    label_all = have.sum() <= 15
    _annotate(ax, [(x[i], y[i], _short(df.at[i, "label"], 28), "C3" if on_front[i] else "0.25")
                   for i in df.index[have] if label_all or on_front[i] or best[i]])
    ax.set_xlabel("model size (bits per weight)")
    ax.set_ylabel("composite KLD score (nats, lower is better)")
    ax.set_title(f"Size vs quality: {int(have.sum())} candidates, Pareto front in red\n"
                 f"error bars: {100 * conf:.0f}% bootstrap interval over chunks", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    return Plot(path.name, path, "Pareto front: size vs quality",
                f"Every candidate's bits per weight against its composite KLD score with its "
                f"{100 * conf:.0f}% bootstrap interval; red: the Pareto front (no other candidate is both "
                f"smaller and closer), star: the best candidate by the sweep's objective.")


# --------------------------------------------------------------------------------------------
def plot_chunk_curves(folder: ResultsFolder, path: Path) -> Plot | None:
    ch = folder.chunks
    if folder.is_bub or ch is None or not {"chunks", "kld_mean"} <= set(ch.columns):
        return None
    key = "trial_id" if "trial_id" in ch else "label"
    lead = leading_rows(folder)
    lead = lead[lead[key].isin(set(ch[key]))]
    if not len(lead):
        return None
    colors = _colors(list(lead["label"]))
    fig, (ax1, ax2) = _figure(12.5, 5.2, ncols=2)
    all1, all2 = [], []
    for _, row in lead.iterrows():
        c = ch[ch[key] == row[key]].assign(_n=lambda d: numeric(d, "chunks")).sort_values("_n")
        c = c.drop_duplicates("_n", keep="last")
        n, m, se = c["_n"], numeric(c, "kld_mean"), numeric(c, "kld_mean_se")
        col = colors[row["label"]]
        ax1.plot(n, m, "o-", color=col, ms=3, lw=1.5, label=_short(row["label"]))
        ax1.fill_between(n, (m - Z95 * se).clip(lower=m * 0.05), m + Z95 * se, color=col, alpha=0.18, lw=0)
        all1 += list(m) + list(m + Z95 * se)
        comp, clo, chi = numeric(c, "composite"), numeric(c, "composite_lo"), numeric(c, "composite_hi")
        if comp.notna().any():
            ax2.plot(n, comp, "o-", color=col, ms=3, lw=1.5, label=_short(row["label"]))
            ok = clo.notna() & chi.notna()
            ax2.fill_between(n[ok], clo[ok], chi[ok], color=col, alpha=0.18, lw=0)
            all2 += list(comp) + list(chi[ok])
    _log_if_wide(ax1, all1)
    _log_if_wide(ax2, all2)
    ax1.set_title("Running mean KLD (band: ±1.96 SE)", fontsize=11)
    ax1.set_ylabel("mean KLD so far (nats/token)")
    ax2.set_title(f"Running composite score (band: {100 * folder.confidence:.0f}% bootstrap interval)", fontsize=11)
    ax2.set_ylabel("composite KLD score (nats)")
    for ax in (ax1, ax2):
        ax.set_xlabel("chunks evaluated")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Per-chunk curves of the {len(lead)} leading candidates", fontsize=12)
    _save(fig, path)
    return Plot(path.name, path, "Per-chunk KLD curves",
                "How the estimates of the leading candidates settled as chunks were evaluated; a trial "
                "stops early once its interval is tight enough or it cannot beat the leaders.")


# --------------------------------------------------------------------------------------------
def plot_kld_distributions(folder: ResultsFolder, path: Path) -> Plot | None:
    tok = folder.tokens
    if folder.is_bub or tok is None:
        return None
    lead = leading_rows(folder)
    labels = [lb for lb in lead["label"] if lb in set(tok["label"])]
    if not labels:
        return None
    values = {lb: tok.loc[tok["label"] == lb, "kld"].to_numpy(np.float64) for lb in labels}
    values = {lb: v[np.isfinite(v)] for lb, v in values.items() if np.isfinite(v).any()}
    if not values:
        return None
    positive = np.concatenate([v[v > 0] for v in values.values()])
    floor = max(float(positive.min()) if len(positive) else 1e-10, 1e-10)
    top = max(float(np.concatenate(list(values.values())).max()), floor * 10)
    clipped = sum(int((v < floor).sum()) for v in values.values())
    bins = np.logspace(math.log10(floor), math.log10(top), 60)
    colors = _colors(labels)
    fig, (ax1, ax2) = _figure(12.5, 5.4, ncols=2)
    for lb, v in values.items():
        v = np.clip(v, floor, None)
        col = colors[lb]
        ax1.hist(v, bins=bins, weights=np.full(len(v), 100.0 / len(v)), histtype="step", lw=1.5, color=col,
                 label=f"{_short(lb)} (n={len(v):,})")
        s = np.sort(v)
        ax2.step(s, np.arange(1, len(s) + 1) / len(s), where="post", color=col, lw=1.5, label=_short(lb))
        for _, q, marker in PERCENTILES:
            p = float(np.percentile(v, q))
            ax2.plot(p, q / 100, marker, color=col, ms=6, mec="black", mew=0.6)
    for name, q, marker in PERCENTILES:  # legend entries for the percentile markers
        ax2.plot([], [], marker, color="0.6", mec="black", mew=0.6, label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("per-token KL-divergence (nats, log scale)"
                      + (f"; {clipped} values ≤ 0 drawn at {floor:.1e}" if clipped else ""))
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("share of scored tokens (%) per bin")
    ax1.set_title("Histogram (log-spaced bins)", fontsize=11)
    ax1.legend(fontsize=8, loc="best")
    ax2.set_ylabel("fraction of tokens with KLD ≤ x")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("ECDF, percentiles marked", fontsize=11)
    ax2.legend(fontsize=8, loc="lower right", ncols=2)
    fig.suptitle(f"KL-divergence distributions of the {len(values)} leading candidates", fontsize=12)
    _save(fig, path)
    return Plot(path.name, path, "KLD distributions",
                "Per-token KL-divergence against the baseline, for every scored token of the leading "
                "candidates; the tail (p99, p99.9) is what the composite score weighs most.")


# --------------------------------------------------------------------------------------------
def bub_grid(results: pd.DataFrame) -> pd.DataFrame:
    """Median, min, max and count of tokens/s per (n_batch, n_ubatch) over repeated trials."""
    df = pd.DataFrame({"n_batch": numeric(results, "n_batch"), "n_ubatch": numeric(results, "n_ubatch"),
                       "tokens_per_s": numeric(results, "tokens_per_s")}).dropna()
    if not len(df):
        return df
    g = df.groupby(["n_batch", "n_ubatch"])["tokens_per_s"].agg(["median", "min", "max", "count"]).reset_index()
    g[["n_batch", "n_ubatch"]] = g[["n_batch", "n_ubatch"]].astype(int)
    return g.sort_values("median", ascending=False).reset_index(drop=True)


def plot_bub_heatmap(folder: ResultsFolder, path: Path) -> Plot | None:
    if not folder.is_bub:
        return None
    g = bub_grid(folder.results)
    if not len(g):
        return None
    bs, us = sorted(g["n_batch"].unique()), sorted(g["n_ubatch"].unique())
    grid = np.full((len(bs), len(us)), np.nan)
    count = np.zeros_like(grid, dtype=int)
    for _, r in g.iterrows():
        grid[bs.index(r["n_batch"]), us.index(r["n_ubatch"])] = r["median"]
        count[bs.index(r["n_batch"]), us.index(r["n_ubatch"])] = r["count"]
    fig, ax = _figure(max(6.0, 1.3 * len(us) + 3), max(4.5, 0.8 * len(bs) + 2.5))
    ax.set_facecolor("0.92")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", origin="lower", aspect="auto")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("throughput (tokens/s, median of trials)")
    vmax = np.nanmax(grid)
    for i in range(len(bs)):
        for j in range(len(us)):
            if np.isnan(grid[i, j]):
                ax.text(j, i, "–", ha="center", va="center", color="0.5")
                continue
            txt = f"{grid[i, j]:,.0f}" + (f"\n(n={count[i, j]})" if count[i, j] > 1 else "")
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="black" if grid[i, j] > 0.6 * vmax else "white")
    bi, bj = np.unravel_index(np.nanargmax(grid), grid.shape)
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
    ax.set_xticks(range(len(us)), [str(u) for u in us])
    ax.set_yticks(range(len(bs)), [str(b) for b in bs])
    ax.set_xlabel("n_ubatch (tokens per physical micro-batch)")
    ax.set_ylabel("n_batch (tokens per logical batch)")
    ax.set_title(f"Prompt-processing throughput by batch x ubatch\nbest (red box): n_batch={bs[bi]}, "
                 f"n_ubatch={us[bj]}, {grid[bi, bj]:,.0f} tokens/s; grey: not measured", fontsize=11)
    _save(fig, path)
    return Plot(path.name, path, "Batch x ubatch throughput",
                "Tokens per second for each (n_batch, n_ubatch) tried; repeated trials of one setting are "
                "summarised by their median (n = number of trials).")


# --------------------------------------------------------------------------------------------
def _zfp_dims(df: pd.DataFrame) -> pd.Series:
    if "config.zfp_dims" in df:
        return numeric(df, "config.zfp_dims")
    if "recipe" in df:
        return df["recipe"].map(lambda r: _recipe_field(r, "zfp_dims")).astype(float)
    return pd.Series(math.nan, index=df.index)


def _recipe_field(recipe, name):
    try:
        v = json.loads(recipe).get(name)
        return math.nan if v is None else v
    except (TypeError, ValueError, AttributeError):
        return math.nan


def plot_zfp(folder: ResultsFolder, path: Path) -> Plot | None:
    df = folder.results
    snr = numeric(df, "zfp_snr_db")
    sel = snr.notna()
    if folder.is_bub or not sel.any():
        return None
    rate = numeric(df, "zfp_bits_per_weight").fillna(numeric(df, "bits_per_weight"))
    dims = _zfp_dims(df)
    mode = df["config.zfp_mode"].astype(str) if "config.zfp_mode" in df else pd.Series("", index=df.index)
    several_modes = mode[sel].nunique() > 1
    kld, se = numeric(df, "kld_mean"), numeric(df, "kld_mean_se")
    fig, (ax1, ax2) = _figure(12.5, 5.2, ncols=2)
    groups = pd.DataFrame({"dims": dims, "mode": mode})[sel].drop_duplicates().sort_values(["mode", "dims"])
    all_k = []
    for i, (_, grp) in enumerate(groups.iterrows()):
        g = sel & (mode == grp["mode"]) & ((dims == grp["dims"]) | (dims.isna() & pd.isna(grp["dims"])))
        order = rate[g].sort_values().index
        name = (f"{int(grp['dims'])}-D blocks" if pd.notna(grp["dims"]) else "ZFP") + \
            (f", {grp['mode']} mode" if several_modes else "")
        col = f"C{i % 10}"
        ax1.plot(rate[order], snr[order], "o-", color=col, label=name)
        ok = [j for j in order if np.isfinite(kld[j])]
        if ok:
            err = (Z95 * se[ok]).fillna(0)
            lower = np.minimum(err, kld[ok] * 0.95)  # keep the log axis finite
            ax2.errorbar(rate[ok], kld[ok], yerr=[lower, err], fmt="o-", color=col, capsize=3, label=name)
            all_k += list(kld[ok])
    ax1.set_ylabel("weight signal-to-noise ratio (dB, higher is better)")
    ax1.set_title("ZFP rate vs weight SNR", fontsize=11)
    ax2.set_ylabel("mean KLD vs baseline (nats/token, ±1.96 SE)")
    ax2.set_title("ZFP rate vs KL-divergence", fontsize=11)
    _log_if_wide(ax2, all_k, ratio=5)
    for ax in (ax1, ax2):
        ax.set_xlabel("ZFP rate (bits per compressed weight)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"ZFP compression: {int(sel.sum())} trials, one line per block dimensionality", fontsize=12)
    _save(fig, path)
    return Plot(path.name, path, "ZFP rate vs SNR and KLD",
                "Signal-to-noise ratio of the ZFP-compressed weights and the resulting mean KL-divergence "
                "of the model, by compressed bits per weight and ZFP block dimensionality.")


def allocation_notes(folder: ResultsFolder) -> dict | None:
    """What ``search=allocate`` recorded in sweep.json (None for other searches)."""
    notes = (folder.sweep.get("search") or {}).get("allocate") if isinstance(folder.sweep, dict) else None
    return notes if notes and notes.get("measured") else None


def plot_allocation(folder: ResultsFolder, path: Path) -> Plot | None:
    """The allocator's frontier (predicted and measured) against the stock quant types."""
    notes = allocation_notes(folder)
    if notes is None:
        return None
    fig, ax = _figure(8.5, 5.8)
    pred = notes.get("predicted_frontier") or []
    if pred:
        ax.plot([p["bits_per_weight"] for p in pred], [p["predicted_kld"] for p in pred], "-", color="C0", lw=1.2,
                alpha=0.7, label="predicted frontier (corrected additive model)")
    meas = [m for m in notes["measured"] if m.get("round", -1) >= 0 and np.isfinite(m.get("measured", np.nan))]
    if meas:
        ax.plot([m["bits_per_weight"] for m in meas], [m["measured"] for m in meas], "o", color="C0", ms=6,
                label=f"allocated mixes, measured ({len(meas)})")
    df = folder.results
    stock = df[df["recipe"].map(lambda r: not _recipe_field(r, "overrides"))] if "recipe" in df else df.iloc[:0]
    x, y = numeric(stock, "bits_per_weight"), numeric(stock, "kld_mean")
    ok = x.notna() & y.notna()
    if ok.any():
        ax.plot(x[ok], y[ok], "s", color="C3", ms=8, label="stock types")
        _annotate(ax, [(x[i], y[i], str(stock.at[i, "label"]), "C3") for i in stock.index[ok]])
    for rec in notes.get("recommendations") or []:
        ax.plot([rec["bits_per_weight"]], [rec["kld_mean"]], "*", ms=16, mfc="gold", mec="black", mew=1, zorder=5)
    for sc in notes.get("size_classes") or []:
        n_params = None
        if pred:
            n_params = 8.0 * pred[0]["bytes"] / pred[0]["bits_per_weight"]
        if n_params:
            ax.axvline(8.0 * sc["max_bytes"] / n_params, color="0.6", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("model size (bits per weight)")
    ax.set_ylabel("mean KLD (nats, lower is better)")
    ax.set_title("Allocated per-tensor mixes vs stock types\nstars: the recommendation per size class "
                 "(dotted: size class limits)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    sp = notes.get("spearman_predicted_vs_measured")
    return Plot(path.name, path, "Allocation frontier vs stock types",
                "The knapsack's predicted frontier of per-tensor mixes (line), the mixes measured for real "
                "(dots), the stock quant types (squares) and the recommended file per size class (stars)"
                + (f"; predicted vs measured rank correlation {sp:.2f}" if sp is not None and np.isfinite(sp) else "")
                + ".")


def language_table(folder: ResultsFolder) -> pd.DataFrame | None:
    """``languages.parquet`` (one row per candidate and language), when the sweep had several."""
    path = folder.root / "languages.parquet"
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    return df if len(df) and df["lang"].nunique() > 1 else None


def plot_languages(folder: ResultsFolder, path: Path) -> Plot | None:
    """Candidates x languages: each language's mean KLD relative to that language's best candidate."""
    df = language_table(folder)
    if df is None:
        return None
    table = df.pivot_table(index="label", columns="lang", values="kld_mean", aggfunc="first")
    table = table.loc[table.mean(axis=1).sort_values().index]
    rel = table / table.min(axis=0)
    fig, ax = _figure(3.2 + 1.1 * rel.shape[1], 1.4 + 0.38 * rel.shape[0])
    shade = np.log2(rel.to_numpy(dtype=float))
    dark = 0.5 * np.nanmax(shade) if np.isfinite(shade).any() else np.inf
    im = ax.imshow(shade, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(rel.shape[1]), rel.columns)
    ax.set_yticks(range(rel.shape[0]), [_short(x, 36) for x in rel.index])
    for i in range(rel.shape[0]):
        for j in range(rel.shape[1]):
            v = rel.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}x", ha="center", va="center", fontsize=8,
                        color="white" if shade[i, j] > dark else "black")
    fig.colorbar(im, ax=ax, label="log2(KLD / best)")
    ax.set_title("Mean KLD per language\nrelative to each language's best candidate", fontsize=10)
    _save(fig, path)
    worst = df.loc[df.groupby("label")["kld_mean"].idxmax()]
    hurt = worst.groupby("lang").size().sort_values(ascending=False)
    return Plot(path.name, path, "Languages: which language each candidate hurts most",
                "Each cell is a candidate's mean KLD on one language's evaluation chunks divided by the best "
                "candidate's on that language (1.00x: the best there). "
                + (f"The language hurt most often: {hurt.index[0]} ({hurt.iloc[0]} of {len(worst)} candidates)."
                   if len(hurt) else ""))


PLOTTERS = (("pareto.png", plot_pareto), ("chunk_curves.png", plot_chunk_curves),
            ("kld_distributions.png", plot_kld_distributions), ("bub_heatmap.png", plot_bub_heatmap),
            ("zfp.png", plot_zfp), ("allocation.png", plot_allocation), ("languages.png", plot_languages))


def make_plots(folder: ResultsFolder, out_dir: Path) -> list[Plot]:
    """Draw every plot whose data exists into ``out_dir``; remove stale ones of earlier runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, plotter in PLOTTERS:
        path = out_dir / name
        plot = plotter(folder, path)
        if plot is None:
            path.unlink(missing_ok=True)  # data gone since the last report: drop its old plot
        else:
            plots.append(plot)
    return plots
