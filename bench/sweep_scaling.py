"""Wall time of 8 quantize+compare trials with 1 vs 2 concurrent single-threaded trial workers.

One local Ray instance; the baseline is computed once and shared by every run through the
store and the object store (``baseline_computations`` counts how often it was computed). Each
run starts with empty candidate and results caches so that both configurations do the same
work; runs alternate (1, 2, 1, 2, ...) and the medians are compared.

    python bench/sweep_scaling.py [--quick] [--json PATH] [--rounds N]

Without --quick the trials run on ../shared/models/tinycode-a-f32.gguf (a trained 7.3M-parameter
model) with 16 chunks of 512 tokens each, so that a trial's work, not Ray's bookkeeping, dominates.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_MODEL = ROOT.parent / "shared" / "models" / "tinycode-a-f32.gguf"

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 chunks of 128 tokens per trial (~1 min)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 1 quick, 2 full)")
    args = ap.parse_args(argv)

    from ggufopt_ray.config import SweepConfig
    from ggufopt_ray.distributed.runtime import start_ray
    from ggufopt_ray.sweep import run_sweep

    rounds = args.rounds or (1 if args.quick else 2)
    work = Path(tempfile.mkdtemp(prefix="sweep-scaling-"))
    cfg = SweepConfig()
    cfg.cache_dir = str(work / "cache")
    n_ctx = 128 if args.quick else 512
    cfg.model.n_ctx = cfg.model.n_batch = cfg.model.n_ubatch = n_ctx
    cfg.dataset.eval_chunks = 4 if args.quick else 16
    if not args.quick:
        if SHARED_MODEL.exists():
            cfg.model.path = str(SHARED_MODEL)
        else:
            print(f"note: {SHARED_MODEL} not found; using the synthetic model", file=sys.stderr)
    cfg.dataset.calib_chunks = 1
    cfg.metrics.early_stopping = False
    cfg.search.types = TYPES
    cfg.cluster.num_cpus, cfg.cluster.dashboard, cfg.cluster.trial_cpus = 2, False, 1
    start_ray(cfg.cluster)
    walls = {1: [], 2: []}
    computed = 0
    for r in range(rounds):
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
            for sub in ("candidates", "results"):
                shutil.rmtree(Path(cfg.cache_dir) / sub, ignore_errors=True)
            cfg.cluster.max_concurrent_trials = workers
            res = run_sweep(cfg, work / f"out-{r}-{workers}", resume=False, log=lambda *a: None)
            if res.errors or len(res.rows) != len(TYPES):
                raise SystemExit(f"sweep failed: {res.errors}")
            computed += res.baseline["computed"]
            walls[workers].append(res.baseline["trials_seconds"])
    w1, w2 = statistics.median(walls[1]), statistics.median(walls[2])
    out = {"model": cfg.model.path or "synthetic", "trials": len(TYPES), "chunks_per_trial": cfg.dataset.eval_chunks, "n_ctx": n_ctx, "rounds": rounds,
           "wall_1_worker_s": w1, "wall_2_workers_s": w2, "ratio": w1 / w2,
           "baseline_computations": 1 if computed else 0, "baseline_chunks_computed": computed,
           "runs": {str(k): v for k, v in walls.items()}}
    print(f"{'workers':>8} {'median wall s':>14}")
    print(f"{1:>8} {w1:>14.2f}")
    print(f"{2:>8} {w2:>14.2f}")
    print(f"speed-up 2 vs 1 workers: {w1 / w2:.2f}x; baseline computed once "
          f"({computed} chunks) for {2 * rounds} sweeps")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
