"""``ggufopt compare BASELINE CANDIDATE``: two stores of log-probabilities compared chunk by chunk.

The successor of the original compare_logits, for when the candidate's log-probs were stored
first (``ggufopt logits`` on the candidate with the exact encoding, e.g. on another machine).
Both stores must hold the same tokens and vocabulary; anything else is refused.
"""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    from ggufopt_ray.commands.bench import add_stopping_args

    p = subparsers.add_parser(
        "compare",
        help="compare a candidate's stored log-probs with a baseline store (KLD statistics)",
        description="Read both stores chunk by chunk, check that tokens and vocabulary match, and "
        "commit per-token KL-divergence, top-1 agreement, delta-p and NLL to a results store.",
    )
    p.add_argument("baseline", help="baseline store")
    p.add_argument("candidate", help="candidate store (exact or float16 encoding)")
    p.add_argument("--output", "-o", required=True, help="results store directory")
    p.add_argument("--from", dest="from_chunk", type=int, default=0, help="first chunk (inclusive)")
    p.add_argument("--to", dest="to_chunk", type=int, default=None, help="last chunk (inclusive)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing results store first")
    add_stopping_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ggufopt_ray.commands.bench import stopping_config
    from ggufopt_ray.commands.stats import format_summary
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.evaluation import compare_logits, stop_decision, summarize_run
    from ggufopt_ray.metrics.encodings import get_encoding
    from ggufopt_ray.store.baseline import BaselineStore
    from ggufopt_ray.store.results import ResultsStore

    base, cand = BaselineStore.open(args.baseline), BaselineStore.open(args.candidate)
    hb, hc = base.header, cand.header
    for key in ("vocab_fingerprint", "n_vocab", "n_ctx", "first", "corpus_fingerprint"):
        if hb.get(key) != hc.get(key):
            raise UserError(f"the stores differ in {key} ({hb.get(key)!r} vs {hc.get(key)!r}); "
                            "compute the candidate on the baseline's chunks with the same settings")
    if hc["encoding"] not in ("exact", "float16"):
        raise UserError(f"the candidate store uses the {hc['encoding']!r} encoding, which does not keep full "
                        "log-probs; recompute it with --encoding exact")
    n = base.n_chunks
    last = n - 1 if args.to_chunk is None else args.to_chunk
    if not 0 <= args.from_chunk <= last < n:
        raise UserError(f"chunk range {args.from_chunk}..{last} is outside the {n} chunks")
    results = ResultsStore.create_or_open(args.output, {
        "baseline_id": base.baseline_id, "candidate": {"store": str(cand.root), "baseline_id": cand.baseline_id},
        "imatrix_hash": None, "encoding": hb["encoding"], "first": hb["first"]}, overwrite=args.overwrite)
    cfg = stopping_config(args)
    per_chunk, reason = [], "all_chunks"
    for i in tqdm(range(args.from_chunk, last + 1), desc="compare", unit="chunk", file=sys.stderr, disable=None):
        if results.has(i):
            metrics = results.read(i)
        else:
            if not cand.has(i) or not base.has(i):
                raise UserError(f"chunk {i} is missing from {'the candidate' if base.has(i) else 'the baseline'} store; "
                                "compute it first or lower --to")
            tokens = base.read_tokens(i)
            cand.check_tokens(i, tokens)
            rows = get_encoding(hc["encoding"]).decode_logprobs(cand.read_payload(i), int(hc["n_vocab"]))
            metrics = compare_logits(rows, tokens, base.read_payload(i), hb["encoding"], int(hb["first"]))
            results.write(i, metrics)
        per_chunk.append(metrics)
        stop, why = stop_decision(per_chunk, cfg)
        if stop and i < last:
            reason = why
            break
    print(format_summary(summarize_run(per_chunk), title=f"{args.candidate} vs {args.baseline}"))
    print(f"{len(per_chunk)} chunks ({reason}); results in {args.output}")
    return 0
