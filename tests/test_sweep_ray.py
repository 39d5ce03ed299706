"""The distributed sweep on a real local Ray: same numbers as one machine, baseline once."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import small_sweep_config

TYPES = ["Q8_0", "Q6_K", "Q4_K_M", "Q4_0"]
STATS = ["kld_mean", "kld_median", "kld_p90", "kld_p95", "kld_p99", "kld_max", "same_top", "delta_p_rms",
         "ppl_base", "ppl_cand", "ln_ppl_ratio", "composite"]


@pytest.fixture(scope="module")
def sweep_run(ray_local, tmp_path_factory):
    from ggufopt_ray.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    cfg = small_sweep_config(root / "cache", types=TYPES)
    removed = []

    def drop_store(store):
        # Trials must never read the baseline file: it is gone before the first trial starts.
        shutil.rmtree(store.root)
        removed.append(str(store.root))

    result = run_sweep(cfg, root / "out", on_baseline_ready=drop_store, log=lambda *a: None)
    return cfg, result, removed, root


def test_every_type_has_one_row_and_order_is_plausible(sweep_run):
    cfg, result, removed, root = sweep_run
    assert not result.errors
    labels = sorted(r["label"] for r in result.rows)
    assert labels == sorted(TYPES)
    by = {r["label"]: r for r in result.rows}
    for r in result.rows:
        assert r["chunks"] == 4 and r["stop_reason"] == "all_chunks"
        assert 1 <= r["eval_threads"] <= 2  # one CPU each, both for a last trial that runs alone
        assert 1 <= r["build_threads"] <= 2  # quantized on the threads the trial held when it started
    events = [json.loads(line) for line in (root / "out" / "events.jsonl").read_text().splitlines()]
    built = {e["label"]: e["threads"] for e in events if e["event"] == "candidate"}
    assert built == {r["label"]: r["build_threads"] for r in result.rows}
    assert by["Q8_0"]["kld_mean"] < by["Q6_K"]["kld_mean"] < by["Q4_K_M"]["kld_mean"]
    assert by["Q8_0"]["bits_per_weight"] > by["Q4_0"]["bits_per_weight"]
    assert (root / "out" / "results.parquet").exists() and (root / "out" / "results.csv").exists()
    assert json.loads((root / "out" / "best.json").read_text())["label"] == "Q8_0"


def test_baseline_computed_once_and_read_from_object_store(sweep_run):
    cfg, result, removed, root = sweep_run
    assert result.baseline["computed"] == 4 and result.baseline["loaded"] == 0
    assert removed, "the baseline store was removed before the trials"
    for r in result.rows:
        # Every chunk of every trial came from the object store; the file was already deleted.
        assert r["baseline_chunks_from_object_store"] == 4 == r["chunks_computed"]


def test_distributed_numbers_equal_single_machine(sweep_run, tiny_model):
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.evaluation import baseline_payload, compare_chunk, summarize
    from ggufopt_ray.sweep import prepare_data, resolve_model

    cfg, result, removed, root = sweep_run
    cache = root / "cache"
    model = resolve_model(cfg, cache)
    ev, _ = prepare_data(cfg, model, cache)
    settings = RuntimeSettings(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1)
    first = 64
    with LogitsEngine(model, settings) as base:
        encoding = result.rows[0]["prov.encoding"]  # what metrics.encoding=auto resolved to
        assert encoding == "float16"
        payloads = [baseline_payload(base, c, encoding, first) for c in ev.chunks]
    for row in result.rows:
        with LogitsEngine(row["candidate_path"], settings) as cand:
            per_chunk = [compare_chunk(cand, c, p, encoding, first) for c, p in zip(ev.chunks, payloads)]
        single = summarize(per_chunk)
        for key in STATS:
            np.testing.assert_allclose(row[key], single[key], rtol=1e-6, err_msg=f"{row['label']} {key}")
        print(f"{row['label']}: distributed KLD mean {row['kld_mean']:.6f} = single machine {single['kld_mean']:.6f}")


def test_second_sweep_reuses_baseline_candidates_and_results(sweep_run):
    from ggufopt_ray.sweep import run_sweep

    cfg, first, removed, root = sweep_run
    second = run_sweep(cfg, root / "out2", log=lambda *a: None)
    # The first run's store was deleted on purpose, so this run recomputes it once...
    assert second.baseline["computed"] == 4
    third = run_sweep(cfg, root / "out3", log=lambda *a: None)
    # ...and a third run on the same inputs computes nothing: same fingerprint, same store.
    assert third.baseline["computed"] == 0 and third.baseline["loaded"] == 4
    for r in third.rows:
        assert r["candidate_cached"] is True or r["candidate_cached"] == 1
        assert r["chunks_computed"] == 0
    a = {r["label"]: r["kld_mean"] for r in first.rows}
    b = {r["label"]: r["kld_mean"] for r in third.rows}
    assert a == pytest.approx(b, rel=1e-6)


def test_per_tensor_mix_search_beats_the_plain_type(ray_local, tmp_path):
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", name="quant_mix", base_type="Q4_K_M",
                             mix_groups=["attn_v", "ffn_down", "first_layers"], mix_types=["Q5_K", "Q6_K"])
    cfg.dataset.eval_chunks = 2
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not result.errors
    plain = [r for r in result.rows if r["label"] == "Q4_K_M"]
    assert len(plain) == 1 and len(result.rows) == 7
    plain = plain[0]
    better = [r for r in result.rows if r["label"] != "Q4_K_M" and r["bits_per_weight"] <= plain["bits_per_weight"]
              and r["kld_mean"] < plain["kld_mean"]]
    for r in sorted(result.rows, key=lambda r: r["kld_mean"]):
        print(f"{r['label']:<60} {r['bits_per_weight']:.4f} bpw  KLD {r['kld_mean']:.5f}")
    assert better, "no mix at or under the plain type's size has a lower KLD"
    best = min(better, key=lambda r: r["kld_mean"])
    print(f"best mix {best['label']}: {best['bits_per_weight']:.4f} bpw, KLD {best['kld_mean']:.5f} "
          f"vs plain Q4_K_M {plain['bits_per_weight']:.4f} bpw, KLD {plain['kld_mean']:.5f}")


def test_optuna_search_with_size_budget(ray_local, tmp_path):
    """Every Optuna proposal is fitted to the budget, so every trial measures a candidate."""
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", name="quant_mix", mode="optuna", num_samples=4, base_type="Q4_K_M",
                             mix_groups=["attn_v", "ffn_down", "token_embd"], mix_types=["Q5_K", "Q8_0"],
                             target_bpw=None, target_bpw_over_base=0.25)
    cfg.dataset.eval_chunks = 2
    cfg.report = True  # report.md states the budget
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    budget = json.loads((tmp_path / "out" / "sweep.json").read_text())["size_budget"]
    assert budget["target_bpw"] == pytest.approx(budget["base_bpw"] + 0.25, abs=1e-4)
    assert not result.errors and len(result.rows) == 4
    assert "Q4_K_M" in [r["label"] for r in result.rows]  # the plain base type is always measured
    for r in result.rows:
        print(f"{r['sampled_label']:<55} -> {r['label']:<55} {r['bits_per_weight']:.4f} bpw")
        assert r["bits_per_weight"] <= budget["target_bpw"] + 1e-9 and r["chunks"] == 2
        assert r["stop_reason"] != "over_size_budget"
        assert r["fitted_to_budget"] == (r["label"] != r["sampled_label"])
    assert result.best is not None and result.best["bits_per_weight"] <= budget["target_bpw"]
    assert f"size budget: **{budget['target_bpw']:.3f} bpw" in (tmp_path / "out" / "report.md").read_text()


def test_a_budget_no_mix_can_meet_is_refused_before_any_work(tiny_model, tmp_path):
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.searches import SearchFacts, make_search, search_config

    facts = SearchFacts(model_path=str(tiny_model), n_layer=2, n_ctx=128, n_calib=0)

    def prepared(**values):
        return make_search(search_config("quant_mix", base_type="Q4_K_M", **values)).prepare(facts, log=lambda _: None)

    # Q4_K_M alone is 5.0 bpw on the tiny model; the mixes only add
    with pytest.raises(UserError, match=r"search.target_bpw=4.5 is below the smallest mix of Q4_K_M"):
        prepared(mix_types=["Q5_K", "Q8_0"], target_bpw=4.5)
    # a smaller type makes a mix under the base possible
    assert prepared(mix_types=["Q3_K", "Q5_K"], target_bpw=4.5).notes["size_budget"]["target_bpw"] == 4.5
    assert "size_budget" not in prepared(mix_types=["Q3_K", "Q5_K"], target_bpw=None,
                                         target_bpw_over_base=None).notes


def test_imatrix_size_search_scores_sizes_and_recommends_one(ray_local, tmp_path):
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", name="imatrix_size", base_type="IQ4_XS", imatrix_chunks=[1, 2])
    cfg.dataset.eval_chunks = 2
    cfg.report = True  # report.md states the recommended size
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not result.errors, result.errors
    sizes = sorted(int(r["config.imatrix_chunks"]) for r in result.rows)
    assert sizes == [0, 1, 2]
    hashes = {int(r["config.imatrix_chunks"]): r["imatrix_hash"] for r in result.rows}
    assert hashes[0] == "" and hashes[1] and hashes[2] and hashes[1] != hashes[2]
    growth = result.best["imatrix_growth"]
    score = {int(r["config.imatrix_chunks"]): r["composite"] for r in result.rows}
    expected = 2 if (score[1] - score[2]) / score[1] >= cfg.search.imatrix_gain_threshold else 1
    assert growth["recommended_imatrix_chunks"] == expected
    assert growth["gain_over_no_imatrix"] == pytest.approx((score[0] - score[expected]) / score[0])
    assert f"recommended imatrix: **{expected} calibration chunks" in (tmp_path / "out" / "report.md").read_text()
    for step in growth["steps"]:
        print(f"imatrix {step['from']} -> {step['to']} chunks: composite {step['composite_from']:.5f} -> "
              f"{step['composite_to']:.5f} ({100 * step['relative_gain']:+.1f}%)")


def test_bub_search_on_ray(ray_local, tmp_path):
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", name="bub", mode="optuna", num_samples=3, bub_min_log2=5,
                             bub_max_log2=7)
    cfg.dataset.eval_chunks = 3
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not result.errors and len(result.rows) == 3
    for r in result.rows:
        assert 32 <= r["n_ubatch"] <= r["n_batch"] <= 128 and r["tokens_per_s"] > 0
    assert result.best["tokens_per_s"] == max(r["tokens_per_s"] for r in result.rows)
    assert result.baseline["computed"] == 0  # throughput needs no baseline


def test_multi_objective_optuna_returns_a_pareto_front(ray_local, tmp_path):
    from ggufopt_ray.report.tables import pareto_front
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", mode="optuna", num_samples=4,
                             types=["Q8_0", "Q6_K", "Q4_K_M", "Q4_0"], objectives=["composite", "bits_per_weight"])
    cfg.dataset.eval_chunks = 2
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not result.errors and len(result.rows) == 4
    front = {r["label"] for r in result.pareto}
    assert front and front == {r["label"] for r in pareto_front(result.rows)}
    for r in result.rows:  # nothing off the front is both smaller and closer than a front member
        if r["label"] not in front:
            assert any(p["bits_per_weight"] <= r["bits_per_weight"] and p["composite"] <= r["composite"]
                       for p in result.pareto)


def test_two_baseline_stages_share_one_cluster(ray_local, tiny_model, tmp_path):
    """Two sweeps on one cluster (multirun, or back to back) must not collide on actor names."""
    import threading

    from ggufopt_ray.config import ClusterConfig
    from ggufopt_ray.distributed.baseline import run_baseline
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.evaluation import baseline_payload
    from ggufopt_ray.store.baseline import BaselineStore

    settings = RuntimeSettings(n_ctx=64, n_batch=64, n_ubatch=64)
    rng = np.random.default_rng(3)
    chunks = [rng.integers(3, 1000, 64).astype(np.int32) for _ in range(2)]
    results, errors = {}, []

    def stage(k: int) -> None:
        header = {"model_fingerprint": f"m{k}", "vocab_fingerprint": "v", "corpus_fingerprint": "c",
                  "n_ctx": 64, "n_vocab": 1024, "encoding": "exact", "encoding_params": {}, "first": 32,
                  "n_chunks": len(chunks)}
        store = BaselineStore.create_or_open(tmp_path / f"store{k}", header)
        try:
            results[k] = (store, run_baseline(store, chunks, str(tiny_model), settings, "exact", 32,
                                              ClusterConfig(worker_cpus=1.0)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=stage, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    reference = baseline_payload(LogitsEngine(str(tiny_model), settings), chunks[1], "exact", 32)
    for store, base in results.values():
        assert base.computed == 2 and base.loaded == 0
        for key, value in reference.items():
            np.testing.assert_array_equal(store.read_payload(1)[key], value)


def test_a_baseline_too_big_for_the_object_store_is_flagged(ray_local):
    """A 128k vocabulary at float16 is ~64 KiB per scored token: the object store is the first limit."""
    from ggufopt_ray.config import SweepConfig
    from ggufopt_ray.distributed.runtime import object_store_bytes
    from ggufopt_ray.metrics.encodings import get_encoding
    from ggufopt_ray.sweep import _check_baseline_footprint, baseline_footprint

    cfg = SweepConfig()
    cfg.metrics.encoding = "float16"
    cfg.model.n_ctx, first, vocab = 512, 256, 128256
    per_chunk = baseline_footprint("float16", 1, 255, vocab)
    assert per_chunk == 255 * get_encoding("float16").bytes_per_token(vocab)
    capacity = object_store_bytes()
    assert capacity > 0
    logs: list[str] = []
    _check_baseline_footprint(cfg, int(0.4 * capacity // per_chunk), first, vocab, logs.append)
    assert logs == []
    _check_baseline_footprint(cfg, int(0.6 * capacity // per_chunk) + 1, first, vocab, logs.append)
    assert len(logs) == 1 and "metrics.encoding=compact" in logs[0] and "spill" in logs[0]
    print(logs[0])
