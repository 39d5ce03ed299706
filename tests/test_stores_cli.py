"""The single-machine workflow on the real engine: logits -> bench -> stats / compare, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggufopt_ray.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "ggufopt_ray" / "data" / "builtin" / "en.txt"


def ggufopt(*args):
    return subprocess.run([sys.executable, "-m", "ggufopt_ray.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model):
    from ggufopt_ray.engine.quantize import quantize_model

    d = tmp_path_factory.mktemp("workflow")
    assert cli(["logits", str(tiny_model), "--text-file", str(TEXT), "--ctx", "128", "--threads", "1",
                "--output", str(d / "base")]) == 0
    q = {t: quantize_model(tiny_model, t, d / f"tiny-{t}.gguf", threads=1).path for t in ("Q8_0", "Q4_K_M")}
    return d, q


def _stats(path) -> dict:
    proc = ggufopt("stats", path, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_q8_0_is_closer_than_q4_k_m(work):
    d, q = work
    for t in q:
        assert cli(["bench", q[t], "--baseline", str(d / "base"), "--output", str(d / f"res-{t}"),
                    "--to-chunk", "5", "--threads", "1"]) == 0
    s8, s4 = _stats(d / "res-Q8_0")["overall"], _stats(d / "res-Q4_K_M")["overall"]
    print(f"mean KLD Q8_0 {s8['kld_mean']:.6f} ± {s8['kld_mean_se']:.6f}, "
          f"Q4_K_M {s4['kld_mean']:.6f} ± {s4['kld_mean_se']:.6f}")
    assert s8["kld_mean"] + 3 * s8["kld_mean_se"] < s4["kld_mean"] - 3 * s4["kld_mean_se"]
    assert s8["same_top"] > s4["same_top"]


def test_bench_resumes_from_its_results_store(work, capsys):
    d, q = work
    out = d / "res-resume"
    assert cli(["bench", q["Q8_0"], "--baseline", str(d / "base"), "--output", str(out), "--to-chunk", "2",
                "--threads", "1"]) == 0
    first = sorted(p.name for p in out.glob("chunk_*.h5"))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk_*.h5")}
    assert cli(["bench", q["Q8_0"], "--baseline", str(d / "base"), "--output", str(out), "--to-chunk", "4",
                "--threads", "1"]) == 0
    assert len(first) == 3 and len(list(out.glob("chunk_*.h5"))) == 5
    for name, ns in stamps.items():
        assert (out / name).stat().st_mtime_ns == ns  # committed chunks were not recomputed


def test_bounded_disk_keeps_only_the_last_candidate_chunks(work):
    d, q = work
    cs = d / "cand-store"
    assert cli(["bench", q["Q4_K_M"], "--baseline", str(d / "base"), "--output", str(d / "res-bounded"),
                "--candidate-store", str(cs), "--keep", "2", "--to-chunk", "5", "--threads", "1"]) == 0
    assert sorted(int(p.stem.split("_")[1]) for p in cs.glob("chunk_*.h5")) == [4, 5]
    assert len(list((d / "res-bounded").glob("chunk_*.h5"))) == 6  # results of every chunk are kept


def test_compare_two_stores_equals_bench(work, tiny_model):
    d, q = work
    assert cli(["logits", q["Q4_K_M"], "--text-file", str(TEXT), "--ctx", "128", "--threads", "1", "--encoding",
                "exact", "--output", str(d / "cand-exact"), "--to", "3"]) == 0
    assert cli(["compare", str(d / "base"), str(d / "cand-exact"), "--output", str(d / "res-compare"),
                "--to", "3"]) == 0
    assert cli(["bench", q["Q4_K_M"], "--baseline", str(d / "base"), "--output", str(d / "res-bench4"),
                "--to-chunk", "3", "--threads", "1"]) == 0
    a, b = _stats(d / "res-compare")["overall"], _stats(d / "res-bench4")["overall"]
    for key in ("kld_mean", "kld_median", "kld_p99", "same_top", "ln_ppl_ratio"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_mismatches_are_refused_with_one_line(work, tmp_path):
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    d, q = work
    other_vocab = write_synthetic_model(tmp_path / "v512.gguf", SynthSpec(seed=0, n_vocab=512))
    proc = ggufopt("bench", other_vocab, "--baseline", d / "base", "--output", tmp_path / "r")
    assert proc.returncode == 2 and "vocabulary" in proc.stderr and proc.stderr.count("\n") == 1
    proc = ggufopt("logits", q["Q8_0"], "--text-file", TEXT, "--ctx", "64", "--output", d / "base")
    assert proc.returncode == 2 and "cannot be mixed" in proc.stderr
    proc = ggufopt("stats", tmp_path / "nothing")
    assert proc.returncode == 2 and "not a results store" in proc.stderr
    proc = ggufopt("logits", q["Q8_0"], "--text-file", TEXT, "--ctx", "128", "--encoding", "zip",
                   "--output", tmp_path / "z")
    assert proc.returncode == 2 and "unknown baseline encoding" in proc.stderr
    assert not (tmp_path / "z").exists()


def _store_contents(root: Path) -> dict:
    import h5py

    out = {}
    for p in sorted(root.glob("*.h5")):
        with h5py.File(p, "r") as f:
            out[p.name] = ({k: f[k][()] for k in f.keys()}, dict(f.attrs))
    return out


def test_sigkill_mid_chunk_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    args = [sys.executable, "-m", "ggufopt_ray.cli", "logits", str(tiny_model), "--text-file", str(TEXT),
            "--ctx", "512", "--encoding", "exact", "--threads", "1", "--to", "11"]
    clean = tmp_path / "clean"
    assert subprocess.run(args + ["--output", str(clean)], capture_output=True, timeout=300).returncode == 0
    killed = tmp_path / "killed"
    mid_write = False
    for attempt in range(20):  # until a kill lands while a chunk file is being written
        proc = subprocess.Popen(args + ["--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            names = os.listdir(killed) if killed.exists() else []
            # Kill while a chunk file is being written, once a few chunks are committed.
            if any(n.endswith(".tmp") for n in names) and sum(n.startswith("chunk_") for n in names) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
        if killed.exists() and any(n.endswith(".tmp") for n in os.listdir(killed)):
            mid_write = True
            break
    assert mid_write, "no kill landed in the middle of a chunk write"
    committed = sorted(p.name for p in killed.glob("chunk_*.h5"))
    print(f"killed after {attempt + 1} attempt(s) with {len(committed)} chunks committed and one half-written")
    _store_contents(killed)  # every committed chunk is readable
    done = subprocess.run(args + ["--output", str(killed)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{12 - len(committed)} chunks computed" in done.stdout
    assert not any(n.endswith(".tmp") for n in os.listdir(killed))
    a, b = _store_contents(clean), _store_contents(killed)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name][0]:
            np.testing.assert_array_equal(a[name][0][key], b[name][0][key], err_msg=f"{name}/{key}")
        assert a[name][1] == b[name][1], name
