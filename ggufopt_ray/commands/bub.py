"""``ggufopt bub MODEL``: the n_batch/n_ubatch pair that makes all-logits generation fastest.

The original toolkit's best_bub, corrected: it times the same all-positions logits generation the
baseline and candidate runs use, excludes model loading from the clock, skips configurations that
would not fit in memory, reports any winner (the llama.cpp default included) together with the
configurations within a few percent of it, and caches the answer per model, context, threads and
hardware so that a sweep asks only once.
"""

from __future__ import annotations

import json


def _config(text: str):
    from ggufopt_ray.errors import UserError

    try:
        b, u = (int(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        raise UserError(f"--config takes BATCH,UBATCH (e.g. 512,128), not {text!r}")
    return b, u


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bub",
        help="find the fastest n_batch/n_ubatch for logits generation (Optuna search, cached)",
        description="Search n_ubatch <= n_batch <= --ctx (powers of two from --min-size, plus --ctx) "
        "for the highest all-logits throughput in tokens/s, as logits generation runs. The llama.cpp "
        "default (n_batch 2048, n_ubatch 512, clipped to the context) is measured first. Prints the "
        "best configuration and those within --near-best percent of it. The answer is cached per "
        "model, context, threads and hardware; --grid measures every configuration instead and "
        "--config measures only the given ones.",
    )
    p.add_argument("model", help="path of a .gguf file")
    p.add_argument("--ctx", type=int, default=512, help="context = chunk length in tokens (default 512)")
    p.add_argument("--trials", type=int, default=None,
                   help="configurations to measure (default: about 2*log2 of the space, at least 6)")
    p.add_argument("--chunks", type=int, default=5, help="timed chunks per configuration (default 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")
    p.add_argument("--flash-attn", action="store_true", help="use flash attention")
    p.add_argument("--memory-budget", default=None,
                   help="skip configurations estimated above this much memory: 8G, 512M, bytes, or a "
                   "fraction <= 1 of the memory available now (default 0.8)")
    p.add_argument("--min-size", type=int, default=16, help="smallest batch/ubatch tried (default 16)")
    p.add_argument("--near-best", type=float, default=5.0,
                   help="list configurations within this many percent of the best (default 5)")
    p.add_argument("--seed", type=int, default=42, help="seed of the TPE sampler and the tokens (default 42)")
    p.add_argument("--grid", action="store_true", help="measure every configuration (no search, no cache)")
    p.add_argument("--config", action="append", default=None, metavar="BATCH,UBATCH",
                   help="measure only this configuration (repeatable; any sizes with UBATCH <= BATCH <= --ctx)")
    p.add_argument("--cache-dir", default=None,
                   help="where results are cached (default bub/ in $GGUFOPT_CACHE_DIR or ~/.cache/ggufopt_ray)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from ggufopt_ray.tuning import bub

    budget = bub.parse_memory_budget(args.memory_budget)
    if args.chunks < 1:
        from ggufopt_ray.errors import UserError
        raise UserError(f"--chunks must be at least 1, not {args.chunks}")
    common = dict(n_chunks=args.chunks, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                  flash_attn=args.flash_attn, memory_budget=budget, near_best_pct=args.near_best,
                  seed=args.seed, progress=True)
    if args.config:
        configs = [_config(c) for c in args.config]
        result = bub.measure_configs(args.model, configs, n_ctx=args.ctx, **common)
    elif args.grid:
        result = bub.grid_bub(args.model, n_ctx=args.ctx, min_size=args.min_size, **common)
    else:
        result = bub.search_bub(args.model, n_ctx=args.ctx, n_trials=args.trials, min_size=args.min_size,
                                cache_dir=args.cache_dir, use_cache=not args.no_cache, **common)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(bub.format_bub_result(result))
        if result.from_cache:
            print(f"(cached result from {result.cache_path}; --no-cache measures again)")
    return 0
