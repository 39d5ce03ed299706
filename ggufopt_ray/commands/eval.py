"""``ggufopt eval MODEL``: run a model over text or token ids and summarise its predictions.

A quick check that a model loads and predicts sensibly with given runtime settings: per chunk
the number of tokens, the mean entropy of the next-token distribution and the perplexity on the
text itself; optionally the raw logits are saved for inspection.
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on text or token ids: logits per position, entropy, perplexity",
        description="Tokenize the input, cut it into chunks of --ctx tokens (the first token of each "
        "chunk becomes BOS when the model adds one, as llama-perplexity does), and compute the "
        "logits of every position. Prints one line per chunk and the overall perplexity.",
    )
    p.add_argument("model", help="path of a .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to evaluate")
    src.add_argument("--text-file", help="file whose text to evaluate")
    src.add_argument("--tokens", help="comma-separated token ids (one chunk)")
    p.add_argument("--ctx", type=int, default=256, help="context / chunk length in tokens (default 256)")
    p.add_argument("--batch", type=int, default=None, help="n_batch (default: --ctx)")
    p.add_argument("--ubatch", type=int, default=None, help="n_ubatch (default: --batch)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")
    p.add_argument("--flash-attn", action="store_true", help="use flash attention")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many chunks")
    p.add_argument("--save", help="write the logits of all chunks to this .npy file")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log output")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.errors import UserError

    batch = args.batch or args.ctx
    settings = RuntimeSettings(n_ctx=args.ctx, n_batch=batch, n_ubatch=args.ubatch or batch,
                               n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                               flash_attn=args.flash_attn, verbose=args.verbose)
    if args.text_file and not Path(args.text_file).is_file():
        raise UserError(f"text file {args.text_file} does not exist")
    with LogitsEngine(args.model, settings) as engine:
        if args.tokens is not None:
            try:
                ids = [int(t) for t in args.tokens.split(",") if t.strip()]
            except ValueError:
                raise UserError("--tokens must be comma-separated integers, e.g. --tokens 1,450,22")
            chunks = [np.asarray(ids, dtype=np.int32)]
        else:
            text = args.text if args.text is not None else Path(args.text_file).read_text(errors="replace")
            stream = engine.tokenize(text, add_bos=bool(engine.add_bos))
            if stream.size == 0:
                raise UserError("the text is empty: nothing to evaluate")
            chunks = [stream[i:i + args.ctx] for i in range(0, stream.size, args.ctx)]
            chunks = [engine.prepare_chunk(c) for c in chunks]
        if args.chunks:
            chunks = chunks[: args.chunks]
        saved = []
        total_nll, total_scored = 0.0, 0
        for i, chunk in enumerate(chunks):
            logits = engine.logits(chunk)
            if i == 0:
                print(f"{'chunk':>5} {'tokens':>7} {'entropy':>9} {'ppl':>10}")
            if not np.isfinite(logits).all():
                raise RuntimeError(f"non-finite logits in chunk {i}")
            z = logits.astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            entropy = float(-(np.exp(logp) * logp).sum(axis=1).mean())
            nll = -logp[np.arange(len(chunk) - 1), chunk[1:]] if len(chunk) > 1 else np.zeros(0)
            total_nll += float(nll.sum())
            total_scored += nll.size
            ppl = float(np.exp(nll.mean())) if nll.size else float("nan")
            print(f"{i:>5} {len(chunk):>7} {entropy:>9.4f} {ppl:>10.3f}")
            if args.save:
                saved.append(logits)
        if total_scored:
            print(f"overall perplexity {np.exp(total_nll / total_scored):.4f} over {total_scored} predicted tokens")
        if args.save:
            tmp = args.save + ".partial.npy"
            np.save(tmp, np.concatenate(saved))
            Path(tmp).replace(args.save)
            print(f"saved logits to {args.save}", file=sys.stderr)
    return 0
