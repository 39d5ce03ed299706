"""The sweep report: one self-contained HTML page, a Markdown summary and PNG plots.

``write_report(results_dir)`` reads only the results folder (see ``report.folder``) and writes,
next to the results:

- ``plots/*.png``: the plots of ``report.plots`` (only those whose data exists);
- ``report.html``: the results table (best first, values with their uncertainty), the best
  candidate and the Pareto set highlighted, the plots, provenance and errors. The plots are
  embedded as base64 ``data:`` URIs, so the page is one file that can be copied, mailed or
  attached to a CI run and still shows everything; each figure also links its PNG file.
  The page has no external resources (no CDN, fonts or scripts from elsewhere); a few lines of
  inline JavaScript make the table sortable by clicking a header, and it reads fine without them.
- ``report.md``: the same summary and table in Markdown, linking the PNG files.

Every file is written to ``NAME.partial`` and renamed when complete, so a reader never sees half
a report; running it again regenerates everything from the folder.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ggufopt_ray.errors import UserError
from ggufopt_ray.report.folder import ResultsFolder, load_results_folder, numeric
from ggufopt_ray.report.format import DASH, finite, fmt_int, fmt_interval, fmt_mib, fmt_num, fmt_pm
from ggufopt_ray.report.plots import Plot, bub_grid, language_table, make_plots

PLOTS_DIR = "plots"


@dataclass
class Column:
    """One table column: header, cell text, value to sort by, and a tooltip saying what it is."""

    header: str
    text: Callable[[dict], str]
    sort: Callable[[dict], object]
    help: str = ""
    left: bool = False  # text column: left-aligned


def _v(row: dict, key: str) -> float:
    x = row.get(key)
    return float(x) if finite(x) else float("nan")


def _quality_columns(folder: ResultsFolder) -> list[Column]:
    conf = f"{100 * folder.confidence:.0f}%"
    cols = [
        Column("bits/weight", lambda r: f"{_v(r, 'bits_per_weight'):.3f}" if finite(r.get("bits_per_weight")) else DASH,
               lambda r: _v(r, "bits_per_weight"), "model size in bits per weight (all tensors)"),
        Column("size (MiB)", lambda r: fmt_mib(r.get("size_bytes")), lambda r: _v(r, "size_bytes"),
               "model file size"),
        Column("mean KLD ± SE", lambda r: fmt_pm(r.get("kld_mean"), r.get("kld_mean_se")),
               lambda r: _v(r, "kld_mean"), "mean per-token KL-divergence from the baseline (nats), ± standard error"),
        Column("median KLD", lambda r: fmt_num(r.get("kld_median")), lambda r: _v(r, "kld_median"),
               "median per-token KLD (nats)"),
        Column("KLD p99", lambda r: fmt_num(r.get("kld_p99")), lambda r: _v(r, "kld_p99"),
               "99th percentile of per-token KLD (nats)"),
        Column("KLD p99.9", lambda r: fmt_num(r.get("kld_p999")), lambda r: _v(r, "kld_p999"),
               "99.9th percentile of per-token KLD (nats)"),
        Column(f"composite [{conf} CI]",
               lambda r: fmt_interval(r.get("composite"), r.get("composite_lo"), r.get("composite_hi")),
               lambda r: _v(r, "composite"),
               f"median^(1/3)·(p99 + 4·p95 + 5·p90)^(2/3), lower is better; {conf} bootstrap interval over chunks"),
        Column("same top (%)", lambda r: fmt_pm(100 * _v(r, "same_top"), 100 * _v(r, "same_top_se")),
               lambda r: _v(r, "same_top"), "share of tokens where candidate and baseline agree on the top token"),
        Column("RMS Δp (%)", lambda r: fmt_pm(100 * _v(r, "delta_p_rms"), 100 * _v(r, "delta_p_rms_se")),
               lambda r: _v(r, "delta_p_rms"), "RMS change of the probability of the correct token"),
        Column("ln PPL ratio ± SE", lambda r: fmt_pm(r.get("ln_ppl_ratio"), r.get("ln_ppl_ratio_se")),
               lambda r: _v(r, "ln_ppl_ratio"), "ln(PPL(candidate) / PPL(baseline))"),
    ]
    res = folder.results
    if numeric(res, "zfp_snr_db").notna().any():
        cols += [
            Column("ZFP rate (bits)", lambda r: fmt_num(r.get("zfp_bits_per_weight")),
                   lambda r: _v(r, "zfp_bits_per_weight"), "bits per weight of the ZFP-compressed tensors"),
            Column("ZFP SNR (dB)", lambda r: f"{_v(r, 'zfp_snr_db'):.2f}" if finite(r.get("zfp_snr_db")) else DASH,
                   lambda r: _v(r, "zfp_snr_db"), "signal-to-noise ratio of the compressed weights"),
        ]
    cols += [
        Column("chunks", lambda r: fmt_int(r.get("chunks")), lambda r: _v(r, "chunks"), "chunks evaluated"),
        Column("stop", lambda r: str(r.get("stop_reason") or DASH), lambda r: str(r.get("stop_reason") or ""),
               "why the trial stopped", left=True),
    ]
    return cols


def _bub_columns(folder: ResultsFolder) -> list[Column]:
    return [
        Column("n_batch", lambda r: fmt_int(r.get("n_batch")), lambda r: _v(r, "n_batch"), "logical batch size"),
        Column("n_ubatch", lambda r: fmt_int(r.get("n_ubatch")), lambda r: _v(r, "n_ubatch"), "physical micro-batch"),
        Column("tokens/s", lambda r: f"{_v(r, 'tokens_per_s'):,.0f}" if finite(r.get("tokens_per_s")) else DASH,
               lambda r: _v(r, "tokens_per_s"), "prompt-processing throughput"),
        Column("chunks", lambda r: fmt_int(r.get("chunks")), lambda r: _v(r, "chunks"), "chunks timed"),
        Column("stop", lambda r: str(r.get("stop_reason") or DASH), lambda r: str(r.get("stop_reason") or ""),
               "why the trial stopped", left=True),
        Column("trial", lambda r: str(r.get("trial_id")), lambda r: str(r.get("trial_id")), "Ray Tune trial id",
               left=True),
    ]


def _columns(folder: ResultsFolder) -> list[Column]:
    return _bub_columns(folder) if folder.is_bub else _quality_columns(folder)


def _clean(v):
    """NaN/NaT/None as None; everything else unchanged."""
    if v is None or isinstance(v, (str, list, dict)):
        return v
    try:
        return None if pd.isna(v) else v
    except (TypeError, ValueError):  # array-like cells
        return v


def _records(folder: ResultsFolder) -> list[dict]:
    return [{k: _clean(v) for k, v in r.items()} for r in folder.results.to_dict("records")]


def _best_summary(folder: ResultsFolder) -> list[tuple[str, str]]:
    """(name, value) pairs describing the best candidate."""
    b = folder.best
    if not b:
        return []
    if folder.is_bub:
        return [("setting", str(b.get("label"))), ("n_batch", fmt_int(b.get("n_batch"))),
                ("n_ubatch", fmt_int(b.get("n_ubatch"))),
                ("tokens/s", f"{_v(b, 'tokens_per_s'):,.0f}" if finite(b.get("tokens_per_s")) else DASH)]
    conf = f"{100 * folder.confidence:.0f}%"
    return [("candidate", str(b.get("label"))),
            ("bits/weight", f"{_v(b, 'bits_per_weight'):.3f}" if finite(b.get("bits_per_weight")) else DASH),
            ("size", f"{fmt_mib(b.get('size_bytes'))} MiB"),
            (f"composite [{conf} CI]", fmt_interval(b.get("composite"), b.get("composite_lo"), b.get("composite_hi"))),
            ("mean KLD ± SE", fmt_pm(b.get("kld_mean"), b.get("kld_mean_se"))),
            ("same top", fmt_pm(100 * _v(b, "same_top"), 100 * _v(b, "same_top_se"), "%")),
            ("objective", fmt_num(b.get("objective"))),
            ("chunks", fmt_int(b.get("chunks")))] + _search_findings(folder)


def _search_findings(folder: ResultsFolder) -> list[tuple[str, str]]:
    """What the search decided beyond the best row: the imatrix size, the size budget."""
    import json

    items = []
    best_file = folder.root / "best.json"
    growth = json.loads(best_file.read_text()).get("imatrix_growth") if best_file.is_file() else None
    if growth and growth.get("recommended_imatrix_chunks") is not None:
        text = f"{growth['recommended_imatrix_chunks']} calibration chunks"
        if growth.get("gain_over_no_imatrix") is not None:
            g = growth["gain_over_no_imatrix"]
            text += f" ({100 * abs(g):.1f}% {'better' if g >= 0 else 'worse'} composite than no imatrix)"
        items.append(("recommended imatrix", text))
    budget = folder.sweep.get("size_budget")
    if budget:
        items.append(("size budget", f"{budget['target_bpw']:.3f} bpw ({budget['base_type']} alone: "
                                     f"{budget['base_bpw']:.3f})"))
    return items


def _language_rows(folder: ResultsFolder) -> tuple[list[str], list[list[str]]] | None:
    """The per-language table: candidate, language, chunks, mean KLD ± SE, p99, same top, ln PPL ratio."""
    df = language_table(folder)
    if df is None:
        return None
    head = ["candidate", "language", "chunks", "KLD mean ± SE", "p99", "same top", "ln PPL ratio ± SE"]
    body = []
    for r in df.sort_values(["label", "lang"]).to_dict("records"):
        body.append([str(r["label"]), str(r["lang"]), str(int(r["n_chunks"])),
                     fmt_pm(r.get("kld_mean"), r.get("kld_mean_chunk_se", r.get("kld_mean_se"))),
                     fmt_num(r.get("kld_p99"), 3, trim=False),
                     fmt_pm(100 * r["same_top"], 100 * r.get("same_top_se", float("nan"))) + "%",
                     fmt_pm(r.get("ln_ppl_ratio"), r.get("ln_ppl_ratio_se"))])
    return head, body


def _recommendations(folder: ResultsFolder) -> tuple[str, list[str]] | None:
    """search=allocate: the model-card table and the llama-quantize command per size class."""
    notes = (folder.sweep.get("search") or {}).get("allocate") if isinstance(folder.sweep, dict) else None
    if not notes or not notes.get("model_card"):
        return None
    commands = [f"# {r['size_class']}: {r['label']}\n{r['command']}" for r in notes.get("recommendations") or []]
    return notes["model_card"], commands


def _provenance(folder: ResultsFolder) -> list[tuple[str, str]]:
    from ggufopt_ray import __version__

    items = [(k, str(v)) for k, v in folder.provenance.items() if v is not None and v != ""]
    base = folder.sweep.get("baseline") or {}
    for key in ("store", "computed", "loaded", "seconds", "trials_seconds"):
        if key in base:
            items.append((f"baseline {key}", str(base[key])))
    for key in ("seconds", "resumed", "dashboard_url"):
        if folder.sweep.get(key) is not None:
            v = folder.sweep[key]
            items.append((f"sweep {key}", f"{v:.1f}" if isinstance(v, float) else str(v)))
    res = folder.results
    for col in ("imatrix_hash", "hostname", "node_ip"):  # constant per sweep in practice: show distinct values
        if col in res:
            vals = sorted({str(v) for v in res[col].dropna() if str(v)})
            if vals:
                items.append((col, ", ".join(vals[:8]) + (" …" if len(vals) > 8 else "")))
    items.append(("report by", f"ggufopt-ray {__version__}"))
    return items


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _kind_text(folder: ResultsFolder) -> str:
    if folder.is_bub:
        return "batch/ubatch throughput sweep"
    if numeric(folder.results, "zfp_snr_db").notna().any():
        return "quality sweep (KL-divergence vs baseline), with ZFP trials"
    return "quality sweep (KL-divergence vs baseline)"


# ------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;max-width:1500px;
padding:16px 24px;color:#1d1d1f;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#555}.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 16px;background:#f6f8fa;display:inline-block}
.card dl{display:grid;grid-template-columns:auto auto;gap:2px 18px;margin:0}.card dt{color:#555}.card dd{margin:0;font-weight:600}
table.results{border-collapse:collapse;font-size:13px;width:100%}
table.results th,table.results td{border-bottom:1px solid #e3e3e3;padding:4px 8px;text-align:right;white-space:nowrap}
table.results th{background:#f0f2f4;position:sticky;top:0;cursor:pointer;user-select:none}
table.results td.l,table.results th.l{text-align:left}
table.results tr.pareto td{background:#fff4f2}table.results tr.best td{background:#fff3c4;font-weight:600}
.badge{display:inline-block;font-size:11px;padding:0 5px;border-radius:8px;margin-left:5px;font-weight:600}
.badge.best{background:#f5c400;color:#000}.badge.pareto{background:#d93025;color:#fff}
.wrap{overflow-x:auto}figure{margin:18px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:13px;max-width:1100px}
table.kv{border-collapse:collapse;font-size:13px}table.kv td{padding:2px 12px 2px 0;vertical-align:top}
table.kv td:first-child{color:#555}code,pre{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
pre{background:#f6f8fa;padding:8px;overflow-x:auto}.errors{border:1px solid #d93025;background:#fdecea;padding:8px 14px;border-radius:6px}
"""

SORT_JS = """
document.querySelectorAll('table.results').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var b=t.tBodies[0],rows=Array.prototype.slice.call(b.rows),asc=th.dataset.dir!=='asc';
    t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir});th.dataset.dir=asc?'asc':'desc';
    rows.sort(function(x,y){var a=x.cells[i].dataset.v,c=y.cells[i].dataset.v,na=parseFloat(a),nc=parseFloat(c);
      if(!isNaN(na)&&!isNaN(nc))return asc?na-nc:nc-na;if(isNaN(na)!==isNaN(nc))return isNaN(na)?1:-1;
      return asc?String(a).localeCompare(c):String(c).localeCompare(a)});
    rows.forEach(function(r){b.appendChild(r)});});});});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _sort_attr(v) -> str:
    if isinstance(v, float):
        return "" if v != v else repr(v)
    return _e(v)


def _html_table(folder: ResultsFolder, records: list[dict]) -> str:
    cols = _columns(folder)
    pareto = set(folder.pareto_ids)
    head = ['<th class="l" title="rank in the report order (best first)">#</th>',
            f'<th class="l" title="{"setting" if folder.is_bub else "candidate"} label">'
            f'{"setting" if folder.is_bub else "candidate"}</th>']
    head += [f'<th{" class=l" if c.left else ""} title="{_e(c.help)}">{_e(c.header)}</th>' for c in cols]
    body = []
    for i, r in enumerate(records, 1):
        tid = str(r.get("trial_id"))
        classes = [c for c, on in (("best", tid == folder.best_id), ("pareto", tid in pareto)) if on]
        badges = ('<span class="badge best">best</span>' if tid == folder.best_id else "") + \
                 ('<span class="badge pareto">Pareto</span>' if tid in pareto else "")
        cells = [f'<td class="l" data-v="{i}">{i}</td>',
                 f'<td class="l" data-v="{_e(r.get("label"))}">{_e(r.get("label"))}{badges}</td>']
        cells += [f'<td{" class=l" if c.left else ""} data-v="{_sort_attr(c.sort(r))}">{_e(c.text(r))}</td>'
                  for c in cols]
        body.append(f'<tr class="{" ".join(classes)}" data-trial="{_e(tid)}">{"".join(cells)}</tr>')
    return (f'<div class="wrap"><table class="results" id="results"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _html_kv(items: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td><code>{_e(v)}</code></td></tr>" for k, v in items)
    return f'<table class="kv">{rows}</table>'


def _html_bub_grid(folder: ResultsFolder) -> str:
    g = bub_grid(folder.results)
    if not len(g) or len(g) == len(folder.results):
        return ""
    rows = "".join(f"<tr><td>{int(r['n_batch'])}</td><td>{int(r['n_ubatch'])}</td><td>{r['median']:,.0f}</td>"
                   f"<td>{r['min']:,.0f} – {r['max']:,.0f}</td><td>{int(r['count'])}</td></tr>" for _, r in g.iterrows())
    return ("<h3>Per setting (repeated trials combined)</h3><div class='wrap'><table class='results'><thead><tr>"
            "<th>n_batch</th><th>n_ubatch</th><th>median tokens/s</th><th>range</th><th>trials</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")


def _img_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(folder: ResultsFolder, plots: list[Plot], generated: str) -> str:
    records = _records(folder)
    prov = folder.provenance
    model = Path(str(prov.get("model", ""))).name or "unknown model"
    n_ok = len(folder.results) if folder.is_bub else int(numeric(folder.results, "composite").notna().sum())
    parts = [f"<h1>ggufopt-ray sweep report: {_e(model)}</h1>",
             f'<p class="sub">{_e(_kind_text(folder))} · {_count(len(records), "trial")} ({n_ok} with results) · '
             f'{_count(len(folder.errors), "error")} · generated {_e(generated)} from <code>{_e(folder.root)}</code></p>']
    if folder.errors:
        parts.append(f'<div class="errors"><b>{len(folder.errors)} trial(s) failed</b> (see Errors below)</div>')
    best = _best_summary(folder)
    parts.append("<h2>Best " + ("setting (highest throughput)" if folder.is_bub else "candidate (sweep objective)") + "</h2>")
    if best:
        dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in best)
        parts.append(f'<div class="card" id="best"><dl>{dl}</dl></div>')
    else:
        parts.append("<p>No trial produced a rankable result.</p>")
    if not folder.is_bub:
        by_id = {str(r.get("trial_id")): r for r in records}
        front = [by_id[t] for t in folder.pareto_ids if t in by_id]
        parts.append("<h2>Pareto set (smallest size for its quality)</h2>")
        if front:
            items = "".join(f"<li><b>{_e(r.get('label'))}</b>: {_v(r, 'bits_per_weight'):.3f} bits/weight, composite "
                            f"{_e(fmt_interval(r.get('composite'), r.get('composite_lo'), r.get('composite_hi')))}</li>"
                            for r in sorted(front, key=lambda r: _v(r, "bits_per_weight")))
            parts.append(f'<ul id="pareto">{items}</ul>')
        else:
            parts.append("<p>No candidate has both a size and a composite score.</p>")
    rec = _recommendations(folder)
    if rec:
        card, commands = rec
        parts.append("<h2>Recommended files per size class</h2>")
        parts.append(f'<pre id="model-card">{_e(card)}</pre>')
        parts.append('<pre id="recipes">' + _e("\n".join(commands)) + "</pre>")
    langs = _language_rows(folder)
    if langs:
        head, body = langs
        parts.append("<h2>Per language</h2>")
        parts.append('<table id="languages"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head)
                     + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                                                        for row in body) + "</tbody></table>")
    parts.append("<h2>Results</h2>")
    parts.append('<p class="sub">Best first (' + ("by tokens/s" if folder.is_bub else "by the sweep's objective; "
                 "unranked trials last") + "). Click a header to sort. Highlighted: "
                 '<span class="badge best">best</span>' + ("" if folder.is_bub else
                 ' and the <span class="badge pareto">Pareto</span> set') + ".</p>")
    parts.append(_html_table(folder, records))
    if folder.is_bub:
        parts.append(_html_bub_grid(folder))
    if plots:
        parts.append("<h2>Plots</h2>")
        for p in plots:
            parts.append(f'<figure id="plot-{_e(p.path.stem)}"><img src="{_img_data_uri(p.path)}" alt="{_e(p.title)}">'
                         f'<figcaption><b>{_e(p.title)}.</b> {_e(p.caption)} '
                         f'(<a href="{PLOTS_DIR}/{_e(p.name)}">{PLOTS_DIR}/{_e(p.name)}</a>)</figcaption></figure>')
    parts.append("<h2>Provenance</h2>")
    parts.append(_html_kv(_provenance(folder)))
    if folder.hydra_overrides:
        parts.append(f"<details><summary>Hydra overrides</summary><pre>{_e(folder.hydra_overrides)}</pre></details>")
    if folder.hydra_config:
        parts.append(f"<details><summary>Resolved configuration</summary><pre>{_e(folder.hydra_config)}</pre></details>")
    parts.append("<h2>Errors</h2>")
    if folder.errors:
        parts.append('<div class="errors" id="errors"><ul>' + "".join(f"<li><pre>{_e(e)}</pre></li>" for e in folder.errors)
                     + "</ul></div>")
    else:
        parts.append('<p id="errors">None: every trial ran to a result.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>ggufopt-ray report: {_e(model)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + f"\n<script>{SORT_JS}</script>\n</body></html>\n")


# --------------------------------------------------------------------------------- Markdown
def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(folder: ResultsFolder, plots: list[Plot], generated: str) -> str:
    records = _records(folder)
    prov = folder.provenance
    model = Path(str(prov.get("model", ""))).name or "unknown model"
    pareto = set(folder.pareto_ids)
    out = [f"# ggufopt-ray sweep report: {model}", "",
           f"{_kind_text(folder)}; {_count(len(records), 'trial')}, {_count(len(folder.errors), 'error')}; "
           f"generated {generated}.", ""]
    best = _best_summary(folder)
    out += ["## Best " + ("setting" if folder.is_bub else "candidate"), ""]
    out += [f"- {k}: **{_md(v)}**" for k, v in best] if best else ["No trial produced a rankable result."]
    if not folder.is_bub:
        by_id = {str(r.get("trial_id")): r for r in records}
        front = sorted((by_id[t] for t in folder.pareto_ids if t in by_id), key=lambda r: _v(r, "bits_per_weight"))
        out += ["", "## Pareto set", ""]
        out += [f"- {_md(r.get('label'))}: {_v(r, 'bits_per_weight'):.3f} bits/weight, composite "
                f"{fmt_interval(r.get('composite'), r.get('composite_lo'), r.get('composite_hi'))}" for r in front] \
            or ["(none)"]
    rec = _recommendations(folder)
    if rec:
        card, commands = rec
        out += ["", "## Recommended files per size class", "", card, "", "```"] + commands + ["```"]
    cols = _columns(folder)
    out += ["", "## Results", "", "Best first; **bold**: best, (P): on the Pareto front.", ""]
    out.append("| # | " + ("setting" if folder.is_bub else "candidate") + " | "
               + " | ".join(_md(c.header) for c in cols) + " |")
    out.append("|---:|---|" + "|".join("---" if c.left else "---:" for c in cols) + "|")
    for i, r in enumerate(records, 1):
        tid = str(r.get("trial_id"))
        name = _md(r.get("label")) + (" (P)" if tid in pareto else "")
        if tid == folder.best_id:
            name = f"**{name}**"
        out.append(f"| {i} | {name} | " + " | ".join(_md(c.text(r)) for c in cols) + " |")
    if plots:
        out += ["", "## Plots", ""]
        for p in plots:
            out += [f"### {p.title}", "", f"![{p.title}]({PLOTS_DIR}/{p.name})", "", p.caption, ""]
    out += ["", "## Provenance", ""] + [f"- {k}: `{_md(v)}`" for k, v in _provenance(folder)]
    out += ["", "## Errors", ""]
    out += [f"- `{_md(e)}`" for e in folder.errors] if folder.errors else ["None."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ entry
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(results_dir: str | Path) -> Path:
    """Regenerate ``report.html``, ``report.md`` and ``plots/*.png`` from a results folder alone.

    Returns the path of ``report.html``. Raises ``UserError`` when the folder is missing or holds
    no ``results.parquet``.
    """
    folder = load_results_folder(results_dir)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = folder.root / "report.html"
    try:
        plots = make_plots(folder, folder.root / PLOTS_DIR)
        _write_atomic(folder.root / "report.md", render_markdown(folder, plots, generated))
        _write_atomic(out, render_html(folder, plots, generated))
    except PermissionError as exc:
        raise UserError(f"cannot write the report into {folder.root} ({exc.strerror}); copy the folder somewhere "
                        f"writable and run it there") from None
    return out

