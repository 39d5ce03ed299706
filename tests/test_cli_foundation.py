"""The CLI on bad input: one line on stderr, non-zero exit, nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest


def ggufopt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ggufopt_ray.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.gguf").write_text("this is not a model\n")
    data = tiny_model.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) // 3])
    (d / "header-only.gguf").write_bytes(data[:2000])
    return d


def _assert_one_line_error(proc, needle):
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "error:" in lines[0] and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_missing_non_gguf_and_truncated_files(command, bad_files, tmp_path):
    extra = ["--text", "hello"] if command == "eval" else []
    _assert_one_line_error(ggufopt(command, tmp_path / "missing.gguf", *extra), "does not exist")
    _assert_one_line_error(ggufopt(command, bad_files / "notes.gguf", *extra), "not a GGUF file")
    _assert_one_line_error(ggufopt(command, bad_files / "truncated.gguf", *extra), "truncated")
    _assert_one_line_error(ggufopt(command, bad_files / "header-only.gguf", *extra), "truncated")


def test_context_beyond_training_context(tiny_model):
    _assert_one_line_error(ggufopt("eval", tiny_model, "--text", "hello", "--ctx", 2048), "training context")


def test_empty_token_chunk(tiny_model):
    proc = ggufopt("eval", tiny_model, "--tokens", "")
    _assert_one_line_error(proc, "empty token chunk")
    assert proc.stdout == ""


def test_synth_inspect_eval_happy_path(tmp_path):
    out = tmp_path / "m.gguf"
    proc = ggufopt("synth-model", out, "--seed", 7)
    assert proc.returncode == 0, proc.stderr
    assert "ALL_F32" in proc.stdout and out.exists()
    proc = ggufopt("inspect", out, "--json")
    assert proc.returncode == 0
    import json

    info = json.loads(proc.stdout)
    assert info["vocab_size"] == 1024 and info["architecture"] == "llama"
    proc = ggufopt("eval", out, "--text", "the model of the matrix and the value " * 20, "--ctx", 64)
    assert proc.returncode == 0, proc.stderr
    assert "overall perplexity" in proc.stdout
    assert proc.stderr == ""  # llama.cpp stays silent unless --verbose
