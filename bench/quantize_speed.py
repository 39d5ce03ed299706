"""Seconds of in-process quantization (llama_model_quantize) per type.

Each round quantizes the model once to every type, in turn, so machine noise hits all types
alike; the figure per type is the median over rounds, and ratios are given against Q8_0. IQ2_XS
gets an importance matrix collected first (not timed). A dry run (plan only) is timed too.

    python bench/quantize_speed.py [--quick] [--json PATH] [--threads N] [--rounds N]

--quick: the synthetic tiny model only (~2.1M parameters). Without it, also
../shared/models/tinycode-a-f32.gguf (7.3M parameters, trained) when present.
JSON: {"seconds": {TYPE: s}} for the tiny model, plus "seconds_by_model", "ratio_to_q8_0",
"bits_per_weight", "threads", "rounds".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_MODEL = ROOT.parent / "shared" / "models" / "tinycode-a-f32.gguf"
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "IQ2_XS"]


def measure(model: Path, out_dir: Path, rounds: int, threads: int, n_vocab: int) -> dict:
    from ggufopt_ray.engine.imatrix import collect_imatrix
    from ggufopt_ray.engine.quantize import quantize_model

    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, n_vocab, size=128).astype(np.int32) for _ in range(4)]
    imatrix = collect_imatrix(model, chunks, n_threads=threads)
    times: dict[str, list[float]] = {t: [] for t in TYPES + ["dry-run"]}
    bpw: dict[str, float] = {}
    for _ in range(rounds):
        for qtype in TYPES:
            im = imatrix if qtype == "IQ2_XS" else None
            r = quantize_model(model, qtype, out_dir / f"{model.stem}-{qtype}.gguf", imatrix=im,
                               threads=threads, overwrite=True)
            times[qtype].append(r.seconds)
            bpw[qtype] = r.bits_per_weight
        t0 = time.perf_counter()
        quantize_model(model, "Q4_K_M", dry_run=True, threads=threads)
        times["dry-run"].append(time.perf_counter() - t0)
    return {"seconds": {t: statistics.median(v) for t, v in times.items()},
            "spread": {t: (min(v), max(v)) for t, v in times.items()}, "bits_per_weight": bpw}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny synthetic model only (~1 min)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="quantization threads (default: all CPUs)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all types (default 3)")
    args = ap.parse_args(argv)

    from ggufopt_ray.engine.native import default_threads
    from ggufopt_ray.gguf.inspect import inspect_model
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    threads = args.threads or default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"tiny": write_synthetic_model(tmp / "tiny-f32.gguf", SynthSpec(seed=0))}
        if not args.quick:
            if SHARED_MODEL.exists():
                models["tinycode-a-f32"] = SHARED_MODEL
            else:
                print(f"note: {SHARED_MODEL} not found; measuring the tiny model only", file=sys.stderr)
        by_model = {}
        for label, path in models.items():
            info = inspect_model(path)
            print(f"{label}: {info.n_params:,} parameters, {threads} threads, {args.rounds} rounds", file=sys.stderr)
            by_model[label] = measure(Path(path), tmp, args.rounds, threads, info.vocab_size)

    print(f"{'model':<16} {'type':<8} {'seconds':>9} {'min':>8} {'max':>8} {'x Q8_0':>8} {'bpw':>7}")
    ratios = {}
    for label, m in by_model.items():
        q8 = m["seconds"]["Q8_0"]
        ratios[label] = {t: s / q8 for t, s in m["seconds"].items()}
        for t, s in m["seconds"].items():
            lo, hi = m["spread"][t]
            bpw = m["bits_per_weight"].get(t)
            print(f"{label:<16} {t:<8} {s:>9.4f} {lo:>8.4f} {hi:>8.4f} {s / q8:>8.2f} "
                  f"{(f'{bpw:.3f}' if bpw else '-'):>7}")
    result = {
        "seconds": by_model["tiny"]["seconds"],
        "seconds_by_model": {k: v["seconds"] for k, v in by_model.items()},
        "ratio_to_q8_0": ratios,
        "bits_per_weight": {k: v["bits_per_weight"] for k, v in by_model.items()},
        "threads": threads,
        "rounds": args.rounds,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
