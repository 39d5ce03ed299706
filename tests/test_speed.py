"""Speed measurement (engine/speed.py) and ``ggufopt speed`` on the synthetic model, tiny sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ggufopt_ray.cli import main
from ggufopt_ray.engine import speed
from ggufopt_ray.errors import UserError


def test_regime_splits_follow_the_zfp_notes():
    assert speed.regime_splits(512) == {"prefill": (511, 1), "mixed": (410, 102), "generate": (32, 480)}
    assert speed.regime_splits(100) == {"prefill": (99, 1), "mixed": (80, 20), "generate": (6, 94)}
    for total in (2, 3, 7, 64, 999, 1024):
        splits = speed.regime_splits(total)
        for p, g in splits.values():
            assert p + g == total and p >= 1 and g >= 1
        p, g = splits["mixed"]
        if total >= 10:  # below that the 1-token minimum of each phase decides
            assert abs(p / total - 0.8) <= 0.5 / total + 1e-12  # nearest integer to 80 %
    with pytest.raises(UserError):
        speed.regime_splits(1)


def test_spread_statistics():
    s = speed.Spread.of([1.0, 2.0, 3.0])
    assert (s.mean, s.stdev, s.min, s.max, s.n) == (2.0, 1.0, 1.0, 3.0, 3)
    assert speed.Spread.of([5.0]).stdev == 0.0


def test_measure_speed_counts_reps_and_splits(tiny_model, monkeypatch):
    calls = []
    real_run = speed.SpeedRunner.run

    def counting_run(self, test):
        calls.append(test.name)
        return real_run(self, test)

    monkeypatch.setattr(speed.SpeedRunner, "run", counting_run)
    result = speed.measure_speed(tiny_model, pp=48, tg=8, reps=3, regimes=True, regime_tokens=128,
                                 n_threads=1)
    names = [m.test.name for m in result.measurements]
    assert names == ["pp48", "tg8", "prefill:p127+g1", "mixed:p102+g26", "generate:p8+g120"]
    assert len(calls) == 5 * (3 + 1)  # one warm-up per test, excluded from the figures
    for m in result.measurements:
        assert m.reps == 3 and len(m.gen_seconds) == 3
        t = m.tokens_per_s
        assert t.n == 3 and math.isfinite(t.mean) and t.mean > 0 and t.min <= t.mean <= t.max
        # independent recomputation from the raw timings
        expect = np.mean([m.test.n_tokens / (p + g) for p, g in zip(m.prompt_seconds, m.gen_seconds)])
        assert t.mean == pytest.approx(expect, rel=1e-12)
    assert result.measurement("pp48").gen_tokens_per_s is None
    assert result.measurement("tg8").prompt_tokens_per_s is None
    mixed = result.measurement("mixed")
    assert (mixed.test.n_prompt, mixed.test.n_gen) == (102, 26)
    assert mixed.prompt_tokens_per_s.mean > 0 and mixed.ms_per_generated_token.mean > 0
    assert result.settings["n_ctx"] == 128 and result.settings["n_threads"] == 1
    d = json.loads(json.dumps(result.to_dict()))
    assert d["tests"][0]["reps"] == 3 and d["n_params"] > 0


def test_greedy_and_two_models_round_robin(tiny_model, tiny_model_f16):
    tests = [speed.tg_test(6), speed.SpeedTest("pg", 10, 5)]
    results = speed.measure_speeds([tiny_model, tiny_model_f16], tests, reps=2, n_threads=1, greedy=True)
    assert [r.model for r in results] == [str(tiny_model), str(tiny_model_f16)]
    for r in results:
        assert [m.reps for m in r.measurements] == [2, 2]
        assert all(m.tokens_per_s.mean > 0 for m in r.measurements)
    table = speed.format_speed_table(results)
    assert "ratio of mean tokens/s" in table and "tg6" in table


def test_speed_cli_json(tiny_model, capsys):
    rc = main(["speed", str(tiny_model), "--pp", "32", "--tg", "4", "--reps", "2", "--threads", "1",
               "--regimes", "--regime-tokens", "64", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    tests = d["results"][0]["tests"]
    assert [(t["n_prompt"], t["n_gen"]) for t in tests] == [(32, 0), (0, 4), (63, 1), (51, 13), (4, 60)]
    assert all(t["reps"] == 2 and t["tokens_per_s"]["mean"] > 0 for t in tests)


def test_speed_cli_table(tiny_model, capsys):
    assert main(["speed", str(tiny_model), "--pp", "16", "--tg", "2", "--reps", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "pp16" in out and "tg2" in out


@pytest.mark.parametrize("argv, message", [
    (["--pp", "4096"], "training context"),
    (["--batch", "16", "--ubatch", "32"], "must not exceed"),
    (["--reps", "0"], "--reps"),
    (["--pp", "0", "--tg", "0"], "nothing to measure"),
])
def test_speed_cli_bad_input(tiny_model, capsys, argv, message):
    assert main(["speed", str(tiny_model), "--threads", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ggufopt speed: error:") and message in err and "\n" not in err


def test_speed_cli_missing_model(tmp_path, capsys):
    assert main(["speed", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err
