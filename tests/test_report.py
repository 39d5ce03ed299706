"""The sweep report: plots, HTML page and Markdown summary regenerated from a results folder alone.

Results folders are synthesised here with pandas in the layout ``tables.finalize_results`` writes
(quality sweep with every optional file, ZFP sweep without tokens/pareto/best files, bub sweep),
so these tests need neither Ray nor a model. The page is also rendered in a real headless browser
(Debian's ``chromium``): the table rows must be in the DOM, every image must have decoded, and
the screenshot must show the page's highlight colours.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ggufopt_ray.errors import UserError
from ggufopt_ray.report.format import fmt_interval, fmt_num, fmt_pm
from ggufopt_ray.report.html import write_report

PROV = {"model": "/models/tiny-f32.gguf", "model_fingerprint": "b6d64fbd1df9b23d", "vocab_fingerprint": "38d602624a5d0c64",
        "corpus_fingerprint": "3b6251a9c0ab91bb", "baseline_id": "af9aa90610492aeb", "encoding": "exact",
        "n_ctx": 128, "n_batch": 128, "n_ubatch": 128, "seed": 0, "llama_cpp_python": "0.3.36"}
ODD_LABEL = "mix<b>&co"  # must come out escaped, never as markup


def _composite(v):
    q = np.percentile(v, [50, 90, 95, 99])
    return float(q[0] ** (1 / 3) * (q[3] + 4 * q[2] + 5 * q[1]) ** (2 / 3))


def _quality_row(label, bpw, scale, rng, trial_id, n_chunks=4, tokens_per_chunk=64, extra=None):
    """One result row from synthetic per-token KLD values; returns (row, tokens, chunk rows)."""
    chunks = [rng.lognormal(np.log(scale), 1.0, tokens_per_chunk) for _ in range(n_chunks)]
    chunks[0][:2] = [0.0, -1e-9]  # exact zeros and float noise happen in real runs
    tokens, history = [], []
    for i in range(1, n_chunks + 1):
        v = np.concatenate(chunks[:i])
        comp = _composite(v)
        history.append({"trial_id": trial_id, "label": label, "chunks": i, "kld_mean": v.mean(),
                        "kld_mean_se": v.std(ddof=1) / math.sqrt(len(v)), "composite": comp,
                        "composite_lo": comp * 0.9 if i > 1 else math.nan, "composite_hi": comp * 1.1 if i > 1 else math.nan})
    for i, c in enumerate(chunks):
        tokens += [{"label": label, "chunk": i, "kld": float(x)} for x in c]
    v = np.concatenate(chunks)
    comp = _composite(v)
    row = {"label": label, "trial_id": trial_id, "bits_per_weight": bpw, "size_bytes": int(bpw * 2**20 / 8 * 2),
           "kld_mean": v.mean(), "kld_mean_se": v.std(ddof=1) / math.sqrt(len(v)), "kld_median": np.median(v),
           "kld_p90": np.percentile(v, 90), "kld_p95": np.percentile(v, 95), "kld_p99": np.percentile(v, 99),
           "kld_p999": np.percentile(v, 99.9), "kld_min": v.min(), "kld_max": v.max(), "composite": comp,
           "composite_lo": comp * 0.9, "composite_hi": comp * 1.1, "confidence": 0.95, "same_top": 0.9, "same_top_se": 0.01,
           "delta_p_rms": 0.02, "delta_p_rms_se": 0.002, "ppl_base": 20.0, "ppl_cand": 20.5,
           "ln_ppl_ratio": 0.0247, "ln_ppl_ratio_se": 0.003, "chunks": n_chunks, "stop_reason": "all_chunks",
           "objective": comp, "recipe": json.dumps({"kind": "quant"}), **(extra or {})}
    row.update({f"prov.{k}": v for k, v in PROV.items()})
    return row, tokens, history


def _write(df: pd.DataFrame, root: Path, name: str):
    df.to_parquet(root / f"{name}.parquet", index=False)


def _pareto(rows):
    """Brute force: a row is on the front when no other row is at least as small and strictly better."""
    ok = [r for r in rows if math.isfinite(r.get("composite", math.nan))]
    return {r["trial_id"] for r in ok
            if not any(o is not r and o["bits_per_weight"] <= r["bits_per_weight"] and o["composite"] < r["composite"]
                       for o in ok)}


@pytest.fixture(scope="module")
def quality_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    rng = np.random.default_rng(0)
    specs = [("Q8_0", 8.5, 1e-3), ("Q6_K", 6.6, 8e-3), ("Q5_K_M", 5.7, 2e-2), ("Q4_K_M", 4.9, 8e-2),
             ("Q4_0", 4.8, 1.5e-1), (ODD_LABEL, 5.9, 5e-2), ("Q3_K_S", 3.5, 4e-1)]
    rows, tokens, history = [], [], []
    for i, (label, bpw, scale) in enumerate(specs):
        r, t, h = _quality_row(label, bpw, scale, rng, f"t{i:03d}")
        rows.append(r), tokens.extend(t), history.extend(h)
    rows.append({"label": "F16-huge", "trial_id": "t099", "bits_per_weight": 16.0, "size_bytes": 4 * 2**20,
                 "chunks": 0, "stop_reason": "over_size_budget", "objective": math.inf,
                 **{f"prov.{k}": v for k, v in PROV.items()}})
    _write(pd.DataFrame(rows), root, "results")
    _write(pd.DataFrame(history), root, "chunks")
    _write(pd.DataFrame(tokens).astype({"kld": "float32"}), root, "tokens")
    front = _pareto(rows)
    _write(pd.DataFrame([r for r in rows if r["trial_id"] in front]), root, "pareto")
    best = min((r for r in rows if math.isfinite(r["objective"])), key=lambda r: r["objective"])
    (root / "best.json").write_text(json.dumps(best, default=str))
    (root / "sweep.json").write_text(json.dumps({"provenance": PROV, "baseline": {"baseline_id": PROV["baseline_id"]},
                                                 "errors": ["trial t050 (IQ1_S): quantize failed: needs an imatrix"],
                                                 "seconds": 12.5}))
    (root / ".hydra").mkdir()
    (root / ".hydra" / "overrides.yaml").write_text("- search=quant_types\n")
    return {"root": root, "rows": rows, "front": front, "best": best["trial_id"], "report": write_report(root)}


@pytest.fixture(scope="module")
def zfp_dir(tmp_path_factory):
    """ZFP sweep: no tokens.parquet, pareto.parquet, best.json or sweep.json (all recomputed or left out)."""
    root = tmp_path_factory.mktemp("zfp")
    rng = np.random.default_rng(1)
    rows, history = [], []
    for rate in (4, 8, 12):
        for dims in (1, 2, 3):
            snr = 6.0 * rate - 12 + 3 * dims
            r, _, h = _quality_row(f"zfp-rate{rate}-d{dims}", rate + 0.015, 10 ** (-snr / 10), rng,
                                   f"z{rate:02d}{dims}", extra={"config.zfp_mode": "rate", "config.zfp_value": float(rate),
                                                                "config.zfp_dims": dims, "zfp_bits_per_weight": float(rate),
                                                                "zfp_snr_db": snr, "zfp_rmse": 10 ** (-snr / 20)})
            rows.append(r), history.extend(h)
    _write(pd.DataFrame(rows), root, "results")
    _write(pd.DataFrame(history), root, "chunks")
    return {"root": root, "rows": rows, "report": write_report(root)}


@pytest.fixture(scope="module")
def bub_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bub")
    rows, history = [], []
    speed = {(32, 32): [900.0, 950.0], (64, 32): [1200.0], (64, 64): [1500.0, 1450.0, 1480.0], (128, 64): [1400.0],
             (128, 128): [1300.0]}
    n = 0
    for (b, u), values in speed.items():
        for tps in values:
            tid = f"b{n:03d}"
            n += 1
            rows.append({"label": f"b{b}-u{u}", "n_batch": b, "n_ubatch": u, "tokens_per_s": tps, "chunks": 4,
                         "objective": -tps, "stop_reason": "all_chunks", "trial_id": tid,
                         **{f"prov.{k}": v for k, v in PROV.items()}})
            history += [{"label": f"b{b}-u{u}", "trial_id": tid, "n_batch": b, "n_ubatch": u, "tokens_per_s": tps,
                         "chunks": i} for i in range(1, 5)]
    _write(pd.DataFrame(rows), root, "results")
    _write(pd.DataFrame(history), root, "chunks")
    (root / "best.json").write_text(json.dumps(max(rows, key=lambda r: r["tokens_per_s"])))
    (root / "sweep.json").write_text(json.dumps({"provenance": PROV, "errors": []}))
    return {"root": root, "rows": rows, "report": write_report(root)}


# ------------------------------------------------------------------------------------ helpers
class _Page(HTMLParser):
    """Rows of the results table (class, trial id, cell texts) and the page's images."""

    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self._table, self._cell, self._row = [], [], 0, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "results":
            self._table = 1
        elif tag == "tr" and self._table and "data-trial" in a:
            self._row = {"class": a.get("class", ""), "trial": a["data-trial"], "cells": []}
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.imgs.append(a)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = 0
        elif tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _page(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _assert_real_png(path: Path, min_size=(400, 300)):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_size[0] and im.height >= min_size[1], im.size
        a = np.asarray(im.convert("RGB"), dtype=np.int16)
    non_white = (a < 245).any(axis=2).mean()
    colours = len(np.unique(a.reshape(-1, 3)[::7], axis=0))
    assert 0.02 < non_white < 0.9, f"{path.name}: {non_white:.3f} of pixels drawn"
    assert colours > 30, f"{path.name}: only {colours} colours"


def _plots(root: Path) -> set[str]:
    return {p.name for p in (root / "plots").glob("*.png")}


# --------------------------------------------------------------------------------------- tests
def test_formatting_shows_the_digits_the_uncertainty_justifies():
    assert fmt_pm(0.001099413, 1.7617e-05) == "0.001099 ± 0.000018"
    assert fmt_pm(42.86, 1.04) == "42.9 ± 1.0"
    assert fmt_pm(1.7224e-05, 2.8e-07) == "(1.722 ± 0.028)e-5"
    assert fmt_pm(0.5, math.nan) == "0.5"
    assert fmt_pm(math.nan, 0.1) == "–"
    assert fmt_interval(0.007121898, 0.006567994, 0.007722515) == "0.00712 [0.00657, 0.00772]"
    assert fmt_interval(1.13e-4, 1.07e-4, 1.19e-4) == "1.130 [1.070, 1.190] e-4"
    assert fmt_num(16853.5) == "16,854" and fmt_num(None) == "–"
    assert fmt_num(3.9471e-5, 3) == "3.95e-5" and fmt_num(9.996e-5, 3, trim=False) == "1.00e-4"
    assert fmt_num(9.996e-5, 3) == "1e-4" and fmt_num(0.0023449, 3) == "0.00234"
    assert fmt_num(0.0010049, 3, trim=False) == "0.00100" and fmt_num(0.0010049, 3) == "0.001"
    assert fmt_num(1234.6) == "1235" and fmt_num(0.5) == "0.5" and fmt_num(-0.0) == "0"


def test_imatrix_growth_judges_real_sizes_against_no_imatrix():
    from ggufopt_ray.report.tables import imatrix_growth

    def rows(scores):
        return [{"config.imatrix_chunks": k, "composite": v} for k, v in scores.items()]

    # measured on the trained model (IQ4_XS): one chunk is worse than none, growth still pays
    g = imatrix_growth(rows({0: 0.01496, 1: 0.0188, 2: 0.01693, 4: 0.01579, 8: 0.01480}), 0.01)
    assert g["recommended_imatrix_chunks"] == 8 and [s["to"] for s in g["steps"]] == [2, 4, 8]
    assert g["gain_over_no_imatrix"] == pytest.approx((0.01496 - 0.01480) / 0.01496)
    g = imatrix_growth(rows({1: 1.0, 2: 0.9, 4: 0.895, 8: 0.5}), 0.01)  # 2 -> 4 gains 0.56%: stop
    assert g["recommended_imatrix_chunks"] == 2 and g["gain_over_no_imatrix"] is None
    assert imatrix_growth(rows({0: 1.0}), 0.01)["recommended_imatrix_chunks"] is None


def test_bub_table_has_one_line_per_setting():
    from ggufopt_ray.report.tables import format_results_table

    rows = [{"n_batch": 128, "n_ubatch": 64, "tokens_per_s": 8000.0}, {"n_batch": 32, "n_ubatch": 32, "tokens_per_s": 9000.0},
            {"n_batch": 128, "n_ubatch": 64, "tokens_per_s": 8600.0}, {"n_batch": 128, "n_ubatch": 64, "tokens_per_s": 8300.0}, {"n_batch": 64, "n_ubatch": 64, "tokens_per_s": 8100.0},
            {"n_batch": 64, "n_ubatch": 64, "tokens_per_s": 9700.0}]
    lines = format_results_table(rows, bub=True).splitlines()
    assert lines[2:] == ["| 32 | 32 | 9000.0 | 1 |", "| 64 | 64 | 8900.0 | 2 |", "| 128 | 64 | 8300.0 | 3 |"]


def test_terminal_table_keeps_small_klds_readable():
    """A good Q8_0 has KLD ~5e-5: fixed decimals ("0.00005 ± 0.00000") would hide it."""
    from ggufopt_ray.report.tables import format_results_table

    row = {"label": "Q8_0", "bits_per_weight": 8.507, "size_bytes": 7.7 * 2**20, "kld_mean": 5.137e-5,
           "kld_mean_se": 9.7e-7, "kld_median": 3.947e-5, "kld_p99": 2.34e-4, "composite": 4.06e-4,
           "composite_lo": 3.76e-4, "composite_hi": 4.40e-4, "same_top": 0.995, "same_top_se": 0.0011,
           "ln_ppl_ratio": -2e-5, "ln_ppl_ratio_se": 1.5e-4, "chunks": 15, "stop_reason": "precision_reached"}
    table = format_results_table([row, {**row, "label": "Q4_0", "kld_mean": math.nan}])
    lines = table.splitlines()
    assert len(lines) == 4 and all(ln.count("|") == lines[0].count("|") for ln in lines)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    by = dict(zip(header, cells))
    assert by["KLD mean ± SE"] == "(5.137 ± 0.097)e-5"
    assert by["median"] == "3.95e-5" and by["p99"] == "2.34e-4"
    assert by["composite [95% CI]"] == "4.06 [3.76, 4.40] e-4"
    assert by["same top"] == "99.50 ± 0.11%"
    assert dict(zip(header, [c.strip() for c in lines[3].strip("|").split("|")]))["KLD mean ± SE"] == "–"
    # the same candidate proposed twice is one line, the one that saw the most chunks
    twice = format_results_table([{**row, "chunks": 3}, {**row, "label": "Q6_K"}, row]).splitlines()
    assert len(twice) == 4 and "| Q8_0 (2 trials) |" in twice[2] and twice[2].rstrip().endswith("| 15 | precision_reached |")


def test_quality_report_files_plots_and_table(quality_dir):
    root, rows = quality_dir["root"], quality_dir["rows"]
    report = quality_dir["report"]
    assert report == root.resolve() / "report.html" and (root / "report.md").is_file()
    assert _plots(root) == {"pareto.png", "chunk_curves.png", "kld_distributions.png"}
    for name in _plots(root):
        _assert_real_png(root / "plots" / name)
    assert not list(root.rglob("*.partial"))

    page = _page(report)
    assert len(page.rows) == len(rows)
    assert page.rows[0]["trial"] == quality_dir["best"] and "best" in page.rows[0]["class"]
    assert {r["trial"] for r in page.rows if "pareto" in r["class"]} == quality_dir["front"]
    # best first by objective, the unrankable over-budget row last
    by_id = {r["trial_id"]: r for r in rows}
    objectives = [by_id[r["trial"]]["objective"] for r in page.rows]
    assert objectives[:-1] == sorted(objectives[:-1]) and page.rows[-1]["trial"] == "t099"
    # each row shows its own numbers, formatted from the results
    for prow in page.rows[:-1]:
        r = by_id[prow["trial"]]
        assert prow["cells"][1].startswith(r["label"])
        assert fmt_pm(r["kld_mean"], r["kld_mean_se"]) in prow["cells"]
        assert fmt_interval(r["composite"], r["composite_lo"], r["composite_hi"]) in prow["cells"]
    html_text = report.read_text(encoding="utf-8")
    assert "mix&lt;b&gt;&amp;co" in html_text and ODD_LABEL not in html_text
    for value in (PROV["model_fingerprint"], PROV["baseline_id"], PROV["llama_cpp_python"], "search=quant_types",
                  "needs an imatrix"):
        assert value in html_text
    assert "http://" not in html_text and "https://" not in html_text  # nothing fetched from elsewhere
    # images are embedded, byte-identical to the PNG files next to the page
    assert len(page.imgs) == 3
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in page.imgs}
    assert embedded == {(root / "plots" / n).read_bytes() for n in _plots(root)}

    md = (root / "report.md").read_text()
    assert "## Best candidate" in md and "## Pareto set" in md and "needs an imatrix" in md
    table = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == len(rows) and "**" in table[0]
    assert "mix<b>&co" in md  # Markdown keeps the label; only | is escaped there
    for name in _plots(root):
        assert f"(plots/{name})" in md


def test_zfp_report_recomputes_best_and_pareto_and_draws_rate_curves(zfp_dir):
    root, rows = zfp_dir["root"], zfp_dir["rows"]
    assert _plots(root) == {"pareto.png", "chunk_curves.png", "zfp.png"}  # no tokens.parquet: no distributions
    for name in _plots(root):
        _assert_real_png(root / "plots" / name)
    page = _page(zfp_dir["report"])
    assert len(page.rows) == len(rows)
    best = min(rows, key=lambda r: r["objective"])["trial_id"]
    assert page.rows[0]["trial"] == best and "best" in page.rows[0]["class"]
    assert {r["trial"] for r in page.rows if "pareto" in r["class"]} == _pareto(rows)
    text = zfp_dir["report"].read_text()
    assert "ZFP SNR (dB)" in text and "None: every trial ran" in text


def test_bub_report_has_heatmap_and_throughput_table(bub_dir):
    root, rows = bub_dir["root"], bub_dir["rows"]
    assert _plots(root) == {"bub_heatmap.png"}
    _assert_real_png(root / "plots" / "bub_heatmap.png")
    page = _page(bub_dir["report"])
    assert len(page.rows) == len(rows)
    speeds = [float(r["cells"][4].replace(",", "")) for r in page.rows]
    assert speeds == sorted((r["tokens_per_s"] for r in rows), reverse=True)
    assert "best" in page.rows[0]["class"] and not any("pareto" in r["class"] for r in page.rows)
    assert "Per setting" in bub_dir["report"].read_text()  # repeated settings are summarised


def test_regenerating_drops_plots_whose_data_is_gone(tmp_path, quality_dir):
    root = tmp_path / "copy"
    shutil.copytree(quality_dir["root"], root)
    (root / "tokens.parquet").unlink()
    (root / "chunks.parquet").unlink()
    write_report(root)
    assert _plots(root) == {"pareto.png"}
    assert len(_page(root / "report.html").imgs) == 1


def test_missing_folder_and_folder_without_results(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(UserError, match="no results.parquet"):
        write_report(tmp_path)


def _ggufopt(*args):
    return subprocess.run([sys.executable, "-m", "ggufopt_ray.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_report(tmp_path, bub_dir):
    root = tmp_path / "bub"
    shutil.copytree(bub_dir["root"], root)
    (root / "report.html").unlink()
    proc = _ggufopt("report", root, "--open-path-only")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{(root / 'report.html').resolve()}\n"
    assert (root / "report.html").is_file()
    proc = _ggufopt("report", root)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].endswith("report.html")
    for bad, needle in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no results.parquet")):
        if needle != "does not exist":
            bad.mkdir()
        proc = _ggufopt("report", bad)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert lines[0].startswith("ggufopt report: error:")


# ------------------------------------------------------------------------------ real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; });
  var m = document.createElement('div');
  m.id = 'render-check';
  m.setAttribute('data-images', imgs.length);
  m.setAttribute('data-loaded', ok.length);
  m.setAttribute('data-rows', document.querySelectorAll('#results tbody tr').length);
  m.setAttribute('data-table-height', Math.round(document.getElementById('results').getBoundingClientRect().height));
  document.body.appendChild(m);
});
</script>"""


def _browser(binary, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,2000"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="chromium not found: install Debian's chromium "
                    "(apt-get install -y --no-install-recommends chromium) to run the browser test")
@pytest.mark.parametrize("which", ["quality_dir", "bub_dir"])
def test_report_renders_in_headless_chromium(which, request, tmp_path):
    data = request.getfixturevalue(which)
    binary = _chromium()
    # the DOM after load, with a probe that records whether every image decoded and is laid out
    probe = data["report"].with_name("report-probe.html")
    probe.write_text(data["report"].read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                     encoding="utf-8")
    try:
        proc = _browser(binary, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    marker = re.search(r'<div id="render-check"([^>]*)>', proc.stdout)
    assert marker, "probe did not run: " + proc.stdout[-500:]
    attrs = dict(re.findall(r'data-([\w-]+)="(\d+)"', marker.group(1)))
    n_plots = len(_plots(data["root"]))
    assert int(attrs["images"]) == n_plots >= 1
    assert int(attrs["loaded"]) == n_plots, attrs
    assert int(attrs["rows"]) == len(data["rows"]) and int(attrs["table-height"]) > 20 * len(data["rows"])

    # the screenshot of the page as it is: not blank, and the best row's highlight is painted
    shot = tmp_path / "shot.png"
    proc = _browser(binary, tmp_path, f"--screenshot={shot}", data["report"].as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert a.shape[1] == 1280
    assert (a < 245).any(axis=2).mean() > 0.03  # text, table and plots drawn
    best_row = (np.abs(a - np.array([255, 243, 196])).sum(axis=2) <= 3).sum()  # #fff3c4, the best row
    assert best_row > 2000, best_row
