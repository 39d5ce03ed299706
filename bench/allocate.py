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

Held out: the chunks that chose the recommended files also score them above, so the quoted ratios
carry a little selection bias. ``heldout`` scores the same files again with llama.cpp's own
``llama-perplexity --kl-divergence`` (an independent implementation; the tools that
``.ci/build-llama-tools`` builds) on ``--heldout-chunks`` chunks of the corpus documents that no
chunk of the sweep drew on (evaluation or calibration): text the allocator never saw.

JSON keys: ``kld_ratio_vs_stock`` (per size and ``worst``; goal <= 0.85), ``size_ratio_vs_stock``
(goal <= 1.005), ``spearman_predicted_vs_measured``, ``evaluated_chunks``, ``vs_tpe``, and
``heldout`` (its own ``kld_ratio_vs_stock`` with each ratio's standard error, and ``vs_tpe``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "models"
SIZES = ["Q3_K_M", "Q4_K_M", "Q5_K_M"]

from llama_tools import find_tools, kl_divergence_pass, kld_summary, parse_kld_output, run_tool  # noqa: E402
from ggufopt_ray.allocate.recommend import format_kld  # noqa: E402

MIN_HELDOUT_CHUNKS = 8  # fewer: the held-out score is left out (too few documents are left)


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
            "bits_per_weight": float(row["bits_per_weight"]), "label": row["label"], "path": row["candidate_path"]}


def heldout_text(cfg, cache: Path, out: Path) -> int:
    """Write to ``out`` the corpus documents that no chunk of the sweep drew on (evaluation or
    calibration, every chunk file in the sweep's cache); returns how many there are."""
    import pyarrow.parquet as pq

    from ggufopt_ray.data import collect_corpus
    from ggufopt_ray.data.chunks import sample_id
    from ggufopt_ray.sweep import dataset_source

    d = cfg.dataset
    corpus = collect_corpus(dataset_source(d), list(d.langs), d.samples_per_lang, skip=d.skip)
    used: set[str] = set()
    for f in sorted((cache / "chunks").glob("chunks-*.parquet")):
        for ids in pq.read_table(f, columns=["sample_ids"]).column("sample_ids").to_pylist():
            used.update(ids)
    docs = [t for texts in corpus.texts.values() for t in texts]
    unknown = used - {sample_id(t) for t in docs}
    if unknown:  # the chunks came from other texts: nothing here could be called held out
        raise SystemExit(f"{len(unknown)} samples of the sweep's chunks are not in the corpus read back; "
                         "the held-out split cannot be trusted")
    held = [t for t in docs if sample_id(t) not in used]
    out.write_text("\n\n".join(held))
    return len(held)


def score_heldout(model: Path, text: Path, files: dict[str, str], n_ctx: int, n_chunks: int,
                  work: Path) -> dict | None:
    """Each file's KL divergence from ``model`` on the first ``n_chunks`` chunks of ``text``, by
    llama-perplexity (one base pass, one --kl-divergence pass per file); None when the text holds
    fewer than MIN_HELDOUT_CHUNKS chunks."""
    from ggufopt_ray.engine.native import default_threads

    tools = find_tools()
    common = ["-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(n_chunks), "-fa", "off", "-t", str(default_threads())]
    base = work / "heldout-base.kld"
    _, log = run_tool([str(tools / "llama-perplexity"), "-m", str(model), "-f", str(text), *common,
                       "--kl-divergence-base", str(base)])
    m = re.search(r"over (\d+) chunks", log)
    used = int(m.group(1)) if m else n_chunks
    if used < MIN_HELDOUT_CHUNKS:
        print(f"note: the held-out text holds {used} chunks of {n_ctx} (< {MIN_HELDOUT_CHUNKS}); not scored",
              file=sys.stderr)
        return None
    scores, lost = {}, 0
    for name, path in files.items():
        _, log, lost_here = kl_divergence_pass(tools, Path(path), base, common)
        scores[name] = kld_summary(parse_kld_output(log))
        lost += lost_here["runs"]
    return {"chunks": used, "scored_tokens": used * (n_ctx - n_ctx // 2), "lost_output_reruns": lost,
            "scores": scores}


def ratio_with_se(a: dict, b: dict) -> tuple[float, float]:
    """a's mean KLD over b's and its standard error (delta method, the two means taken as
    independent: conservative, as files scored on the same chunks err together)."""
    r = a["kld_mean"] / b["kld_mean"]
    return r, r * math.hypot(a["kld_mean_se"] / a["kld_mean"], b["kld_mean_se"] / b["kld_mean"])


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
    ap.add_argument("--local-steps", type=int, default=2, help="with --local-bases: neighbouring types measured per "
                    "group on each size class's own stock type, below and above (search.local_steps; default 2)")
    ap.add_argument("--refine-rounds", type=int, default=2, help="times the singles the predicted best mixes use "
                    "are measured again on every chunk before the loop (search.refine_rounds; default 2)")
    ap.add_argument("--confirm", type=int, default=3, help="the best this many measured files per size class are "
                    "measured on every chunk before the recommendation (search.confirm; default 3)")
    ap.add_argument("--imatrix", action=argparse.BooleanOptionalAction, default=None,
                    help="every candidate, the stock types too, with an importance matrix of --calib-chunks "
                    "calibration chunks, as publishers quantize (lets --types include IQ4_XS and other IQ types; "
                    "default on, off with --quick)")
    ap.add_argument("--calib-chunks", type=int, default=None, help="calibration chunks (default 1, 8 with --imatrix)")
    ap.add_argument("--eval-chunks", type=int, default=None, help="evaluation chunks the sweep selects and scores on "
                    "(default 16, 8 with --quick)")
    ap.add_argument("--heldout-chunks", type=int, default=None, help="chunks of held-out text (documents no chunk of "
                    "the sweep drew on) that llama-perplexity scores the recommended and stock files on (default "
                    "128, 32 with --quick; 0: no held-out score)")
    args = ap.parse_args(argv)
    quick = args.quick or not (SHARED / "tinycode-a-f16.gguf").exists()
    args.bands = args.bands if args.bands is not None else (2 if quick else 4)
    args.local_bases = args.local_bases if args.local_bases is not None else not quick
    args.imatrix = args.imatrix if args.imatrix is not None else not quick
    args.heldout_chunks = args.heldout_chunks if args.heldout_chunks is not None else (32 if quick else 128)
    if args.heldout_chunks:
        find_tools()  # before the sweep: a missing tool is said now, not after it

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
        cfg.dataset.eval_chunks = args.eval_chunks or 8
        alloc = search_config("allocate", types=["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"], sizes=SIZES,
                              n_bands=args.bands, max_measurements=8, imatrix=args.imatrix,
                              local_bases=args.local_bases, local_steps=args.local_steps,
                              refine_rounds=args.refine_rounds, confirm=args.confirm)
    else:
        model_name = "tinycode-a-f16 (trained, vocab 8192)"
        cfg.model.path = str(SHARED / "tinycode-a-f16.gguf")
        cfg.model.n_ctx = cfg.model.n_batch = cfg.model.n_ubatch = 256
        cfg.dataset.source, cfg.dataset.path, cfg.dataset.langs = "local", str(SHARED / "corpus" / "eval.txt"), ["text"]
        cfg.dataset.eval_chunks = args.eval_chunks or 16
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
    heldout = None
    if args.heldout_chunks:
        t2 = time.perf_counter()
        n_docs = heldout_text(cfg, work / "cache", work / "heldout.txt")
        files = {f"{size} {side}": d[side]["path"] for size, d in per_size.items() for side in ("stock", "allocated")}
        if tpe_confirmed:
            files["tpe"] = tpe_confirmed["path"]
        heldout = score_heldout(Path(cfg.model.path), work / "heldout.txt", files, n_ctx, args.heldout_chunks, work)
        if heldout is not None:
            sc = heldout.pop("scores")
            h_ratio, h_se = {}, {}
            for size in per_size:
                h_ratio[size], h_se[size] = ratio_with_se(sc[f"{size} allocated"], sc[f"{size} stock"])
            heldout = {"judge": "llama-perplexity --kl-divergence (llama.cpp's own tool)", "documents": n_docs,
                       "n_ctx": n_ctx, **heldout, "seconds": round(time.perf_counter() - t2, 1),
                       "kld_ratio_vs_stock": {**h_ratio, "worst": max(h_ratio.values()) if h_ratio else None},
                       "kld_ratio_se": h_se,
                       "per_size": {size: {"stock": sc[f"{size} stock"], "allocated": sc[f"{size} allocated"]}
                                    for size in per_size},
                       "vs_tpe": ({"tpe_best": sc["tpe"], "allocator_q4_k_m": sc.get("Q4_K_M allocated"),
                                   "allocator_lower": ("Q4_K_M allocated" in sc
                                                       and sc["Q4_K_M allocated"]["kld_mean"] < sc["tpe"]["kld_mean"])}
                                  if "tpe" in sc else None)}

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
        "heldout": heldout,
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
    if heldout is not None:
        print(f"held out ({heldout['judge']}; {heldout['chunks']} chunks of {n_ctx} from {heldout['documents']} "
              "documents no chunk of the sweep drew on):")
        print("| size | stock KLD | allocated KLD | KLD ratio |")
        print("|---|---:|---:|---:|")
        for size, d in heldout["per_size"].items():
            print(f"| {size} | {format_kld(d['stock']['kld_mean'], d['stock']['kld_mean_se'])} | "
                  f"{format_kld(d['allocated']['kld_mean'], d['allocated']['kld_mean_se'])} | "
                  f"{heldout['kld_ratio_vs_stock'][size]:.3f} ± {heldout['kld_ratio_se'][size]:.3f} |")
        v = heldout["vs_tpe"]
        if v and v["allocator_q4_k_m"]:
            print(f"held-out vs TPE: TPE best {v['tpe_best']['kld_mean']:.5f}, allocator "
                  f"{v['allocator_q4_k_m']['kld_mean']:.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
