"""Hydra configs: every group composes into the typed schema; bad overrides fail by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ggufopt_ray.config import register_configs, to_sweep_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return to_sweep_config(cfg)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "dataset", "metrics", "search", "cluster", "experiment"])
def test_every_option_of_every_group_composes(group):
    from ggufopt_ray.config import SweepConfig

    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        extra = ["model.path=/m.gguf"] if (group, option) == ("model", "gguf") else []
        extra += ["dataset.path=/d/*.txt"] if (group, option) == ("dataset", "local") else []
        cfg = compose([f"{group}={option}", *extra])
        assert isinstance(cfg, SweepConfig)
        if group == "search":
            assert cfg.search.name == option
        if group == "cluster":
            assert cfg.cluster.mode == ("ray" if option == "ray" else "local")


def test_defaults_are_the_builtin_tiny_sweep():
    cfg = compose([])
    assert cfg.model.path is None and cfg.dataset.source == "builtin"
    assert cfg.search.name == "quant_types" and cfg.cluster.mode == "local"
    assert cfg.cluster.dashboard_host == "127.0.0.1"


def test_overrides_are_typed():
    cfg = compose(["model.n_ctx=128", "search.types=[Q8_0,Q4_0]", "cluster.num_cpus=2"])
    assert cfg.model.n_ctx == 128 and cfg.search.types == ["Q8_0", "Q4_0"] and cfg.cluster.num_cpus == 2


def _run_sweep(*overrides, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), *overrides], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.parametrize("override,needle", [
    ("model.n_ctxx=128", "n_ctxx"),
    ("model.n_ctx=big", "n_ctx"),
    ("search=nonexistent", "search"),
])
def test_bad_override_fails_naming_the_key(override, needle, tmp_path):
    proc = _run_sweep(override, cwd=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("results.csv"))


def test_bad_value_is_a_one_line_error_before_ray_starts(tmp_path):
    proc = _run_sweep("search.types=[Q9_X]", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
                      cwd=tmp_path)
    assert proc.returncode == 2
    assert "Q9_X" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") <= 2
    # the run directory's log says why the sweep stopped, as the terminal did
    assert proc.stderr.strip() in (tmp_path / "run" / "sweep.log").read_text()


@pytest.mark.slow
def test_multirun_of_two_searches_writes_two_result_dirs(tmp_path):
    # Keys of one search are not keys of another: each search of a multirun takes its own from an
    # option file (here the user's own, added with --config-dir), as the README says.
    own = tmp_path / "myconf" / "search"
    own.mkdir(parents=True)
    (own / "two_types.yaml").write_text("defaults:\n  - quant_types_schema\ntypes: [Q8_0, Q4_0]\n")
    (own / "zfp_one.yaml").write_text("defaults:\n  - zfp_schema\nzfp_rates: [8.0]\nzfp_dims: [2]\n")
    proc = _run_sweep("-m", "--config-dir", str(tmp_path / "myconf"), "search=two_types,zfp_one", "experiment=quick",
                      "cluster.dashboard=false", "report=false",
                      f"cache_dir={tmp_path / 'cache'}", "hydra.sweep.dir=" + str(tmp_path / "multi"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import pandas as pd

    dirs = sorted(p for p in (tmp_path / "multi").iterdir() if p.is_dir() and p.name.isdigit())
    assert [d.name for d in dirs] == ["0", "1"]
    a = pd.read_csv(dirs[0] / "results.csv")
    b = pd.read_csv(dirs[1] / "results.csv")
    assert sorted(a["label"]) == ["Q4_0", "Q8_0"]
    assert list(b["label"]) == ["zfp-rate8-d2"]
    assert (dirs[0] / ".hydra" / "config.yaml").exists()
    # Each run directory's sweep.log holds what that sweep said, timed: where it started, a line per
    # finished trial, the results table; and nothing of the other job of the multirun.
    for d, labels, other in ((dirs[0], ["Q4_0", "Q8_0"], "zfp-rate8-d2"), (dirs[1], ["zfp-rate8-d2"], "Q8_0")):
        text = (d / "sweep.log").read_text()
        assert "model    " in text and "results in " in text
        for label in labels:
            assert f"trial    {label}: " in text and f"| {label} |" in text
        assert other not in text
    # report=false: results without the report (`ggufopt report DIR` draws it later)
    assert not any((d / "report.html").exists() or (d / "plots").exists() for d in dirs)
