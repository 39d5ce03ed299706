"""How good is the batch/ubatch search? Optuna TPE against an exhaustive grid.

For each model: measure every configuration (the grid), run the search (no cache), then
re-measure the search's winner and the grid's winner alternately, ``--rounds`` times, in this one
run (the first measurements of each are biased: a grid's maximum over noisy values is an
overestimate). Reports throughput of found / grid best, how many configurations the search
measured, and the grid size. Throughput is the median of per-chunk tokens/s over all rounds
(the tuner's own statistic; robust to bursts of contention on a shared machine). Models: the synthetic tiny model, plus
../shared/models/tinycode-a-f16.gguf when present (not with --quick).

    python bench/bub_search.py [--quick] [--json PATH] [--threads N]

JSON keys (for the tiny model): found_over_grid_best, evaluations, grid_size; per model under
"models".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINYCODE = ROOT.parent / "shared" / "models" / "tinycode-a-f16.gguf"


def compare(model, n_ctx, n_chunks, rounds, threads, seed):
    from ggufopt_ray.tuning import bub

    t0 = time.perf_counter()
    grid = bub.grid_bub(model, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=threads, seed=seed)
    t_grid = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = bub.search_bub(model, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=threads, seed=seed,
                           use_cache=False)
    t_search = time.perf_counter() - t0
    f_cfg, g_cfg = found.best_config, grid.best_config
    default_cfg = bub.llama_default_config(n_ctx)
    dims = bub.ModelDims.from_gguf(model)
    chunks = bub.make_chunks(dims, n_ctx, n_chunks, seed=seed + 1)
    configs = list(dict.fromkeys([f_cfg, g_cfg, default_cfg]))
    rates = {c: [] for c in configs}
    for r in range(rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for c in order:
            rates[c].extend(bub.measure_config(model, n_ctx, c, chunks, n_threads=threads).chunk_tokens_per_s)
    tps = {c: float(np.median(rates[c])) for c in configs}
    return {
        "model": str(model), "n_ctx": n_ctx, "n_chunks": n_chunks, "threads": found.n_threads,
        "rounds": rounds,
        "found": f_cfg.label(), "grid_best": g_cfg.label(), "default": default_cfg.label(),
        "found_tokens_per_s": tps[f_cfg], "grid_best_tokens_per_s": tps[g_cfg],
        "default_tokens_per_s": tps[default_cfg],
        "found_over_grid_best": tps[f_cfg] / tps[g_cfg],
        "grid_best_over_default": tps[g_cfg] / tps[default_cfg],
        "found_over_default": tps[f_cfg] / tps[default_cfg],
        "evaluations": found.n_evaluations, "pruned": sum(e.status == "pruned" for e in found.evaluations),
        "grid_size": grid.grid_size,
        "search_seconds": t_search, "grid_seconds": t_grid,
        "grid_spread": (max(e.tokens_per_s for e in grid.evaluations)
                        / min(e.tokens_per_s for e in grid.evaluations)),
        "found_in_grid_near_best": f_cfg in {g_cfg} | {e.config for e in grid.near_best},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer rounds (~1 minute)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared 2-core machine 2 threads are erratic)")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_synthetic_model(Path(tmp) / "tiny-seed0-f32.gguf", SynthSpec(seed=0))
        plan = [("tiny", tiny, 256, 3 if args.quick else 5, 6 if args.quick else 8)]
        if not args.quick and TINYCODE.is_file():
            plan.append(("tinycode-a-f16", TINYCODE, 512, 3, 6))
        for name, model, n_ctx, n_chunks, rounds in plan:
            print(f"[{name}] grid + search at n_ctx {n_ctx} ...", file=sys.stderr, flush=True)
            row = compare(model, n_ctx, n_chunks, rounds, args.threads, args.seed)
            row["name"] = name
            rows.append(row)

    head = (f"{'model':<15} {'ctx':>4} {'found':>8} {'grid best':>9} {'found/grid':>10} "
            f"{'grid/default':>12} {'evals':>5} {'pruned':>6} {'grid':>4} {'search s':>8} {'grid s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<15} {r['n_ctx']:>4} {r['found']:>8} {r['grid_best']:>9} "
              f"{r['found_over_grid_best']:>10.3f} {r['grid_best_over_default']:>12.3f} {r['evaluations']:>5} "
              f"{r['pruned']:>6} {r['grid_size']:>4} {r['search_seconds']:>8.1f} {r['grid_seconds']:>7.1f}")
    print(f"(throughput ratios re-measured alternately, {rows[0]['rounds']}+ rounds; threads {rows[0]['threads']})")
    if args.json:
        first = rows[0]
        out = {"found_over_grid_best": first["found_over_grid_best"], "evaluations": first["evaluations"],
               "grid_size": first["grid_size"], "models": {r["name"]: r for r in rows}}
        tmp = Path(args.json + ".partial")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
