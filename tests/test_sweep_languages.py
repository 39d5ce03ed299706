"""Per-language results of a real sweep over files of three languages: languages.parquet equals
statistics computed directly from each language's per-token results, the table names the worst
language, and the report's heatmap renders in a real browser."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import small_sweep_config
from test_report import CHECK_SCRIPT, _browser, _chromium

BUILTIN = Path(__file__).resolve().parents[1] / "ggufopt_ray" / "data" / "builtin"
LANGS = ["en", "de", "code"]


@pytest.fixture(scope="module")
def language_sweep(ray_local, tmp_path_factory):
    from ggufopt_ray.sweep import run_sweep

    root = tmp_path_factory.mktemp("langs")
    for lang in LANGS:
        shutil.copy(BUILTIN / f"{lang}.txt", root / f"{lang}.txt")
    cfg = small_sweep_config(root / "cache", types=["Q8_0", "Q4_K_M", "Q4_0"])
    cfg.dataset.source, cfg.dataset.path, cfg.dataset.langs = "local", str(root / "{lang}.txt"), LANGS
    cfg.dataset.eval_chunks = 6
    cfg.report = True  # its heatmap is checked in a browser
    result = run_sweep(cfg, root / "out", log=lambda *a: None)
    return root / "out", result


@pytest.mark.slow
def test_language_statistics_equal_direct_computation(language_sweep):
    import h5py
    import pandas as pd

    out, result = language_sweep
    table = pd.read_parquet(out / "languages.parquet")
    assert sorted(table["lang"].unique()) == sorted(LANGS)
    for row in result.rows:
        store = Path(row["results_store"])
        with h5py.File(store / "header.h5", "r") as f:  # each chunk's language, as the store recorded it
            langs = json.loads(f.attrs["langs"])
        assert len(langs) == 6 and set(langs) == set(LANGS)
        per_lang: dict[str, list[np.ndarray]] = {}
        for i, lang in enumerate(langs):
            with h5py.File(store / f"chunk_{i:06d}.h5", "r") as f:
                per_lang.setdefault(lang, []).append(np.asarray(f["kld"], dtype=np.float64))
        mine = table[table["label"] == row["label"]].set_index("lang")
        worst = max(per_lang, key=lambda k: np.concatenate(per_lang[k]).mean())
        for lang, chunks in per_lang.items():
            v = np.concatenate(chunks)
            assert mine.at[lang, "kld_mean"] == pytest.approx(v.mean(), rel=1e-6)
            assert mine.at[lang, "kld_median"] == pytest.approx(np.median(v), rel=1e-6)
            assert mine.at[lang, "kld_p99"] == pytest.approx(np.percentile(v, 99), rel=1e-6)
            assert int(mine.at[lang, "n_chunks"]) == len(chunks)
        assert row["worst_language"] == worst
        assert row["worst_language_kld"] == pytest.approx(np.concatenate(per_lang[worst]).mean(), rel=1e-6)
        # pooled statistics are those of all chunks together, unchanged by the labels
        assert row["kld_mean"] == pytest.approx(np.concatenate([c for cs in per_lang.values() for c in cs]).mean(),
                                                rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium not found")
def test_language_heatmap_renders_in_headless_chromium(language_sweep, tmp_path):
    out, result = language_sweep
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="plot-languages"' in html and 'id="languages"' in html
    probe = out / "report-probe.html"
    probe.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    try:
        proc = _browser(_chromium(), tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="(\d+)"', re.search(r'<div id="render-check"([^>]*)>', proc.stdout).group(1)))
    n_plots = len(list((out / "plots").glob("*.png")))
    assert int(attrs["images"]) == n_plots and int(attrs["loaded"]) == n_plots, attrs
    assert len(re.findall(r"<tr>", proc.stdout.split('id="languages"')[1].split("</table>")[0])) == 3 * len(LANGS) + 1


@pytest.mark.slow
def test_stats_by_language_reads_the_labels_the_sweep_recorded(language_sweep):
    import subprocess
    import sys

    import pandas as pd

    out, result = language_sweep
    row = next(r for r in result.rows if r["label"] == "Q4_0")
    proc = subprocess.run([sys.executable, "-m", "ggufopt_ray.cli", "stats", row["results_store"], "--by-language",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = {r["lang"]: r for r in json.loads(proc.stdout)["languages"]}
    table = pd.read_parquet(out / "languages.parquet")
    for r in table[table["label"] == "Q4_0"].to_dict("records"):
        assert got[r["lang"]]["kld_mean"] == pytest.approx(r["kld_mean"], rel=1e-9)
        assert got[r["lang"]]["n_chunks"] == r["n_chunks"]
    assert json.loads(proc.stdout)["worst_language"] == row["worst_language"]
