"""``ggufopt perplexity MODEL [MODEL...] --text-file F``: perplexity ± SE of one or more models.

The text is tokenized once (with the first model), cut into chunks of --ctx tokens with BOS
first, and every model is scored on the same tokens like llama-perplexity (second half of each
chunk). With several models the table adds ln(PPL/PPL_first) with a paired standard error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "perplexity",
        help="perplexity with standard errors of one or more models on a text, as llama-perplexity",
        description="Tokenize the text with the first model, cut it into chunks of --ctx tokens (first "
        "token replaced by BOS), and score the second half of each chunk (positions ctx/2 .. ctx-1) "
        "with every model. Prints PPL ± SE and ln(PPL) ± SE per model and, with several models, "
        "ln(PPL/PPL_first) ± SE from paired per-token differences. All models must share the vocabulary.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="paths of .gguf files; the first is the reference")
    p.add_argument("--text-file", required=True, help="text file to evaluate on")
    p.add_argument("--ctx", type=int, default=256, help="context / chunk length in tokens (default 256)")
    p.add_argument("--chunks", type=int, default=None, help="use at most this many chunks (default all)")
    p.add_argument("--first", type=int, default=None,
                   help="first scored logit position in each chunk (default ctx/2, as llama-perplexity; "
                   "0 scores every prediction)")
    p.add_argument("--batch", type=int, default=None, help="n_batch (default: --ctx)")
    p.add_argument("--ubatch", type=int, default=None, help="n_ubatch (default: --batch)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log output")
    p.set_defaults(func=run)


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if x is not None and math.isfinite(x) else "nan"


def run(args) -> int:
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.evaluate.perplexity import evaluate_perplexity, ln_ppl_ratio, scoring_start, text_chunks
    from ggufopt_ray.gguf.inspect import inspect_model

    if args.ctx < 2:
        raise UserError(f"--ctx must be at least 2, not {args.ctx}")
    if args.chunks is not None and args.chunks < 1:
        raise UserError(f"--chunks must be at least 1, not {args.chunks}")
    scoring_start(args.ctx, args.first)  # a bad --first fails before any model is loaded
    text_path = Path(args.text_file)
    if not text_path.is_file():
        raise UserError(f"text file {text_path} does not exist; check the path")
    infos = [inspect_model(m) for m in args.models]  # fails fast on a missing or damaged file
    for m, info in zip(args.models[1:], infos[1:]):
        if info.vocab_fingerprint != infos[0].vocab_fingerprint:
            raise UserError(f"{m} has another vocabulary than {args.models[0]} (fingerprint "
                            f"{info.vocab_fingerprint} vs {infos[0].vocab_fingerprint}); perplexities "
                            "over different tokens are not comparable")
    text = text_path.read_text(errors="replace")
    batch = args.batch or args.ctx
    settings = RuntimeSettings(n_ctx=args.ctx, n_batch=batch, n_ubatch=args.ubatch or batch,
                               n_threads=args.threads, n_gpu_layers=args.gpu_layers, verbose=args.verbose)
    chunks = None
    results = []
    for model in args.models:
        with LogitsEngine(model, settings) as engine:
            if chunks is None:
                chunks = text_chunks(engine, text, args.ctx, args.chunks)
            results.append(evaluate_perplexity(engine, chunks, args.first, progress=not args.json,
                                               model=model))
    ratios = [ln_ppl_ratio(r, results[0]) for r in results]

    if args.json:
        out = {"ctx": args.ctx, "chunks": len(chunks), "first": args.first,
               "settings": settings.to_dict(), "models": []}
        for r, (lr, lr_se) in zip(results, ratios):
            d = r.to_dict()
            d["ln_ppl_ratio"] = lr if math.isfinite(lr) else None
            d["ln_ppl_ratio_se"] = lr_se if math.isfinite(lr_se) else None
            out["models"].append(d)
        print(json.dumps(out, indent=2))
        return 0

    width = max(12, *(len(m) for m in args.models))
    print(f"{len(chunks)} chunks of {args.ctx} tokens, {results[0].n_tokens} scored tokens per model "
          f"(positions {args.first if args.first is not None else args.ctx // 2}..{args.ctx - 1} of each chunk)")
    header = f"{'model':<{width}} {'PPL':>10} {'± SE':>9} {'ln(PPL)':>9} {'± SE':>8} {'± SE chunks':>11}"
    if len(results) > 1:
        header += f" {'ln(PPL/PPL_1)':>14} {'± SE':>9}"
    print(header)
    for r, (lr, lr_se) in zip(results, ratios):
        line = (f"{r.model:<{width}} {_fmt(r.ppl, '10.4f')} {_fmt(r.ppl_se, '9.4f')} "
                f"{_fmt(r.ln_ppl, '9.5f')} {_fmt(r.ln_ppl_se, '8.5f')} {_fmt(r.ln_ppl_se_chunks, '11.5f')}")
        if len(results) > 1:
            line += f" {_fmt(lr, '14.6f')} {_fmt(lr_se, '9.6f')}"
        print(line)
    return 0
