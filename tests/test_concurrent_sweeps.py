"""Two sweeps started at once on one cache: the second waits for the first's baseline pass and
candidate builds (file locks) instead of computing them again, and both report the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmd(out: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "sweep.py"), f"output_dir={out}", f"cache_dir={cache}",
            "model.n_ctx=128", "model.n_batch=128", "model.n_ubatch=128", "dataset.eval_chunks=4",
            "dataset.calib_chunks=1", "metrics.early_stopping=false", "cluster.num_cpus=1",
            "cluster.dashboard=false", "report=false", "search.types=[Q8_0,Q4_0]"]


@pytest.mark.slow
def test_two_sweeps_on_one_cache_share_the_baseline_and_candidates(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    procs = [subprocess.Popen(_cmd(tmp_path / f"out{k}", cache), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-3000:]
    summaries = [json.loads((tmp_path / f"out{k}" / "sweep.json").read_text()) for k in (0, 1)]
    computed = sorted(s["baseline"]["computed"] for s in summaries)
    assert computed == [0, 4], computed  # one pass computed every chunk, the other loaded them
    assert summaries[0]["baseline"]["baseline_id"] == summaries[1]["baseline"]["baseline_id"]
    builds: dict[str, int] = {}
    for k in (0, 1):
        for line in (tmp_path / f"out{k}" / "events.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "candidate" and not e["cached"]:
                builds[e["label"]] = builds.get(e["label"], 0) + 1
    assert builds and all(n == 1 for n in builds.values()), builds  # each candidate quantized once
    import pandas as pd

    a, b = (pd.read_parquet(tmp_path / f"out{k}" / "results.parquet").set_index("label") for k in (0, 1))
    for label in ("Q8_0", "Q4_0"):
        assert a.at[label, "kld_mean"] == pytest.approx(b.at[label, "kld_mean"], rel=1e-9)
