"""search=allocate end to end on the tiny model: sensitivities, knapsack rounds, recommendations
whose files llama.cpp's quantizer reproduces, and a report that shows them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import small_sweep_config


@pytest.mark.slow
def test_allocation_recommends_the_best_measured_file_per_size(ray_local, tmp_path):
    from ggufopt_ray.allocate.recommend import parse_tensor_type_file
    from ggufopt_ray.engine.quantize import quantize_model
    from ggufopt_ray.searches import make_search
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", name="allocate", types=["Q3_K", "Q5_K", "Q8_0"], n_bands=1,
                             max_measurements=3, local_bases=True, local_steps=1)
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
    # The table the sweep prints keeps the stock types and the mixes and counts the singles it leaves out.
    shown, left_out = make_search(cfg.search).table_rows(result.rows)
    assert [r["label"] for r in shown] == [r["label"] for r in result.rows if "[" not in r["label"]]
    assert left_out.startswith(f"{len(singles)} single-group measurements not shown")
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


@pytest.mark.slow
def test_refinement_measures_the_cells_of_the_predicted_best_mixes_on_every_chunk(ray_local, tmp_path):
    """With racing, singles stop after a few chunks; before the loop, the cells the predicted best
    mix of each size class uses are measured again on every chunk, until the best mixes use no
    other. Checked here by brute force over every mix, from the rows' own per-chunk KLDs. The
    files recommended at the end were measured on every chunk too."""
    import itertools

    import numpy as np

    from ggufopt_ray.searches.allocate import KEEP, BaseTable
    from ggufopt_ray.sweep import run_sweep

    cfg = small_sweep_config(tmp_path / "cache", name="allocate", types=["Q3_K", "Q8_0"], n_bands=1,
                             max_measurements=2, refine_rounds=6)
    cfg.dataset.eval_chunks = 8
    cfg.metrics.early_stopping, cfg.metrics.min_chunks = True, 2
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not result.errors, result.errors
    labels = [r["label"] for r in result.rows]
    assert len(labels) == len(set(labels))  # a refined single replaced its earlier row
    notes = json.loads((tmp_path / "out" / "sweep.json").read_text())["search"]["allocate"]
    chunks = {r["label"]: {int(k): v for k, v in json.loads(r["chunk_kld"]).items()} for r in result.rows}
    singles = [lab for lab in labels if lab.startswith("Q4_K_M[")]
    assert any(len(chunks[lab]) < 8 for lab in singles)  # racing stopped some singles early
    refined = [f"Q4_K_M[{g}={t}]" for g, t in notes["refined"]["Q4_K_M"]]
    assert refined and all(sorted(chunks[lab]) == list(range(8)) for lab in refined)
    # the recommended file of every size class was confirmed on every chunk before it was chosen
    assert notes["recommendations"] and all(sorted(chunks[rec["label"]]) == list(range(8))
                                            for rec in notes["recommendations"])
    # so the model card quotes each file's own mean KLD and standard error, not the racing
    # estimator's zero-width interval for a candidate that saw every chunk
    rows = {r["label"]: r for r in result.rows}
    for rec in notes["recommendations"]:
        assert not rows[rec["label"]].get("kld_mean_adj_control")
        assert rec["kld_mean_se"] == pytest.approx(rows[rec["label"]]["kld_mean_se"]) and rec["kld_mean_se"] > 0
    correction = notes["per_base"]["Q4_K_M"]["correction"]
    # the loop measured mixes (and the given reference), and chose one of the configured scales
    assert correction["mixes"] == 1 + sum("-mix" in lab for lab in labels) and correction["link_power"] in (0.5, 1, 0)

    ref = chunks["Q4_K_M"]
    k_ref = float(np.mean(np.array(list(ref.values()), np.float64)))
    table = BaseTable.build(json.loads((tmp_path / "out" / "sweep.json").read_text())["provenance"]["model"],
                            "Q4_K_M", ["Q3_K", "Q8_0"], 2, 1)
    columns = [KEEP, "Q3_K", "Q8_0"]
    root = np.full(table.nbytes.shape, np.nan)  # sqrt of each cell's paired KLD (λ = 1/2)
    for gi, g in enumerate(table.groups):
        for ti, t in enumerate(columns):
            if t == KEEP or (g.name, t) in table.same_as_base:
                root[gi, ti] = math.sqrt(k_ref)
                continue
            c = chunks[f"Q4_K_M[{g.name}={t}]"]
            shared = sorted(i for i in c if i in ref)
            ratio = (np.sum([c[i] for i in shared], dtype=np.float64)
                     / np.sum([ref[i] for i in shared], dtype=np.float64))
            root[gi, ti] = math.sqrt(k_ref * ratio)
    G = len(table.groups)
    mixes = np.array(list(itertools.product(range(3), repeat=G)))
    size = table.fixed_bytes + table.nbytes[np.arange(G), mixes].sum(axis=1)
    value = (root[np.arange(G), mixes] - math.sqrt(k_ref)).sum(axis=1)
    for sc in notes["size_classes"]:
        fits = np.flatnonzero(size <= sc["max_bytes"])
        if not len(fits):
            continue
        best = mixes[fits[np.argmin(value[fits])]]
        for gi, ti in enumerate(best):
            g, t = table.groups[gi].name, columns[ti]
            if t != KEEP and (g, t) not in table.same_as_base:
                assert sorted(chunks[f"Q4_K_M[{g}={t}]"]) == list(range(8)), (sc["name"], g, t)


@pytest.mark.slow
def test_recipes_rewrite_the_measured_files_with_llama_quantize(ray_local, tmp_path):
    """With search.imatrix=true, ``recipes/quantize.sh`` names the importance matrix each file was
    quantized with (copied beside it), and its commands, run with llama.cpp's own llama-quantize,
    write tensors byte-identical to the files the sweep measured. Only the metadata may differ:
    ours carries the recipe key, theirs names the copy of the imatrix."""
    import hashlib
    import shlex
    import subprocess

    from gguf import GGUFReader
    from test_llama_cpp_parity import find_tools

    from ggufopt_ray.sweep import run_sweep

    quantize = find_tools() / "llama-quantize"
    cfg = small_sweep_config(tmp_path / "cache", name="allocate", types=["Q3_K", "Q8_0"], n_bands=1,
                             max_measurements=2, imatrix=True, confirm=1)
    result = run_sweep(cfg, tmp_path / "out", log=lambda *a: None)
    assert not result.errors, result.errors
    recipes = tmp_path / "out" / "recipes"
    recs = json.loads((tmp_path / "out" / "sweep.json").read_text())["search"]["allocate"]["recommendations"]
    rows = {r["label"]: r for r in result.rows}
    assert recs and all(rows[rec["label"]]["imatrix_path"] for rec in recs)

    def sha(path) -> str:
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    def tensors(path) -> dict:
        return {t.name: (int(t.tensor_type), bytes(t.data)) for t in GGUFReader(path).tensors}

    commands = [line for line in (recipes / "quantize.sh").read_text().splitlines()
                if line and not line.startswith(("#", "set "))]
    assert len(commands) == len(recs)
    for rec, command in zip(recs, commands):
        assert command == rec["command"]
        row = rows[rec["label"]]
        argv = shlex.split(command)
        assert argv[argv.index("--imatrix") + 1] == rec["imatrix"]
        assert Path(rec["imatrix"]).parent == recipes and sha(rec["imatrix"]) == sha(row["imatrix_path"])
        theirs = tmp_path / f"{rec['size_class']}-llama-quantize.gguf"
        proc = subprocess.run([str(quantize), *argv[1:-2], str(theirs), argv[-1], "2"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert tensors(theirs) == tensors(row["candidate_path"])
    assert any("tensor_type_file" in rec for rec in recs)  # a mix among them, not only stock types
