"""Fault tolerance of the sweep: a killed trial worker is retried, a killed baseline worker is
restarted, a killed driver resumes — and in each case the numbers are those of an uninterrupted
run or of an independent float64 recomputation, not just the right labels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
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
    # and the retried trial's numbers are right: recomputed here from its store and from the models
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    references = _reference_logprobs(Path(summary["provenance"]["model"]), Path(summary["baseline"]["store"]))
    assert len(references["tokens"]) == 6
    for row in result.rows:
        per_token = _read_results_store(Path(row["results_store"]), 6)
        _assert_row_matches_per_token(row, per_token)
        _assert_per_token_matches_models(row, per_token, references)


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
            "cluster.dashboard=false", "report=false", f"search.types=[{','.join(KILL_TYPES)}]"]


@pytest.mark.slow
def test_killed_driver_resumes_without_recomputing(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    # Tune snapshots its state at every step here (the default throttles to 2 s): with trials of
    # about a second, a 2 s lag let the whole sweep finish between "2 saved" and the kill.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
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

    try:
        second = subprocess.run(_sweep_cmd(out, cache), env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as e:  # say where it stood, not just that it took too long
        tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (e.stdout, e.stderr))
        pytest.fail(f"the resumed sweep did not finish in 400 s; its output ends:\n{tail[-4000:]}")
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
    # Unless the kill cut Tune's saved state short: then the rerun set it aside (see the test below)
    # and every trial started again, computing nothing it had committed (checked next).
    if not list((out / "ray_results").glob("sweep.damaged-*")):
        assert len(set(restarted)) <= len(KILL_TYPES) - saved_done, "trials Tune had saved as finished ran again"
    recomputed = [(e["label"], e["chunk"]) for e in after if e["event"] == "chunk"]
    computed_before = {(e["label"], e["chunk"]) for e in before if e["event"] == "chunk"}
    assert not computed_before & set(recomputed), "a committed chunk was evaluated twice"
    import pandas as pd

    rows = pd.read_parquet(out / "results.parquet")
    assert sorted(rows["label"]) == sorted(KILL_TYPES)

    # Numbers, not just labels: every row (those finished before the kill and those resumed after
    # it) equals statistics recomputed here from its results store, and the store's per-token
    # values equal KL divergences recomputed here from both models' logits.
    resumed = set(restarted)
    assert resumed, "no trial ran after the resume"
    references = _reference_logprobs(Path(summary["provenance"]["model"]), Path(summary["baseline"]["store"]))
    assert len(references["tokens"]) == 12
    for row in rows.to_dict("records"):
        assert row["chunks"] == 12 and row["stop_reason"] == "all_chunks", row["label"]
        per_token = _read_results_store(Path(row["results_store"]), 12)
        _assert_row_matches_per_token(row, per_token)
        _assert_per_token_matches_models(row, per_token, references)
    print(f"numbers checked for {sorted(rows['label'])}; resumed: {sorted(resumed)}")


def test_a_damaged_tune_state_is_set_aside_and_nothing_is_computed_again(ray_local, tmp_path):
    """A driver killed while Tune copies its state can leave a file of it cut short (seen in CI: an
    empty basic-variant-state-*.json, after which Tune "restored" a searcher with no configs and
    ran one trial with an empty config). The rerun sets the damaged experiment aside, says so,
    and runs the trials again; they read every chunk back from their results stores."""
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", types=["Q8_0", "Q4_0"])
    first = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not first.errors and len(first.rows) == 2
    exp = tmp_path / "out" / "ray_results" / "sweep"
    state = sorted(exp.glob("basic-variant-state-*.json"))[-1]
    state.write_bytes(b"")
    events = tmp_path / "out" / "events.jsonl"
    n_before = len(_events(events))
    lines: list[str] = []
    second = run_sweep(cfg, tmp_path / "out", log=lines.append)
    assert not second.errors, second.errors
    assert second.resumed
    assert any("damaged" in line and state.name in line for line in lines), lines
    aside = list(exp.parent.glob("sweep.damaged-*"))
    assert len(aside) == 1 and (aside[0] / state.name).stat().st_size == 0
    after = _events(events)[n_before:]
    assert sorted(e["label"] for e in after if e["event"] == "trial_start") == ["Q4_0", "Q8_0"]
    assert not [e for e in after if e["event"] == "chunk"], "a committed chunk was evaluated again"
    assert not [e for e in after if e["event"] == "candidate" and not e["cached"]]
    old = {r["label"]: r for r in first.rows}
    for r in second.rows:
        for key in ("kld_mean", "kld_mean_se", "kld_p99", "same_top", "chunks"):
            assert r[key] == old[r["label"]][key], (r["label"], key)


SWEEP_CTX, SWEEP_FIRST = 128, 64  # n_ctx of both sweeps here (small_sweep_config, _sweep_cmd); first scored row


def _read_results_store(root: Path, n_chunks: int) -> list[dict]:
    """Per-token arrays of each committed chunk, read with h5py directly."""
    import h5py

    out = []
    for i in range(n_chunks):
        with h5py.File(root / f"chunk_{i:06d}.h5", "r") as f:
            out.append({k: np.asarray(f[k][()]) for k in ("kld", "same_top", "nll_base", "nll_cand")})
    return out


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _reference_logprobs(model: Path, baseline_store: Path) -> dict:
    """The baseline model's float64 log-probs of the scored rows of each chunk (tokens from the store)."""
    import h5py

    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings

    tokens, stored = [], []
    for path in sorted(baseline_store.glob("chunk_*.h5")):
        with h5py.File(path, "r") as f:
            tokens.append(np.asarray(f["tokens"][()]))
            stored.append(np.asarray(f["enc__logprobs"][()]))  # the float16 baseline log-probs
    settings = RuntimeSettings(n_ctx=SWEEP_CTX, n_batch=SWEEP_CTX, n_ubatch=SWEEP_CTX, n_threads=1)
    with LogitsEngine(model, settings) as engine:
        base = [_log_softmax64(engine.logits(t)[SWEEP_FIRST:-1]) for t in tokens]
    return {"tokens": tokens, "base": base, "float16": stored, "settings": settings}


def _percentile(sorted_values: np.ndarray, q: float) -> float:
    """Linear interpolation between order statistics at q*(n-1), as llama.cpp (written out here)."""
    h = q * (sorted_values.size - 1)
    i = int(np.floor(h))
    j = min(i + 1, sorted_values.size - 1)
    return float(sorted_values[i] + (h - i) * (sorted_values[j] - sorted_values[i]))


def _assert_row_matches_per_token(row: dict, per_token: list[dict]) -> None:
    k = np.concatenate([c["kld"] for c in per_token]).astype(np.float64)
    top = np.concatenate([c["same_top"] for c in per_token]).astype(np.float64)
    nb = np.concatenate([c["nll_base"] for c in per_token]).astype(np.float64)
    nc = np.concatenate([c["nll_cand"] for c in per_token]).astype(np.float64)
    n = k.size
    assert n == len(per_token) * (SWEEP_CTX - 1 - SWEEP_FIRST) and row["n_tokens"] == n, row["label"]
    v = np.sort(k)
    q = {f: _percentile(v, f) for f in (0.5, 0.9, 0.95, 0.99)}
    want = {
        "kld_mean": k.mean(), "kld_mean_se": k.std(ddof=1) / np.sqrt(n), "kld_median": q[0.5],
        "kld_p90": q[0.9], "kld_p99": q[0.99], "kld_max": v[-1],
        "composite": q[0.5] ** (1 / 3) * (q[0.99] + 4 * q[0.95] + 5 * q[0.9]) ** (2 / 3),
        "same_top": top.mean(), "ln_ppl_ratio": (nc - nb).mean(), "ppl_cand": np.exp(nc.mean()),
    }
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (row["label"], key)


def _assert_per_token_matches_models(row: dict, per_token: list[dict], ref: dict) -> None:
    from ggufopt_ray.engine import LogitsEngine

    with LogitsEngine(row["candidate_path"], ref["settings"]) as engine:
        for i, (tokens, base, stored, got) in enumerate(zip(ref["tokens"], ref["base"], ref["float16"], per_token)):
            cand = _log_softmax64(engine.logits(tokens)[SWEEP_FIRST:-1])
            target = tokens[SWEEP_FIRST + 1:]
            rows = np.arange(target.size)
            where = (row["label"], i)
            # The sweep keeps the baseline as float16 log-probs plus a cross-entropy correction per
            # row, which makes its KLD sum_i p~_i (log p_i - log q_i) with p~ = softmax(float16 row).
            np.testing.assert_allclose(stored, base, rtol=2.0 ** -11, atol=1e-6)  # this chunk's rows, in float16
            p16 = _log_softmax64(stored)
            kld16 = (np.exp(p16) * (base - cand)).sum(axis=1)
            np.testing.assert_allclose(got["kld"], kld16, rtol=2e-5, atol=1e-9, err_msg=str(where))
            # and that stays within a few percent of the exact KL divergence, chunk by chunk
            exact = (np.exp(base) * (base - cand)).sum(axis=1)
            assert got["kld"].mean() == pytest.approx(exact.mean(), rel=1e-2), where
            np.testing.assert_allclose(got["nll_cand"], -cand[rows, target], rtol=1e-5, err_msg=str(where))
            np.testing.assert_allclose(got["nll_base"], -base[rows, target], rtol=1e-5, err_msg=str(where))
            same = base.argmax(axis=1) == cand.argmax(axis=1)
            assert (got["same_top"] == same).mean() >= 0.98, where  # near-ties may round either way


def _logits_worker_pids() -> dict[int, bytes]:
    """pid -> command line of the processes hosting a LogitsWorker actor on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::LogitsWorker"):
            found[int(entry.name)] = cmd
    return found


@pytest.mark.slow
def test_killed_baseline_worker_is_restarted_and_the_payloads_are_unchanged(ray_local, tiny_model, tmp_path):
    """SIGKILL of a LogitsWorker while chunks are in flight: Ray restarts it (max_restarts=1),
    retries its tasks (max_task_retries=1), and the stage ends with every chunk committed and
    byte-identical to an uninterrupted pass."""
    from ggufopt_ray.config import ClusterConfig
    from ggufopt_ray.distributed.baseline import run_baseline
    from ggufopt_ray.engine import RuntimeSettings
    from ggufopt_ray.store.baseline import BaselineStore

    import ray

    n_ctx, first, n_chunks = 256, 128, 16
    settings = RuntimeSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1)
    rng = np.random.default_rng(17)
    chunks = [np.concatenate([[1], rng.integers(3, 1000, n_ctx - 1)]).astype(np.int32) for _ in range(n_chunks)]
    cluster = ClusterConfig(logits_workers=2, worker_cpus=1.0)
    header = {"model_fingerprint": "m", "vocab_fingerprint": "v", "corpus_fingerprint": "faults",
              "n_ctx": n_ctx, "n_vocab": 1024, "encoding": "float16", "encoding_params": {}, "first": first,
              "n_chunks": n_chunks}

    reference_store = BaselineStore.create_or_open(tmp_path / "uninterrupted", header)
    reference = run_baseline(reference_store, chunks, str(tiny_model), settings, "float16", first, cluster)
    assert reference.computed == n_chunks

    store = BaselineStore.create_or_open(tmp_path / "killed", header)
    old = set(_logits_worker_pids())  # the first pass's workers may still be dying
    killed: dict = {}

    def kill_one_worker(done: int, total: int) -> None:
        # run_baseline calls this after committing a chunk (``done`` of ``total``); on the first
        # call the other chunks are still queued or running on the two workers.
        if killed:
            return
        ours = {pid: cmd for pid, cmd in _logits_worker_pids().items() if pid not in old}
        busy = [pid for pid, cmd in ours.items() if b".baseline" in cmd]
        assert ours, "no LogitsWorker process of this pass was found"
        pid = (busy or sorted(ours))[0]
        killed.update(pid=pid, busy=bool(busy), committed=len(store.dir.committed()), done=done)
        os.kill(pid, signal.SIGKILL)

    box: dict = {}

    def stage() -> None:
        try:
            box["result"] = run_baseline(store, chunks, str(tiny_model), settings, "float16", first, cluster,
                                         progress=kill_one_worker)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["error"] = repr(exc)

    seen: set[int] = set()
    runner = threading.Thread(target=stage, daemon=True)
    runner.start()
    deadline = time.monotonic() + 240
    while runner.is_alive() and time.monotonic() < deadline:
        seen |= set(_logits_worker_pids()) - old
        time.sleep(0.01)
    runner.join(1)
    print(f"killed {killed}; LogitsWorker processes of the pass: {sorted(seen)}")
    assert not runner.is_alive(), f"run_baseline did not finish within 240 s after killing {killed}"
    assert "error" not in box, box.get("error")
    assert killed and killed["committed"] < n_chunks, "the worker was not killed mid-pass"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    assert len(seen) >= 3, f"the killed worker was not restarted (processes seen: {sorted(seen)})"

    result = box["result"]
    assert result.computed == n_chunks and result.loaded == 0
    assert store.dir.committed() == list(range(n_chunks))
    for i in range(n_chunks):
        want = reference_store.read_payload(i)
        got, from_ref = store.read_payload(i), ray.get(result.refs[i][0])
        assert sorted(got) == sorted(want) == sorted(from_ref)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"chunk {i} {key}")
            np.testing.assert_array_equal(from_ref[key], want[key], err_msg=f"chunk {i} {key} (object store)")
        np.testing.assert_array_equal(store.read_tokens(i), chunks[i])
