"""``ggufopt speed MODEL [MODEL...]``: prompt-processing and generation tokens/s, llama-bench style.

So that size, quality and speed can be traded off together: ``pp`` and ``tg`` tests as llama-bench
runs them, and with ``--regimes`` the three workloads of the ZFP notes (a long prefill with one
generated token, an 80/20 prefill/generation split, a short prompt with a few hundred generated
tokens). Several models are measured round-robin, so their ratios hold on a noisy machine.
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "speed",
        help="tokens/s of models: llama-bench pp/tg tests and the prefill/mixed/generate regimes",
        description="Time prompt processing (--pp tokens decoded in n_batch pieces) and generation "
        "(--tg single-token steps) after one warm-up run, --reps times, and print mean ± sd, min and "
        "max tokens/s. --regimes adds three workloads of --regime-tokens tokens each: prefill "
        "(all but one token of prompt), mixed (80%% prompt, 20%% generated) and generate "
        "(1/16 prompt, the rest generated). With several models the reps interleave and the ratios "
        "to the first model are printed.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="path of a .gguf file (one or more)")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens of the pp test (0: skip; default 512)")
    p.add_argument("--tg", type=int, default=128, help="generated tokens of the tg test (0: skip; default 128)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per test (default 3)")
    p.add_argument("--regimes", action="store_true", help="also run the prefill/mixed/generate regimes")
    p.add_argument("--regime-tokens", type=int, default=512,
                   help="prompt + generated tokens of each regime (default 512)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--batch", type=int, default=2048, help="n_batch (default 2048, clipped to the context)")
    p.add_argument("--ubatch", type=int, default=512, help="n_ubatch (default 512, clipped to n_batch)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")
    p.add_argument("--flash-attn", action="store_true", help="use flash attention")
    p.add_argument("--greedy", action="store_true",
                   help="feed back the arg-max token instead of fixed random ids (adds an arg-max per step)")
    p.add_argument("--no-warmup", action="store_true", help="do not run each test once untimed first")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log output")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from tqdm import tqdm

    from ggufopt_ray.engine import speed
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.gguf.inspect import check_gguf_file

    for m in args.models:
        check_gguf_file(m)
    if args.ubatch > args.batch:
        raise UserError(f"--ubatch ({args.ubatch}) must not exceed --batch ({args.batch})")
    tests = speed.build_tests(pp=args.pp, tg=args.tg, regimes=args.regimes, regime_tokens=args.regime_tokens)
    if args.reps < 1:
        raise UserError(f"--reps must be at least 1, not {args.reps}")
    bars = []  # created at the first timed rep, so that input errors stay a single line

    def on_rep(model, test, rep):
        if not bars:
            bars.append(tqdm(total=len(tests) * args.reps * len(args.models), desc="speed", unit="rep",
                             file=sys.stderr, leave=False))
        bars[0].update(1)

    try:
        results = speed.measure_speeds(
            args.models, tests, reps=args.reps, n_threads=args.threads, n_batch=args.batch,
            n_ubatch=args.ubatch, n_gpu_layers=args.gpu_layers, flash_attn=args.flash_attn,
            greedy=args.greedy, warmup=not args.no_warmup, seed=args.seed, verbose=args.verbose,
            on_rep=on_rep)
    finally:
        for b in bars:
            b.close()
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results]}, indent=2))
    else:
        print(speed.format_speed_table(results))
    return 0
