"""Tokens/s of the logits engine vs a bare llama-cpp-python eval loop on the same model.

Both sides load the same model with the same n_ctx/n_batch/n_ubatch/threads and produce an owned
float32 array of all-position logits per chunk. They are timed alternately, round after round,
so machine noise hits both equally; the figure that matters is the ratio (target >= 0.95).

    python bench/logits_throughput.py [--quick] [--json PATH] [--model GGUF]

Without --quick and without --model it uses ../shared/models/tinycode-a-f32.gguf when present
(a trained 7.3M-parameter model, vocab 8192) and says so when it is missing.
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

SHARED_MODEL = ROOT.parent / "shared" / "models" / "tinycode-a-f32.gguf"


def bare_loop(llm, chunks):
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk.tolist())
        out.append(np.array(llm.scores[: len(chunk)], dtype=np.float32))
    return out


def engine_loop(engine, chunks):
    return [engine.logits(chunk) for chunk in chunks]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny synthetic model, few chunks (~1 min)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--model", help="GGUF to measure (default: see module docstring)")
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from llama_cpp import Llama

    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.engine.native import default_threads
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model = Path(args.model)
    elif not args.quick and SHARED_MODEL.exists():
        model = SHARED_MODEL
    else:
        if not args.quick:
            print(f"note: {SHARED_MODEL} not found; using the synthetic model", file=sys.stderr)
        model = write_synthetic_model(Path(tmp.name) / "tiny.gguf", SynthSpec(seed=0))
    n_ctx = args.ctx or (256 if args.quick else 512)
    n_chunks = args.chunks or (4 if args.quick else 8)
    rounds = args.rounds or (5 if args.quick else 7)
    threads = args.threads or default_threads()
    settings = RuntimeSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=threads)

    engine = LogitsEngine(model, settings)
    rng = np.random.default_rng(0)
    chunks = [engine.prepare_chunk(rng.integers(3, engine.n_vocab, n_ctx, dtype=np.int32))
              for _ in range(n_chunks)]
    llm = Llama(str(model), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)

    # Same numbers first: a speed comparison of different computations would mean nothing.
    a, b = engine_loop(engine, chunks[:1])[0], bare_loop(llm, chunks[:1])[0]
    max_diff = float(np.abs(a - b).max())
    engine_loop(engine, chunks)  # warm-up both
    bare_loop(llm, chunks)

    t_engine, t_bare = [], []
    for r in range(rounds):
        order = (engine_loop, bare_loop) if r % 2 == 0 else (bare_loop, engine_loop)
        for fn in order:
            t0 = time.perf_counter()
            fn(engine if fn is engine_loop else llm, chunks)
            (t_engine if fn is engine_loop else t_bare).append(time.perf_counter() - t0)
    tokens = n_ctx * n_chunks
    engine_tps = tokens / float(np.median(t_engine))
    bare_tps = tokens / float(np.median(t_bare))
    result = {
        "model": str(model), "n_ctx": n_ctx, "chunks": n_chunks, "rounds": rounds, "threads": threads,
        "n_vocab": engine.n_vocab, "max_abs_logit_diff": max_diff,
        "engine_tokens_per_s": engine_tps, "bare_tokens_per_s": bare_tps, "ratio": engine_tps / bare_tps,
    }
    print(f"model {model.name}  n_ctx {n_ctx}  chunks {n_chunks}  rounds {rounds}  threads {threads}")
    print(f"{'loop':<10} {'median s':>10} {'tokens/s':>12}")
    print(f"{'engine':<10} {np.median(t_engine):>10.4f} {engine_tps:>12.1f}")
    print(f"{'bare':<10} {np.median(t_bare):>10.4f} {bare_tps:>12.1f}")
    print(f"ratio engine/bare = {result['ratio']:.3f} (target >= 0.95); max |logit diff| = {max_diff:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    engine.close()
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
