"""Fault tolerance of the sweep: a killed trial worker is retried, a killed driver resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import small_sweep_config

ROOT = Path(__file__).resolve().parents[1]


def _trial_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ImplicitFunc" in cmd:
            pids.append(int(entry.name))
    return pids


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_killed_trial_worker_is_retried_and_gives_one_row(ray_local, tmp_path):
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", types=["Q8_0", "Q4_0"])
    cfg.dataset.eval_chunks = 6
    cfg.cluster.max_failures = 2
    box = {}
    runner = threading.Thread(target=lambda: box.update(result=run_sweep(cfg, tmp_path / "out", log=lambda *a: None)))
    runner.start()
    killed = None
    events = tmp_path / "out" / "events.jsonl"
    deadline = time.monotonic() + 120
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        if events.exists():
            chunk_events = [e for e in _events(events) if e["event"] == "chunk"]
            if chunk_events:
                killed = chunk_events[0]["pid"]
                assert killed in _trial_worker_pids()
                os.kill(killed, signal.SIGKILL)  # a real crash of the process running the trial
        time.sleep(0.002)
    runner.join(300)
    assert killed is not None, "no trial was seen computing a chunk"
    result = box["result"]
    assert not result.errors, result.errors
    labels = sorted(r["label"] for r in result.rows)
    assert labels == ["Q4_0", "Q8_0"]  # exactly one row per trial
    for r in result.rows:
        assert r["chunks"] == 6 and r["stop_reason"] == "all_chunks"
    starts = [e["label"] for e in _events(tmp_path / "out" / "events.jsonl") if e["event"] == "trial_start"]
    print(f"killed pid {killed}; trial starts: {starts}")
    assert len(starts) >= 3, "the killed trial was started again"


def _terminated_in_saved_state(out: Path) -> int:
    """Trials Tune's latest saved experiment state records as finished."""
    states = sorted((out / "ray_results" / "sweep").glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        return states[-1].read_text().count('\\"status\\": \\"TERMINATED\\"')
    except OSError:
        return 0


KILL_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M"]


def _sweep_cmd(out: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "sweep.py"), f"output_dir={out}", f"cache_dir={cache}",
            "model.n_ctx=128", "model.n_batch=128", "model.n_ubatch=128", "dataset.eval_chunks=12",
            "dataset.calib_chunks=2", "metrics.early_stopping=false", "cluster.num_cpus=1",
            "cluster.dashboard=false", f"search.types=[{','.join(KILL_TYPES)}]"]


@pytest.mark.slow
def test_killed_driver_resumes_without_recomputing(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    # Tune snapshots its state at every step here (the default throttles to 2 s): with trials of
    # about a second, a 2 s lag let the whole sweep finish between "2 saved" and the kill.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    proc = subprocess.Popen(_sweep_cmd(out, cache), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    events = out / "events.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _terminated_in_saved_state(out) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    before = _events(events)
    done_before = {e["label"] for e in before if e["event"] == "trial_done"}
    saved_done = _terminated_in_saved_state(out)
    assert 2 <= saved_done <= len(done_before) < len(KILL_TYPES)

    second = subprocess.run(_sweep_cmd(out, cache), env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["resumed"] is True
    assert summary["baseline"]["computed"] == 0  # loaded from the store, not recomputed
    after = _events(events)[len(before):]
    restarted = [e["label"] for e in after if e["event"] == "trial_start"]
    print(f"finished before the kill: {sorted(done_before)}; started after resume: {restarted}")
    # Tune skips trials its saved state knows as finished; a trial that finished just before the
    # kill may start again, but it finds its candidate in the cache and its chunks in the store.
    rebuilt = [e["label"] for e in after if e["event"] == "candidate" and not e["cached"]]
    assert not done_before & set(rebuilt), "a finished trial's candidate was quantized again"
    assert len(set(restarted)) <= len(KILL_TYPES) - saved_done, "trials Tune had saved as finished ran again"
    recomputed = [(e["label"], e["chunk"]) for e in after if e["event"] == "chunk"]
    computed_before = {(e["label"], e["chunk"]) for e in before if e["event"] == "chunk"}
    assert not computed_before & set(recomputed), "a committed chunk was evaluated twice"
    import pandas as pd

    rows = pd.read_parquet(out / "results.parquet")
    assert sorted(rows["label"]) == sorted(KILL_TYPES)
