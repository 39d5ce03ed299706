"""``ggufopt bench``: a candidate model judged chunk by chunk against a stored baseline.

The successor of the original kl_d_bench: the candidate's logits are computed per chunk and
compared at once with the baseline store; per-token results are committed to a results store (so
a rerun resumes), running statistics are printed, and with ``--early-stopping`` the run ends as
soon as the chosen statistic's confidence interval is narrow enough.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_stopping_args(p) -> None:
    g = p.add_argument_group("early stopping")
    g.add_argument("--early-stopping", action="store_true",
                   help="stop once the target's confidence interval is narrower than --margin")
    g.add_argument("--target", default="composite",
                   help="statistic to pin down: mean, median, p90, p95, p99, composite (default composite)")
    g.add_argument("--confidence", type=float, default=0.95, help="confidence of the interval (default 0.95)")
    g.add_argument("--margin", type=float, default=0.1,
                   help="stop when the interval half-width is below this fraction of the estimate (default 0.1)")
    g.add_argument("--min-chunks", type=int, default=4, help="never stop before this many chunks (default 4)")


def register(subparsers) -> None:
    from ggufopt_ray.commands.logits import add_runtime_args

    p = subparsers.add_parser(
        "bench",
        help="evaluate a candidate model against a baseline store, chunk by chunk, with early stopping",
        description="Compute the candidate's logits on the baseline's own chunks and compare them "
        "with the stored baseline: per-token KL-divergence, top-1 agreement, delta-p and NLL, "
        "committed per chunk to a results store (a rerun resumes). Prints running statistics.",
    )
    p.add_argument("model", help="candidate GGUF")
    p.add_argument("--baseline", required=True, help="baseline store from `ggufopt logits`")
    p.add_argument("--output", "-o", required=True, help="results store directory")
    p.add_argument("--to-chunk", type=int, default=None, help="last chunk to evaluate (inclusive)")
    p.add_argument("--candidate-store", default=None,
                   help="also keep the candidate's log-probs (exact) in this store")
    p.add_argument("--keep", type=int, default=None,
                   help="bounded disk: keep only the last N chunks in --candidate-store")
    p.add_argument("--overwrite", action="store_true", help="delete an existing results store first")
    p.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    add_stopping_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run, ctx=None)


def stopping_config(args):
    from ggufopt_ray.config import MetricsConfig

    return MetricsConfig(early_stopping=args.early_stopping, target=args.target, confidence=args.confidence,
                         margin=args.margin, min_chunks=args.min_chunks)


def run(args) -> int:
    import json

    from tqdm import tqdm

    from ggufopt_ray.commands.stats import format_summary
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.evaluation import evaluate_candidate, stop_decision, summarize_run
    from ggufopt_ray.gguf.inspect import inspect_model, model_fingerprint
    from ggufopt_ray.store.baseline import BaselineStore, recorded_tensor_signature, tensor_signature
    from ggufopt_ray.store.results import ResultsStore

    base = BaselineStore.open(args.baseline)
    h = base.header
    info = inspect_model(args.model)
    if info.vocab_fingerprint != h["vocab_fingerprint"] or info.vocab_size != h["n_vocab"]:
        raise UserError(f"{args.model} has another vocabulary than the baseline in {args.baseline} "
                        f"({info.vocab_fingerprint} vs {h['vocab_fingerprint']}); candidates must share the tokenizer")
    # A candidate must be made from the baseline's model: same architecture, tensor names and
    # shapes. Another model that shares the tokenizer would give a meaningless (huge) KLD.
    base_sig = recorded_tensor_signature(h)
    if base_sig is not None and tensor_signature(args.model) != base_sig:
        raise UserError(f"{args.model} is not made from the model of the baseline in {args.baseline} "
                        f"({h.get('model_path', 'unknown')}): its architecture or tensor names/shapes differ; "
                        "bench candidates quantized from that model, or compute a baseline of this model's base")
    n = base.n_chunks
    have = base.n_leading()  # a baseline computed for its first chunks only is usable for those
    if have == 0:
        raise UserError(f"the baseline in {args.baseline} has no computed chunks yet; "
                        f"compute them with `ggufopt logits ... -o {args.baseline}`")
    if args.to_chunk is None:
        last = have - 1
        if have < n:
            print(f"note: the baseline has chunks 0..{have - 1} of its {n}; evaluating those")
    else:
        last = args.to_chunk
        if not 0 <= last < n:
            raise UserError(f"--to-chunk {last} is outside the baseline's {n} chunks (0..{n - 1})")
        if last >= have:
            raise UserError(f"--to-chunk {last} needs baseline chunks up to {last}, but {args.baseline} has "
                            f"0..{have - 1}; compute more with `ggufopt logits ... --to {last}` or lower --to-chunk")
    if args.keep is not None and not args.candidate_store:
        raise UserError("--keep bounds --candidate-store; give --candidate-store DIR too")
    n_ctx = int(h["n_ctx"])
    batch = args.batch or n_ctx
    settings = RuntimeSettings(n_ctx=n_ctx, n_batch=batch, n_ubatch=args.ubatch or min(batch, 512),
                               n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                               flash_attn=args.flash_attn, verbose=args.verbose)
    cand_fp = model_fingerprint(args.model)
    results = ResultsStore.create_or_open(args.output, {
        "baseline_id": base.baseline_id, "candidate": {"model_fingerprint": cand_fp, "path": str(Path(args.model).resolve())},
        "imatrix_hash": None, "encoding": h["encoding"], "first": h["first"]}, overwrite=args.overwrite)
    for path, problem in results.discard_damaged(range(last + 1)):
        print(f"ggufopt bench: warning: {path} was damaged ({problem}); recomputing it", file=sys.stderr)
    cand_store = None
    if args.candidate_store:
        from ggufopt_ray.evaluation import encoding_params

        cand_store = BaselineStore.create_or_open(args.candidate_store, {
            **{k: h[k] for k in ("vocab_fingerprint", "corpus_fingerprint", "n_ctx", "n_vocab", "first", "n_chunks")},
            "model_fingerprint": cand_fp, "encoding": "exact", "encoding_params": encoding_params("exact")})
    cfg = stopping_config(args)
    t0 = time.perf_counter()
    bar = tqdm(total=last + 1, desc="bench", unit="chunk", file=sys.stderr, disable=None)

    def keep_logprobs(i, tokens, logprobs):
        cand_store.write_payload(i, tokens, {"logprobs": logprobs})
        if args.keep:
            cand_store.dir.keep_last(args.keep)

    def progress(i, run):
        bar.update(1)
        if len(run.per_chunk) >= 2:
            s = summarize_run(run.per_chunk, n_boot=0).overall
            bar.set_postfix_str(f"KLD {s.kld_mean:.5f}±{s.kld_mean_se:.5f} top1 {100 * s.same_top:.1f}%")

    try:
        run = evaluate_candidate(last + 1, base.read_tokens, base.read_payload, results,
                                 lambda: LogitsEngine(args.model, settings), h["encoding"], int(h["first"]),
                                 stop_rule=lambda per_chunk: stop_decision(per_chunk, cfg), on_chunk=progress,
                                 keep_logprobs=keep_logprobs if cand_store is not None else None)
    finally:
        bar.close()
    per_chunk, reason = run.per_chunk, run.reason
    summary = summarize_run(per_chunk)
    if args.json:
        print(json.dumps({"chunks": len(per_chunk), "stop_reason": reason, **summary.to_flat_dict()}, indent=2))
    else:
        print(format_summary(summary, title=f"{Path(args.model).name} vs {Path(args.baseline).name}"))
        print(f"{len(per_chunk)} chunks ({reason}) in {time.perf_counter() - t0:.1f} s; results in {args.output}")
    return 0
