"""The sensitivity-guided allocator against the stock types, and against today's Optuna mix search.

    python bench/allocate.py [--quick] [--json PATH]

One sweep with ``search=allocate`` on the trained model in ../shared/models (``--quick``: a
4-layer synthetic model on the built-in corpus) measures every tensor group's sensitivity, solves
the knapsack for the sizes of Q3_K_M, Q4_K_M and Q5_K_M (each within +0.5%), measures the groups
the predicted best mixes change again on every chunk (``--refine-rounds``) and measures the
predicted frontier. Then every recommended mix and every stock type is evaluated on *all* the
evaluation chunks (the sweep's early stopping may have left some with fewer; the results stores
are continued, nothing is recomputed), so the ratios compare equal data. ``vs_tpe`` runs the
``quant_mix`` Optuna search for the Q4_K_M budget with as many trials as the allocator's evaluated
chunks pay for, and confirms its best mix on all chunks the same way.

JSON keys: ``kld_ratio_vs_stock`` (per size and ``worst``; goal <= 0.85), ``size_ratio_vs_stock``
(goal <= 1.005), ``spearman_predicted_vs_measured``, ``evaluated_chunks``, ``vs_tpe``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "models"
SIZES = ["Q3_K_M", "Q4_K_M", "Q5_K_M"]


def confirm_on_all_chunks(row: dict, baseline_store: str, n_ctx: int) -> dict:
    """The row's candidate evaluated on every chunk of the baseline (its results store continued)."""
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.evaluation import evaluate_candidate, summarize
    from ggufopt_ray.store.baseline import BaselineStore
    from ggufopt_ray.store.results import ResultsStore

    base = BaselineStore.open(baseline_store)
    results = ResultsStore.open(row["results_store"])
    settings = RuntimeSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx)
    run = evaluate_candidate(base.n_chunks, base.read_tokens, base.read_payload, results,
                             lambda: LogitsEngine(row["candidate_path"], settings), base.header["encoding"],
                             int(base.header["first"]))
    s = summarize(run.per_chunk)
    return {"kld_mean": s["kld_mean"], "kld_mean_se": s["kld_mean_se"], "chunks": len(run.per_chunk),
            "bits_per_weight": float(row["bits_per_weight"]), "label": row["label"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 4-layer synthetic model, few chunks (~2-4 min)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--types", help="tensor types a group may take, comma-separated (default: Q2_K..Q8_0 with "
                    "IQ4_XS on the trained model with an importance matrix, else the search's)")
    ap.add_argument("--bands", type=int, default=None, help="bands of consecutive layers per tensor kind "
                    "(search.n_bands; default 4, with --quick 2)")
    ap.add_argument("--local-bases", action=argparse.BooleanOptionalAction, default=None,
                    help="also allocate each size class around its own stock type (search.local_bases; default on, "
                    "off with --quick)")
    ap.add_argument("--local-steps", type=int, default=1, help="with --local-bases: neighbouring types measured per "
                    "group on each size class's own stock type (default 1)")
    ap.add_argument("--refine-rounds", type=int, default=2, help="times the singles the predicted best mixes use "
                    "are measured again on every chunk before the loop (search.refine_rounds; default 2)")
    ap.add_argument("--confirm", type=int, default=3, help="the best this many measured files per size class are "
                    "measured on every chunk before the recommendation (search.confirm; default 3)")
    ap.add_argument("--imatrix", action=argparse.BooleanOptionalAction, default=None,
                    help="every candidate, the stock types too, with an importance matrix of --calib-chunks "
                    "calibration chunks, as publishers quantize (lets --types include IQ4_XS and other IQ types; "
                    "default on, off with --quick)")
    ap.add_argument("--calib-chunks", type=int, default=None, help="calibration chunks (default 1, 8 with --imatrix)")
    args = ap.parse_args(argv)
    quick = args.quick or not (SHARED / "tinycode-a-f16.gguf").exists()
    args.bands = args.bands if args.bands is not None else (2 if quick else 4)
    args.local_bases = args.local_bases if args.local_bases is not None else not quick
    args.imatrix = args.imatrix if args.imatrix is not None else not quick

    from ggufopt_ray.candidates import Recipe
    from ggufopt_ray.config import SweepConfig
    from ggufopt_ray.distributed.runtime import start_ray
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model
    from ggufopt_ray.searches import search_config
    from ggufopt_ray.sweep import run_sweep

    work = Path(tempfile.mkdtemp(prefix="bench-allocate-"))
    cfg = SweepConfig()
    cfg.cache_dir = str(work / "cache")
    cfg.cluster.num_cpus, cfg.cluster.dashboard = 2, False
    model_name = "synthetic 4-layer (vocab 1024)"
    if quick:
        if not args.quick:
            print(f"note: {SHARED / 'tinycode-a-f16.gguf'} not found; using the synthetic model", file=sys.stderr)
        cfg.model.path = str(write_synthetic_model(work / "synth4.gguf", SynthSpec(seed=1, n_layer=4)))
        cfg.model.n_ctx = cfg.model.n_batch = cfg.model.n_ubatch = 128
        cfg.dataset.eval_chunks = 8
        alloc = search_config("allocate", types=["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"], sizes=SIZES,
                              n_bands=args.bands, max_measurements=8, imatrix=args.imatrix,
                              local_bases=args.local_bases, local_steps=args.local_steps,
                              refine_rounds=args.refine_rounds, confirm=args.confirm)
    else:
        model_name = "tinycode-a-f16 (trained, vocab 8192)"
        cfg.model.path = str(SHARED / "tinycode-a-f16.gguf")
        cfg.model.n_ctx = cfg.model.n_batch = cfg.model.n_ubatch = 256
        cfg.dataset.source, cfg.dataset.path, cfg.dataset.langs = "local", str(SHARED / "corpus" / "eval.txt"), ["text"]
        cfg.dataset.eval_chunks = 16
        alloc = search_config("allocate", sizes=SIZES, n_bands=args.bands, max_measurements=24,
                              imatrix=args.imatrix, local_bases=args.local_bases, local_steps=args.local_steps,
                              refine_rounds=args.refine_rounds, confirm=args.confirm)
        if args.imatrix:
            alloc.types = ["Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    if args.types:
        alloc.types = [t.strip() for t in args.types.split(",") if t.strip()]
    cfg.dataset.calib_chunks = args.calib_chunks if args.calib_chunks is not None else (8 if args.imatrix else 1)
    cfg.search = alloc
    start_ray(cfg.cluster)
    t0 = time.perf_counter()
    result = run_sweep(cfg, work / "allocate", log=lambda m: print(m, file=sys.stderr))
    alloc_seconds = time.perf_counter() - t0
    summary = json.loads((work / "allocate" / "sweep.json").read_text())
    notes = summary["search"]["allocate"]
    store = summary["baseline"]["store"]
    n_ctx = cfg.model.n_ctx
    evaluated = int(sum(r.get("chunks_computed", r.get("chunks", 0)) or 0 for r in result.rows))
    by_label = {r["label"]: r for r in result.rows}
    imatrix_chunks = cfg.dataset.calib_chunks if args.imatrix else 0

    def stock_row(ftype: str) -> dict:  # a stock type's row (its label names the imatrix when there is one)
        return by_label[Recipe(kind="quant", ftype=ftype, imatrix_chunks=imatrix_chunks).label()]

    per_size, kld_ratio, size_ratio = {}, {}, {}
    for rec, size in zip(notes.get("recommendations", []), SIZES):
        stock = confirm_on_all_chunks(stock_row(size), store, n_ctx)
        mine = confirm_on_all_chunks(by_label[rec["label"]], store, n_ctx)
        kld_ratio[size] = mine["kld_mean"] / stock["kld_mean"]
        size_ratio[size] = mine["bits_per_weight"] / stock["bits_per_weight"]
        per_size[size] = {"stock": stock, "allocated": mine}
    # TPE: today's quant_mix Optuna search, Q4_K_M budget, the same number of evaluated chunks.
    q4 = confirm_on_all_chunks(stock_row("Q4_K_M"), store, n_ctx)
    n_tpe = max(2, math.ceil(evaluated / cfg.dataset.eval_chunks))
    tpe_cfg = replace(cfg, search=search_config("quant_mix", mode="optuna", num_samples=n_tpe, base_type="Q4_K_M",
                                   target_bpw=round(q4["bits_per_weight"] * 1.005, 4),
                                   mix_types=list(alloc.types), imatrix=args.imatrix))
    t1 = time.perf_counter()
    tpe = run_sweep(tpe_cfg, work / "tpe", log=lambda m: print(m, file=sys.stderr))
    tpe_seconds = time.perf_counter() - t1
    fits = [r for r in tpe.rows if r.get("stop_reason") != "over_size_budget" and r.get("kld_mean") is not None
            and r["bits_per_weight"] <= tpe_cfg.search.target_bpw]
    tpe_best = min(fits, key=lambda r: r["kld_mean"]) if fits else None
    tpe_confirmed = confirm_on_all_chunks(tpe_best, store, n_ctx) if tpe_best else None
    mine_q4 = per_size.get("Q4_K_M", {}).get("allocated")

    out = {
        "model": model_name, "eval_chunks": cfg.dataset.eval_chunks, "n_ctx": n_ctx,
        "settings": {"types": list(alloc.types), "n_bands": alloc.n_bands, "local_bases": alloc.local_bases,
                     "local_steps": alloc.local_steps, "imatrix": alloc.imatrix, "refine_rounds": alloc.refine_rounds,
                     "confirm": alloc.confirm, "calib_chunks": cfg.dataset.calib_chunks},
        "kld_ratio_vs_stock": {**kld_ratio, "worst": max(kld_ratio.values()) if kld_ratio else None},
        "size_ratio_vs_stock": {**size_ratio, "worst": max(size_ratio.values()) if size_ratio else None},
        "spearman_predicted_vs_measured": notes.get("spearman_predicted_vs_measured"),
        "prediction": notes.get("prediction"), "prediction_additive": notes.get("prediction_additive"),
        "evaluated_chunks": evaluated, "allocate_seconds": round(alloc_seconds, 1),
        "groups": len(notes.get("groups", [])), "stop_reason": notes.get("stop_reason"),
        "per_size": per_size,
        "vs_tpe": {"tpe_trials": n_tpe, "tpe_seconds": round(tpe_seconds, 1),
                   "tpe_best": tpe_confirmed, "allocator_q4_k_m": mine_q4,
                   "allocator_lower": (mine_q4 is not None and tpe_confirmed is not None
                                       and mine_q4["kld_mean"] < tpe_confirmed["kld_mean"])},
    }
    print(f"allocator vs stock on {model_name}, {cfg.dataset.eval_chunks} chunks of {n_ctx}:")
    print("| size | stock bpw | stock KLD | allocated bpw | allocated KLD | KLD ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for size, d in per_size.items():
        s, m = d["stock"], d["allocated"]
        print(f"| {size} | {s['bits_per_weight']:.3f} | {s['kld_mean']:.5f} | {m['bits_per_weight']:.3f} | "
              f"{m['kld_mean']:.5f} | {kld_ratio[size]:.3f} |")
    print(f"spearman predicted vs measured {out['spearman_predicted_vs_measured']}, evaluated chunks {evaluated}")
    if tpe_confirmed and mine_q4:
        print(f"vs TPE ({n_tpe} trials): TPE best {tpe_confirmed['label']} {tpe_confirmed['kld_mean']:.5f} at "
              f"{tpe_confirmed['bits_per_weight']:.3f} bpw; allocator {mine_q4['kld_mean']:.5f} at "
              f"{mine_q4['bits_per_weight']:.3f} bpw")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
