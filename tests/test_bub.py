"""Batch/ubatch tuning (tuning/bub.py) and ``ggufopt bub`` on the synthetic model, tiny sizes.

Real measurements use n_ctx 64 and one or two chunks; the scenarios that need a known answer
(default wins, memory guard, caching) inject a deterministic ``measure_fn``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ggufopt_ray.cli import main
from ggufopt_ray.errors import UserError
from ggufopt_ray.tuning import bub
from ggufopt_ray.tuning.bub import BubConfig, ConfigMeasurement


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class FakeMeasure:
    """Deterministic throughput per configuration; reports per-chunk values like the real one."""

    def __init__(self, rate, n_chunks=3):
        self.rate = rate
        self.n_chunks = n_chunks
        self.calls: list[BubConfig] = []

    def __call__(self, config, report):
        self.calls.append(config)
        v = float(self.rate(config))
        rates = []
        for step in range(self.n_chunks):
            rates.append(v)
            if report is not None and report(step, v) and step < self.n_chunks - 1:
                return ConfigMeasurement(config.n_batch, config.n_ubatch, "pruned", v, rates)
        return ConfigMeasurement(config.n_batch, config.n_ubatch, "complete", v, rates)


def test_size_ladder_and_default():
    assert bub.size_ladder(64) == [16, 32, 64]
    assert bub.size_ladder(100) == [16, 32, 64, 100]
    assert bub.size_ladder(512, min_size=100) == [128, 256, 512]
    assert bub.size_ladder(64, sizes=[8, 24, 200]) == [8, 24]
    assert len(bub.all_configs([16, 32, 64])) == 6
    assert bub.llama_default_config(4096) == BubConfig(2048, 512)
    assert bub.llama_default_config(100) == BubConfig(100, 100)
    assert bub.llama_default_config(1024) == BubConfig(1024, 512)


def test_parse_memory_budget():
    assert bub.parse_memory_budget("8G") == 8 * 2**30
    assert bub.parse_memory_budget("512MiB") == 512 * 2**20
    assert bub.parse_memory_budget("1.5GB") == int(1.5 * 2**30)
    assert bub.parse_memory_budget("1000000") == 1_000_000
    assert bub.parse_memory_budget(None) is None
    half = bub.parse_memory_budget("0.5")
    assert 0 < half <= bub.available_memory()
    with pytest.raises(UserError):
        bub.parse_memory_budget("lots")


def test_available_memory_sources_agree():
    """/proc/meminfo and psutil (or Ray's vendored copy) report the same MemAvailable."""
    a, b = bub._meminfo_available(), bub._psutil_available()
    assert a and b and abs(a - b) <= 0.1 * a


def test_memory_estimate_matches_llama_cpp_report(tiny_model, capsys):
    """KV cache exactly, compute buffer at or a little above what llama.cpp itself allocates."""
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings

    dims = bub.ModelDims.from_gguf(tiny_model)
    assert (dims.n_vocab, dims.n_embd, dims.n_layer, dims.n_head_kv, dims.n_ff) == (1024, 256, 2, 2, 768)
    for n_ctx, n_ubatch in ((128, 128), (512, 64)):
        capsys.readouterr()
        LogitsEngine(tiny_model, RuntimeSettings(n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch,
                                                 n_threads=1, verbose=True)).close()
        log = capsys.readouterr().err
        LogitsEngine(tiny_model, RuntimeSettings(n_ctx=16, n_batch=16, n_ubatch=16, n_threads=1)).close()
        kv = float(re.search(r"KV buffer size =\s*([\d.]+) MiB", log).group(1)) * 2**20
        compute = float(re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", log).group(1)) * 2**20
        est = bub.estimate_memory(dims, n_ctx, BubConfig(n_ubatch, n_ubatch))
        assert est.kv_cache == pytest.approx(kv, rel=0.01)
        assert compute * 0.99 <= est.compute <= compute * 1.5
        assert est.logits_output == n_ubatch * 1024 * 4 and est.model == tiny_model.stat().st_size


def test_search_returns_valid_evaluated_config(tiny_model):
    r = bub.search_bub(tiny_model, n_ctx=64, n_trials=4, n_chunks=2, n_threads=1, use_cache=False)
    best = r.best_config
    assert best.n_ubatch <= best.n_batch <= 64 and is_pow2(best.n_batch) and is_pow2(best.n_ubatch)
    evaluated = [e.config for e in r.evaluations]
    assert best in evaluated and len(set(evaluated)) == len(evaluated) == r.n_evaluations <= 4
    assert evaluated[0] == bub.llama_default_config(64)  # the llama.cpp default is measured first
    assert r.grid_size == 6 and r.method == "optuna-tpe"
    assert np.isfinite(r.best.tokens_per_s) and r.best.tokens_per_s > 0
    assert all(e.tokens_per_s >= r.best.tokens_per_s * 0.95 for e in r.near_best)
    assert all(e.load_seconds > 0 for e in r.evaluations)
    json.dumps(r.to_dict())


def test_cached_result_is_returned_without_measuring(tiny_model, tmp_path, monkeypatch):
    calls = []
    real = bub.measure_config

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(bub, "measure_config", counting)
    kw = dict(n_ctx=64, n_trials=3, n_chunks=1, n_threads=1, cache_dir=tmp_path)
    first = bub.search_bub(tiny_model, **kw)
    assert len(calls) == first.n_evaluations == 3 and not first.from_cache
    second = bub.search_bub(tiny_model, **kw)
    assert len(calls) == 3  # nothing measured again
    assert second.from_cache and second.best_config == first.best_config
    assert second.best.tokens_per_s == first.best.tokens_per_s
    assert list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.partial"))
    # another context is another cache key, and so is another thread count
    for change in ({"n_ctx": 32}, {"n_threads": 2}):
        fake = FakeMeasure(lambda c: 1.0)
        r = bub.search_bub(tiny_model, **{**kw, **change}, measure_fn=fake)
        assert fake.calls and not r.from_cache and r.cache_key != first.cache_key


def test_forced_default_wins(tiny_model, tmp_path):
    default = bub.llama_default_config(128)  # 128/128
    fake = FakeMeasure(lambda c: 1000.0 if c == default else 100.0 + c.n_ubatch)
    r = bub.search_bub(tiny_model, n_ctx=128, n_trials=6, n_threads=1, cache_dir=tmp_path, measure_fn=fake)
    assert r.best_config == default and r.default.config == default
    assert r.speedup_over_default == 1.0 and r.near_best == []
    assert "best: n_batch=128 n_ubatch=128" in bub.format_bub_result(r)
    again = bub.BubResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.best_config == default
    cached = bub.search_bub(tiny_model, n_ctx=128, n_trials=6, n_threads=1, cache_dir=tmp_path, measure_fn=fake)
    assert cached.from_cache and cached.best_config == default and len(fake.calls) == r.n_evaluations


def test_search_finds_the_planted_best_and_prunes(tiny_model):
    target = BubConfig(64, 16)
    fake = FakeMeasure(lambda c: 5000.0 if c == target else 1000.0 + c.n_batch - c.n_ubatch, n_chunks=4)
    r = bub.search_bub(tiny_model, n_ctx=256, n_trials=15, n_threads=1, use_cache=False, measure_fn=fake)
    assert r.grid_size == 15 and r.n_evaluations == 15  # the whole space when trials == grid size
    assert r.best_config == target and r.speedup_over_default > 4
    assert len(set(fake.calls)) == len(fake.calls)  # no configuration measured twice
    assert any(e.status == "pruned" for e in r.evaluations)  # MedianPruner stopped slow ones


def test_non_power_of_two_context(tiny_model):
    fake = FakeMeasure(lambda c: c.n_batch + c.n_ubatch)
    r = bub.search_bub(tiny_model, n_ctx=96, n_trials=10, n_threads=1, use_cache=False, measure_fn=fake)
    assert r.ladder == [16, 32, 64, 96] and r.best_config == BubConfig(96, 96)
    assert fake.calls[0] == BubConfig(96, 96)


def test_memory_guard_skips_configs_over_budget(tiny_model):
    dims = bub.ModelDims.from_gguf(tiny_model)
    budget = bub.estimate_memory(dims, 128, BubConfig(64, 32)).total
    fake = FakeMeasure(lambda c: c.n_ubatch)
    r = bub.grid_bub(tiny_model, n_ctx=128, n_threads=1, memory_budget=budget, measure_fn=fake)
    expect_fit = {c for c in bub.all_configs([16, 32, 64, 128])
                  if bub.estimate_memory(dims, 128, c).total <= budget}
    assert set(fake.calls) == expect_fit and r.grid_size == len(expect_fit)
    assert r.skipped_memory and all(bub.estimate_memory(dims, 128, c).total > budget for c in r.skipped_memory)
    assert BubConfig(128, 128) in r.skipped_memory and BubConfig(64, 32) in expect_fit
    s = bub.search_bub(tiny_model, n_ctx=128, n_threads=1, memory_budget=budget, use_cache=False,
                       measure_fn=FakeMeasure(lambda c: c.n_ubatch))
    assert all(bub.estimate_memory(dims, 128, e.config).total <= budget for e in s.evaluations)
    with pytest.raises(UserError, match="over the memory budget"):
        bub.search_bub(tiny_model, n_ctx=128, n_threads=1, memory_budget=1000, use_cache=False,
                       measure_fn=fake)


def test_measure_configs_manual(tiny_model):
    r = bub.measure_configs(tiny_model, [(48, 24), (64, 64)], n_ctx=64, n_chunks=1, n_threads=1)
    assert {e.config for e in r.evaluations} == {BubConfig(48, 24), BubConfig(64, 64)}
    assert r.method == "manual" and r.best.status == "complete"
    with pytest.raises(UserError, match="must not exceed"):
        bub.measure_configs(tiny_model, [(16, 32)], n_ctx=64)


def test_bub_cli_json_and_cache(tiny_model, tmp_path, capsys):
    argv = ["bub", str(tiny_model), "--ctx", "64", "--trials", "2", "--chunks", "1", "--threads", "1",
            "--cache-dir", str(tmp_path), "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    b = d["best"]
    assert b["n_ubatch"] <= b["n_batch"] <= 64 and d["n_evaluations"] == 2 and not d["from_cache"]
    assert main(argv[:-1]) == 0
    out = capsys.readouterr().out
    assert "from cache" in out and "best: n_batch=" in out


@pytest.mark.parametrize("argv, message", [
    (["--ctx", "4096"], "training context"),
    (["--ctx", "64", "--config", "16,32"], "must not exceed"),
    (["--ctx", "64", "--config", "16x"], "BATCH,UBATCH"),
    (["--ctx", "64", "--memory-budget", "1M", "--no-cache"], "over the memory budget"),
    (["--ctx", "64", "--memory-budget", "much"], "memory budget"),
    (["--ctx", "64", "--trials", "0", "--no-cache"], "--trials"),
])
def test_bub_cli_bad_input(tiny_model, capsys, argv, message):
    assert main(["bub", str(tiny_model), "--threads", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ggufopt bub: error:") and message in err and "\n" not in err


def test_bub_cli_missing_model(tmp_path, capsys):
    assert main(["bub", str(tmp_path / "nope.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
