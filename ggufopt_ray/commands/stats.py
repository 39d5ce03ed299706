"""``ggufopt stats RESULTS``: statistics of a results store, per chunk range and overall."""

from __future__ import annotations

import json


def _fmt(x, spec=".6f") -> str:
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return "-"


def format_summary(summary, title: str = "") -> str:
    """The statistics block a person reads: llama.cpp's names, each with its uncertainty."""
    s = summary.overall
    lines = [title] if title else []
    lines += [
        f"chunks {summary.n_chunks}, scored tokens {s.n_tokens}",
        f"Mean KLD        {_fmt(s.kld_mean)} ± {_fmt(s.kld_mean_se)}  (chunk-level SE {_fmt(summary.kld_mean_chunk_se)})",
        f"Median KLD      {_fmt(s.kld_median)}",
        f"KLD 90% / 95%   {_fmt(s.kld_p90)} / {_fmt(s.kld_p95)}",
        f"KLD 99% / 99.9% {_fmt(s.kld_p99)} / {_fmt(s.kld_p999)}",
        f"Min / Max KLD   {_fmt(s.kld_min)} / {_fmt(s.kld_max)}",
        f"Composite       {_fmt(s.composite)}  [{_fmt(summary.composite_lo)}, {_fmt(summary.composite_hi)}] "
        f"({100 * summary.confidence:.0f}% bootstrap over chunks)",
        f"Same top p      {_fmt(100 * s.same_top, '.3f')} ± {_fmt(100 * s.same_top_se, '.3f')} %",
        f"RMS Δp          {_fmt(100 * s.delta_p_rms, '.3f')} ± {_fmt(100 * s.delta_p_rms_se, '.3f')} %",
        f"PPL(base)       {_fmt(s.ppl_base, '.4f')} ± {_fmt(s.ppl_base_se, '.4f')}",
        f"PPL(candidate)  {_fmt(s.ppl_cand, '.4f')} ± {_fmt(s.ppl_cand_se, '.4f')}",
        f"ln(PPL ratio)   {_fmt(s.ln_ppl_ratio)} ± {_fmt(s.ln_ppl_ratio_se)}",
    ]
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stats",
        help="statistics of a results store: per chunk and overall, with uncertainties",
        description="Read the per-token values of a results store (from `ggufopt bench`, `ggufopt "
        "compare` or a sweep) and print per-chunk rows for a range and the overall statistics. "
        "Percentiles are exact: every scored token's KL-divergence is kept.",
    )
    p.add_argument("results", help="results store directory")
    p.add_argument("--from", dest="from_chunk", type=int, default=0, help="first chunk (inclusive)")
    p.add_argument("--to", dest="to_chunk", type=int, default=None, help="last chunk (inclusive)")
    p.add_argument("--per-chunk", action="store_true", help="also print one row per chunk")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--by-language", action="store_true",
                   help="also one row per language (or data source) of the chunks: mean KLD ± SE, p99, same top, "
                   "ln PPL ratio, and the worst language; labels come from the store (sweeps record them) or "
                   "from --chunks-file")
    p.add_argument("--chunks-file", default=None,
                   help="the chunks file the baseline was made from (`ggufopt dataset`), for --by-language")
    p.set_defaults(func=run)


def run(args) -> int:
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.evaluation import summarize_run
    from ggufopt_ray.store.results import ResultsStore

    store = ResultsStore.open(args.results)
    committed = store.committed()
    if not committed:
        raise UserError(f"{args.results} holds no evaluated chunks yet")
    last = committed[-1] if args.to_chunk is None else args.to_chunk
    wanted = [i for i in committed if args.from_chunk <= i <= last]
    if not wanted:
        raise UserError(f"no evaluated chunks in {args.from_chunk}..{last}; the store has {committed[0]}..{committed[-1]}")
    per_chunk = [store.read(i) for i in wanted]
    summary = summarize_run(per_chunk)
    breakdown = _languages(store, args, wanted, per_chunk) if args.by_language else None
    if args.json:
        extra = {"languages": breakdown.rows(), "worst_language": breakdown.worst_language} if breakdown else {}
        print(json.dumps({"chunks": wanted, **summary.to_dict(), **extra}, indent=2, default=float))
        return 0
    if args.per_chunk:
        print(f"{'chunk':>5} {'tokens':>7} {'KLD mean':>10} {'median':>10} {'p99':>10} {'same top':>9}")
        for i, c in zip(wanted, summary.chunks):
            print(f"{i:>5} {c.n_tokens:>7} {c.kld_mean:>10.6f} {c.kld_median:>10.6f} {c.kld_p99:>10.6f} "
                  f"{100 * c.same_top:>8.2f}%")
        print()
    print(format_summary(summary, title=f"{args.results}: chunks {wanted[0]}..{wanted[-1]}"))
    if breakdown is not None:
        print()
        print(f"{'language':<12} {'chunks':>6} {'KLD mean ± SE (chunks)':>26} {'p99':>10} {'same top':>9} {'ln PPL ratio':>13}")
        for r in breakdown.rows():
            print(f"{r['lang']:<12} {r['n_chunks']:>6} {r['kld_mean']:>14.6f} ± {r['kld_mean_chunk_se']:<9.6f} "
                  f"{r['kld_p99']:>10.6f} {100 * r['same_top']:>8.2f}% {r['ln_ppl_ratio']:>13.5f}")
        print(f"worst language: {breakdown.worst_language} (mean KLD {breakdown.worst_language_kld:.6f})")
    return 0


def _languages(store, args, wanted: list[int], per_chunk: list):
    """Per-language statistics of the chosen chunks (labels from the store, else --chunks-file)."""
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.metrics.languages import summarize_languages

    langs = store.header.get("langs")
    if not langs and args.chunks_file:
        from ggufopt_ray.data import load_chunks

        langs = load_chunks(args.chunks_file, "evaluation").langs
    if not langs:
        raise UserError(f"{args.results} does not record the chunks' languages; pass --chunks-file with the "
                        "chunks file the baseline was computed from")
    if max(wanted) >= len(langs):
        raise UserError(f"the language labels cover {len(langs)} chunks, the store has chunk {max(wanted)}; "
                        "pass the --chunks-file the baseline was computed from")
    return summarize_languages(per_chunk, [langs[i] for i in wanted], n_boot=200)
