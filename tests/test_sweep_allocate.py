"""search=allocate end to end on the tiny model: sensitivities, knapsack rounds, recommendations
whose files llama.cpp's quantizer reproduces, and a report that shows them."""

from __future__ import annotations

import json
import math

import pytest

from conftest import small_sweep_config


@pytest.mark.slow
def test_allocation_recommends_the_best_measured_file_per_size(ray_local, tmp_path):
    from ggufopt_ray.allocate.recommend import parse_tensor_type_file
    from ggufopt_ray.engine.quantize import quantize_model
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", name="allocate", types=["Q3_K", "Q5_K", "Q8_0"], n_bands=1,
                             max_measurements=3, local_bases=True)
    cfg.dataset.eval_chunks = 4
    cfg.report = True  # the report shows the model card and the allocation plot
    cfg.metrics.early_stopping = False  # every candidate on the same 4 chunks: plain means compare
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not result.errors, result.errors
    notes = json.loads((tmp_path / "out" / "sweep.json").read_text())["search"]["allocate"]
    labels = {r["label"] for r in result.rows}
    singles = [r for r in result.rows if "[" in r["label"]]
    mixes = [r for r in result.rows if "-mix" in r["label"]]
    assert {"Q3_K_M", "Q4_K_M", "Q5_K_M"} <= labels
    assert len(singles) == notes["single_group_candidates"] and mixes
    assert -1.0 <= notes["spearman_predicted_vs_measured"] <= 1.0
    # Local bases: each stock size class is allocated around its own type, from the groups'
    # neighbouring types measured on top of it (one step below and one above, by the file's size).
    assert notes["bases"] == ["Q4_K_M", "Q3_K_M", "Q5_K_M"]
    assert {sc["name"]: sc["base"] for sc in notes["size_classes"]} == {
        "Q3_K_M-sized": "Q3_K_M", "Q4_K_M-sized": "Q4_K_M", "Q5_K_M-sized": "Q5_K_M"}
    stock_bpw = {r["label"]: r["bits_per_weight"] for r in result.rows if r["label"] in ("Q3_K_M", "Q5_K_M")}
    for base in ("Q3_K_M", "Q5_K_M"):
        local = [r for r in singles if r["label"].startswith(base + "[")]
        assert local and all(json.loads(r["recipe"])["ftype"] == base for r in local)
        per_group: dict[str, list[float]] = {}
        for r in local:
            per_group.setdefault(r["label"][len(base) + 1:].split("=")[0], []).append(r["bits_per_weight"])
        for sizes in per_group.values():
            assert sum(b < stock_bpw[base] for b in sizes) <= 1 and sum(b > stock_bpw[base] for b in sizes) <= 1

    model = json.loads((tmp_path / "out" / "sweep.json").read_text())["provenance"]["model"]
    recs = {r["size_class"]: r for r in notes["recommendations"]}
    for stock in ("Q3_K_M", "Q4_K_M", "Q5_K_M"):
        limit = quantize_model(model, stock, dry_run=True, threads=1).bits_per_weight * 1.005  # llama.cpp's own size
        fitting = [r for r in result.rows if r["bits_per_weight"] <= limit + 1e-9]
        best = min(fitting, key=lambda r: r["kld_mean"])
        rec = recs[f"{stock}-sized"]
        assert rec["label"] == best["label"]  # the best measured file that fits, nothing else
        assert rec["bits_per_weight"] <= limit
        if "tensor_type_file" in rec:
            # the recipe file reproduces the recommended file's size with llama.cpp's quantizer
            overrides = parse_tensor_type_file(open(rec["tensor_type_file"]).read())
            plan = quantize_model(model, rec["base_type"], dry_run=True, threads=1, tensor_types=overrides)
            assert plan.bits_per_weight == pytest.approx(best["bits_per_weight"], rel=1e-9)
            assert "--tensor-type-file" in rec["command"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="model-card"' in html and "plot-allocation" in html
    assert math.isfinite(notes["reference_kld"])
    # Every row's chunk_kld (what the allocator pairs with its reference) holds each chunk's mean
    # KLD, equal to the per-token values of its results store read here with h5py in float64;
    # the reference KLD is the base's mean over them.
    import h5py
    import numpy as np
    from pathlib import Path

    for r in result.rows:
        if not r.get("results_store"):
            continue
        values = {int(k): v for k, v in json.loads(r["chunk_kld"]).items()}
        assert sorted(values) == list(range(4)), r["label"]
        for i, v in values.items():
            with h5py.File(Path(r["results_store"]) / f"chunk_{i:06d}.h5", "r") as f:
                assert v == pytest.approx(float(np.mean(np.asarray(f["kld"][()], np.float64))), rel=1e-9)
    base = next(r for r in result.rows if r["label"] == "Q4_K_M")
    assert notes["reference_kld"] == pytest.approx(np.mean(list(json.loads(base["chunk_kld"]).values())), rel=1e-12)
