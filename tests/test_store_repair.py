"""Damaged stores are named and repaired, partial baselines are usable, and caches are shared safely.

A chunk file can be damaged after it was committed (a bad disk, a copy cut short): the store's
per-array checksums catch it, ``ggufopt logits`` reports and recomputes it, and the repaired store
holds exactly what an undisturbed run wrote. A damaged header is a one-line error naming the file.
Two processes that want the same candidate build it once: the second waits on the file lock.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggufopt_ray.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "ggufopt_ray" / "data" / "builtin" / "en.txt"


def _logits(model, out, *extra) -> int:
    return cli(["logits", str(model), "--text-file", str(TEXT), "--ctx", "64", "--threads", "1",
                "--to", "3", "-o", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, tiny_model):
    """An undisturbed baseline store of chunks 0..3."""
    out = tmp_path_factory.mktemp("repair") / "fresh"
    assert _logits(tiny_model, out) == 0
    return out


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _flip_a_payload_byte(path: Path) -> None:
    """Change one byte inside a payload array's data, leaving the HDF5 structure intact."""
    import h5py

    with h5py.File(path, "r") as f:
        name = next(k for k in f.keys() if k.startswith("enc__"))
        offset = f[name].id.get_offset()
        assert offset is not None
    raw = bytearray(path.read_bytes())
    raw[offset + 37] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_damaged_chunks_are_reported_and_recomputed_to_the_same_arrays(fresh, tiny_model, tmp_path, capsys):
    from ggufopt_ray.store.baseline import BaselineStore

    damaged = tmp_path / "damaged"
    shutil.copytree(fresh, damaged)
    garbage = damaged / "chunk_000001.h5"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    flipped = damaged / "chunk_000002.h5"
    _flip_a_payload_byte(flipped)
    capsys.readouterr()

    # Reading a damaged chunk names it (bench reads chunk 0 fine, then stops at chunk 1).
    rc = cli(["bench", str(tiny_model), "--baseline", str(damaged), "-o", str(tmp_path / "res"), "--threads", "1"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"{garbage} is damaged" in line and "ggufopt logits" in line, line

    # The next `ggufopt logits` reports both (the bit flip only by its checksum) and recomputes them.
    assert _logits(tiny_model, damaged) == 0
    out = capsys.readouterr()
    assert f"{garbage} was damaged" in out.err and f"{flipped} was damaged" in out.err, out.err
    assert "checksum mismatch" in out.err
    assert "2 chunks computed" in out.out, out.out
    a, b = BaselineStore.open(fresh), BaselineStore.open(damaged)
    for i in range(4):
        pa, pb = a.read_payload(i), b.read_payload(i)
        assert pa.keys() == pb.keys()
        for key in pa:
            np.testing.assert_array_equal(pa[key], pb[key])
        np.testing.assert_array_equal(a.read_tokens(i), b.read_tokens(i))
        # deterministic writes: the repaired file is the very file an undisturbed run wrote
        assert (fresh / f"chunk_{i:06d}.h5").read_bytes() == (damaged / f"chunk_{i:06d}.h5").read_bytes()
    assert _logits(tiny_model, damaged) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_header_is_one_line_naming_the_file(fresh, tiny_model, tmp_path, damage):
    store = tmp_path / "store"
    shutil.copytree(fresh, store)
    header = store / "header.h5"
    raw = header.read_bytes()
    header.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else bytes(reversed(raw)))
    for args in (["logits", tiny_model, "--text-file", TEXT, "--ctx", "64", "--to", "3", "-o", store],
                 ["bench", tiny_model, "--baseline", store, "-o", tmp_path / "res"],
                 ["kld-base", "export", store, "-o", tmp_path / "x.kld"]):
        proc = subprocess.run([sys.executable, "-m", "ggufopt_ray.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120)
        line = _one_error_line(proc.stderr)
        assert proc.returncode == 2 and f"{header} is damaged" in line and "--overwrite" in line, line
    assert not (tmp_path / "res").exists() and not (tmp_path / "x.kld").exists()
    # --overwrite is the way out it names
    assert _logits(tiny_model, store, "--overwrite") == 0


def test_bench_evaluates_the_chunks_a_partial_baseline_has(tiny_model, tmp_path, capsys):
    from ggufopt_ray.store.baseline import BaselineStore

    base = tmp_path / "base"
    assert cli(["logits", str(tiny_model), "--text-file", str(TEXT), "--ctx", "64", "--threads", "1",
                "--to", "1", "-o", str(base)]) == 0
    n = BaselineStore.open(base).n_chunks
    assert n > 2
    capsys.readouterr()
    assert cli(["bench", str(tiny_model), "--baseline", str(base), "-o", str(tmp_path / "res"),
                "--threads", "1"]) == 0
    assert f"chunks 0..1 of its {n}; evaluating those" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "res").glob("chunk_*.h5")) == ["chunk_000000.h5", "chunk_000001.h5"]
    rc = cli(["bench", str(tiny_model), "--baseline", str(base), "-o", str(tmp_path / "res2"), "--to-chunk", "2"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "0..1" in line and "--to 2" in line


def test_bench_refuses_a_candidate_from_another_model(fresh, tiny_model, tmp_path, capsys):
    from ggufopt_ray.engine.quantize import quantize_model
    from ggufopt_ray.gguf.inspect import inspect_model
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    other = write_synthetic_model(tmp_path / "other.gguf", SynthSpec(seed=0, n_layer=3))
    assert inspect_model(other).vocab_fingerprint == inspect_model(tiny_model).vocab_fingerprint  # same tokenizer
    capsys.readouterr()
    rc = cli(["bench", str(other), "--baseline", str(fresh), "-o", str(tmp_path / "res"), "--threads", "1"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "is not made from the model of the baseline" in line, line
    assert not (tmp_path / "res").exists()
    # a quantization of the baseline's own model passes the same check
    q = quantize_model(tiny_model, "Q4_0", tmp_path / "q4.gguf", threads=1).path
    assert cli(["bench", str(q), "--baseline", str(fresh), "-o", str(tmp_path / "res-q4"), "--to-chunk", "0",
                "--threads", "1"]) == 0


_BUILD = """
import json, sys
from ggufopt_ray.candidates import Recipe, build_candidate
from ggufopt_ray.gguf.inspect import model_fingerprint
model, cache = sys.argv[1:3]
c = build_candidate(Recipe(kind="quant", ftype="Q4_0"), model, cache, model_fingerprint(model), threads=1)
print(json.dumps({"cached": c.cached, "build_seconds": c.build_seconds, "path": c.path}))
"""


def test_two_processes_build_one_candidate_once(tiny_model, tmp_path):
    """Both ask for the same candidate while a lock is held; released, one builds, the other reuses."""
    from ggufopt_ray.candidates import Recipe, candidate_path
    from ggufopt_ray.gguf.inspect import inspect_model, model_fingerprint
    from ggufopt_ray.store.locks import file_lock

    cache = tmp_path / "cache"
    out = candidate_path(cache, model_fingerprint(tiny_model), Recipe(kind="quant", ftype="Q4_0"), None)
    logs = [tmp_path / f"err{k}.txt" for k in range(2)]
    with file_lock(out):
        procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tiny_model), str(cache)],
                                  stdout=subprocess.PIPE, stderr=open(log, "w"), text=True) for log in logs]
        deadline = time.monotonic() + 120
        while not all("waiting for another process building" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.2)
        assert not out.exists()
    results = []
    for p, log in zip(procs, logs):
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log.read_text()
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    built = [r for r in results if not r["cached"]]
    reused = [r for r in results if r["cached"]]
    assert len(built) == 1 and len(reused) == 1, results
    assert built[0]["build_seconds"] > 0 and reused[0]["build_seconds"] == 0
    assert built[0]["path"] == reused[0]["path"] == str(out)
    assert inspect_model(out).file_type == "MOSTLY_Q4_0"
    assert not list(out.parent.glob("*.partial"))
