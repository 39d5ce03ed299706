"""Our default sweep vs the llama.cpp shell loop, on the same chunks: wall time, ranking, chunks used.

The alternative a user has to a sweep is a loop of llama.cpp's own tools:

    llama-quantize F16 Q.gguf TYPE                                   # per type
    llama-perplexity -m F16 -f TEXT -c N -b N --chunks K -fa off -t T --kl-divergence-base BASE
    llama-perplexity -m Q.gguf --kl-divergence-base BASE --kl-divergence -c N -b N --chunks K -fa off -t T

It measures every candidate on every chunk. Our side is ``run_sweep`` of the ``quant_types`` search
with the default metrics settings (early stopping with racing), from a cold cache (fresh
``cache_dir``: the baseline pass and every quantization are included) and a fresh local Ray.

Same chunks: llama-perplexity cuts its text file into consecutive ``n_ctx``-token chunks of one
tokenization with BOS; our corpus builder packs samples differently. So the sweep here is fed
exactly llama-perplexity's chunks (``engine.tokenizer.text_chunks``, the project's parity cut) by
replacing ``ggufopt_ray.sweep.prepare_data`` inside this process only (the sweep has no option that
takes given token chunks); the chunks are checked token by token against the ones llama-perplexity
stored in its base file.

Figures (JSON): ``wall_ratio`` (ours / loop, all models; goal <= 0.5), ``same_ranking`` (our
ranking by mean KLD, ``kld_mean_adj`` where the row has it, equals the loop's all-chunks ranking,
on every model), ``chunks_fraction`` (chunks we evaluated / types x chunks; goal <= 0.3),
``front_within_ci`` (every front candidate's loop value lies in the interval we report for its
mean: the regression-adjusted ``kld_mean_adj_lo..hi`` where the row has it, else mean +- t * the
chunk-level SE), and per model the details (per type: our mean, interval, chunks, stop reason; the
loop's statistics; the walls of each phase). The two sides run one after the other, in alternating
order across models.

    python bench/sweep_vs_llamacpp.py [--quick] [--json PATH]

Without --quick: ../shared/models/tinycode-a-f16.gguf (vocabulary 8192) on its corpus/eval.txt,
and a synthetic model with a 49,152-token vocabulary and 12 layers (made once, kept in the cache
dir), 6 types x 32 chunks of 512 each. --quick: the trained model only, 3 types x 8 chunks of 256.
The llama.cpp tools come from $GGUFOPT_LLAMA_TOOLS/bin or ~/.cache/ggufopt_ray-llama-tools/VERSION/bin
(built by .ci/build-llama-tools).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_tools import find_tools, kl_divergence_pass, kld_summary, parse_kld_output, run_tool  # noqa: E402

from ggufopt_ray.engine.native import default_threads  # noqa: E402

SHARED = ROOT.parent / "shared" / "models"
TRAINED_MODEL = SHARED / "tinycode-a-f16.gguf"
EVAL_TEXT = SHARED / "corpus" / "eval.txt"

FULL_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M"]
QUICK_TYPES = ["Q8_0", "Q4_K_M", "Q3_K_M"]
SYNTH_VOCAB, SYNTH_LAYERS = 49152, 12


# -- inputs ----------------------------------------------------------------------------------
def synthetic_model() -> Path:
    """The 49,152-vocabulary, 12-layer synthetic model, written once into the cache dir."""
    from ggufopt_ray.sweep import default_cache_dir

    path = default_cache_dir() / "bench" / f"synth-v{SYNTH_VOCAB}-l{SYNTH_LAYERS}-seed0.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        subprocess.run(["ggufopt", "synth-model", str(tmp), "--vocab", str(SYNTH_VOCAB),
                        "--layers", str(SYNTH_LAYERS)], check=True, stdout=subprocess.DEVNULL)
        tmp.rename(path)
    return path


def text_prefix(tokenizer, text: str, n_ctx: int, n_chunks: int, path: Path) -> Path:
    """A prefix of ``text`` that holds ``n_chunks`` chunks (both sides then tokenize the same,
    shorter file; llama-perplexity tokenizes its whole input every run)."""
    need = n_chunks * n_ctx
    chars = min(len(text), int(need * 4.5))
    while True:
        prefix = text[:chars]
        if tokenizer.tokenize(prefix, add_bos=tokenizer.add_bos).size >= need + 1 or chars >= len(text):
            break
        chars = min(len(text), int(chars * 1.3))
    if tokenizer.tokenize(prefix, add_bos=tokenizer.add_bos).size < need:
        raise SystemExit(f"the text holds fewer than {need} tokens")
    path.write_text(prefix)
    return path


# -- the llama.cpp loop ----------------------------------------------------------------------
def llama_loop(tools: Path, model: Path, text: Path, types: list[str], n_ctx: int, n_chunks: int,
               threads: int, work: Path) -> dict:
    """llama-quantize per type, one base pass, one --kl-divergence pass per type; all timed."""
    work.mkdir(parents=True, exist_ok=True)
    common = ["-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(n_chunks), "-fa", "off", "-t", str(threads)]
    t0 = time.perf_counter()
    quant: dict[str, dict] = {}
    for t in types:
        out = work / f"{t}.gguf"
        wall, _ = run_tool([str(tools / "llama-quantize"), str(model), str(out), t, str(threads)])
        quant[t] = {"seconds": wall, "size_bytes": out.stat().st_size}
    base = work / "base.kld"
    base_wall, _ = run_tool([str(tools / "llama-perplexity"), "-m", str(model), "-f", str(text), *common,
                             "--kl-divergence-base", str(base)])
    per_type: dict[str, dict] = {}
    lost = {"runs": 0, "seconds": 0.0}
    for t in types:
        wall, log, lost_here = kl_divergence_pass(tools, work / f"{t}.gguf", base, common)
        # a pass whose report llama.cpp's logger lost is repeated; its time is not the loop's
        lost = {k: lost[k] + lost_here[k] for k in lost}
        stats = parse_kld_output(log)
        per_type[t] = {**kld_summary(stats), "kld_seconds": wall, "quantize_seconds": quant[t]["seconds"],
                       "size_bytes": quant[t]["size_bytes"], "stats": stats}
    total = time.perf_counter() - t0 - lost["seconds"]
    return {"wall_s": total, "lost_output_reruns": lost["runs"], "lost_output_seconds_not_counted": lost["seconds"],
            "quantize_s": sum(q["seconds"] for q in quant.values()), "base_s": base_wall,
            "kld_s": sum(p["kld_seconds"] for p in per_type.values()), "types": per_type, "base_file": str(base)}


# -- our sweep -------------------------------------------------------------------------------
def chunk_set(tokens: list[np.ndarray], n_ctx: int, add_bos: bool, vocab_fp: str):
    """A ``ChunkSet`` holding exactly these chunks (what ``prepare_data`` returns)."""
    from ggufopt_ray.data.chunks import ChunkSet

    h = hashlib.sha256(b"llama-perplexity-cut")
    for c in tokens:
        h.update(np.ascontiguousarray(c, np.int32).tobytes())
    fp = h.hexdigest()[:16]
    return ChunkSet(which="evaluation", chunks=[np.asarray(c, np.int32) for c in tokens],
                    langs=["default"] * len(tokens), sample_ids=[[] for _ in tokens], fingerprint=fp,
                    dataset_fingerprint=fp, vocab_fingerprint=vocab_fp, n_ctx=n_ctx, add_bos=add_bos,
                    metadata={"cut": "llama-perplexity"})


def our_sweep(model: Path, text: Path, types: list[str], n_ctx: int, n_chunks: int, work: Path) -> dict:
    """run_sweep with default metrics, a fresh cache_dir and a fresh Ray, fed llama-perplexity's chunks."""
    import ray

    import ggufopt_ray.distributed.runtime as runtime
    import ggufopt_ray.sweep as sweep
    from ggufopt_ray.config import SweepConfig

    cfg = SweepConfig()
    cfg.model.path = str(model)
    cfg.model.n_ctx = cfg.model.n_batch = cfg.model.n_ubatch = n_ctx
    cfg.dataset.source, cfg.dataset.path = "local", str(text)
    cfg.dataset.langs = ["default"]
    cfg.dataset.eval_chunks, cfg.dataset.calib_chunks = n_chunks, 0
    cfg.search.types = list(types)
    cfg.cache_dir = str(work / "cache")
    timings: dict[str, float] = {}
    chunks_seen: list[np.ndarray] = []

    def prepare_llama_perplexity_chunks(cfg_, model_path, cache):
        from ggufopt_ray.engine.tokenizer import VocabTokenizer, text_chunks
        from ggufopt_ray.gguf.inspect import inspect_model

        t0 = time.perf_counter()
        with VocabTokenizer(model_path) as tok:
            chunks = text_chunks(tok, Path(cfg_.dataset.path).read_text(), cfg_.model.n_ctx, cfg_.dataset.eval_chunks)
            add_bos = tok.add_bos
        chunks_seen.extend(chunks)
        ev = chunk_set(chunks, cfg_.model.n_ctx, add_bos, inspect_model(model_path).vocab_fingerprint)
        timings["data_s"] = time.perf_counter() - t0
        return ev, None

    real_start = runtime.start_ray

    def timed_start_ray(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_start(*a, **k)
        finally:
            timings["ray_start_s"] = time.perf_counter() - t0

    import ggufopt_ray.report.html as report_html

    real_report = report_html.write_report

    def timed_report(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_report(*a, **k)
        finally:
            timings["report_s"] = time.perf_counter() - t0

    marks: dict[str, float] = {}

    def log(*a):  # the sweep's progress lines, timed: where the seconds before the trials go
        word = str(a[0]).split()[0] if a else ""
        marks[word] = time.perf_counter()  # the last line of each kind (baseline: its summary)

    saved = sweep.prepare_data
    sweep.prepare_data, runtime.start_ray = prepare_llama_perplexity_chunks, timed_start_ray
    report_html.write_report = timed_report
    try:
        t0 = time.perf_counter()
        res = sweep.run_sweep(cfg, work / "out", resume=False, log=log)
        wall = time.perf_counter() - t0
    finally:
        sweep.prepare_data, runtime.start_ray = saved, real_start
        report_html.write_report = real_report
        ray.shutdown()  # the next model's sweep starts Ray again, as a user's next run would
    if res.errors or len(res.rows) != len(types):
        raise SystemExit(f"sweep failed: {res.errors}")
    rows = {r["label"]: r for r in res.rows}
    per_type = {}
    for t in types:
        r = rows[t]
        adj = r.get("kld_mean_adj")
        has_adj = adj is not None and not (isinstance(adj, float) and math.isnan(adj))
        n = int(r["chunks"])
        if has_adj:
            mean, se, lo, hi, kind = adj, r["kld_mean_adj_se"], r["kld_mean_adj_lo"], r["kld_mean_adj_hi"], \
                f"kld_mean_adj interval (control {r.get('kld_mean_adj_control') or '-'})"
        else:
            from scipy import stats as st

            mean, se = r["kld_mean"], r["kld_mean_chunk_se"]
            q = float(st.t.ppf(0.975, max(1, n - 1)))
            lo, hi, kind = mean - q * se, mean + q * se, f"kld_mean +- t({n - 1}) x chunk SE"
        per_type[t] = {"kld_mean": r["kld_mean"], "kld_mean_chunk_se": r["kld_mean_chunk_se"],
                       "kld_mean_token_se": r.get("kld_mean_se"), "kld_mean_adj": adj if has_adj else None,
                       "reported_mean": mean, "reported_se": se, "lo": lo, "hi": hi, "interval": kind,
                       "chunks": n, "stop_reason": r["stop_reason"], "bits_per_weight": r["bits_per_weight"],
                       "size_bytes": r["size_bytes"], "build_seconds": r.get("build_seconds"),
                       "eval_seconds": r.get("eval_seconds")}
    b = res.baseline
    ray_s = timings.get("ray_start_s", float("nan"))
    stages = {k: round(v - t0, 3) for k, v in marks.items()}
    return {"wall_s": wall, "ray_start_s": ray_s, "data_s": timings.get("data_s"),
            "report_s": timings.get("report_s"), "log_line_at_s": stages,
            "baseline_s": b.get("seconds"), "baseline_chunks_computed": b.get("computed"),
            "trials_s": b.get("trials_seconds"),
            "quantize_s_sum": sum(p["build_seconds"] or 0.0 for p in per_type.values()),
            "other_s": wall - ray_s - (b.get("seconds") or 0) - (b.get("trials_seconds") or 0) - (timings.get("data_s") or 0)
            - (timings.get("report_s") or 0),
            "types": per_type, "chunks": [c.copy() for c in chunks_seen]}


# -- comparison ------------------------------------------------------------------------------
def front(types: list[str], size: dict[str, float], value: dict[str, float]) -> list[str]:
    """Candidates no other candidate beats on both size (no larger) and value (lower)."""
    return [t for t in types if not any(size[o] <= size[t] and value[o] < value[t] for o in types if o != t)]


def compare(name: str, model: Path, types: list[str], n_ctx: int, n_chunks: int, loop: dict, ours: dict) -> dict:
    from ggufopt_ray.store.llamacpp_kld import read_kld_base

    base = read_kld_base(loop["base_file"])
    ours_tokens = np.stack(ours["chunks"])
    # llama-perplexity stores each chunk's original first token and evaluates BOS in its place
    same_chunks = bool(base.n_chunk == len(ours_tokens) and np.array_equal(base.tokens[:, 1:], ours_tokens[:, 1:]))
    ot, lt = ours["types"], loop["types"]
    our_rank = sorted(types, key=lambda t: ot[t]["reported_mean"])
    loop_rank = sorted(types, key=lambda t: lt[t]["kld_mean"])
    loop_front = front(types, {t: lt[t]["size_bytes"] for t in types}, {t: lt[t]["kld_mean"] for t in types})
    within, how = {}, {}
    for t in types:
        o, lp = ot[t], lt[t]
        if o["hi"] > o["lo"]:
            within[t], how[t] = bool(o["lo"] <= lp["kld_mean"] <= o["hi"]), "loop value in our " + o["interval"]
        else:  # every chunk evaluated: our finite-population interval is a point; use the loop's own interval
            half = 1.96 * (lp["kld_mean_se"] or 0.0)
            within[t] = bool(abs(o["reported_mean"] - lp["kld_mean"]) <= half)
            how[t] = "all chunks evaluated (our interval has zero width): our mean in loop mean +- 1.96 x its SE"
    chunks = sum(ot[t]["chunks"] for t in types)
    return {"model": str(model), "name": name, "types": types, "n_ctx": n_ctx, "n_chunks": n_chunks,
            "same_chunks": same_chunks, "wall_ratio": ours["wall_s"] / loop["wall_s"],
            "ours_wall_s": ours["wall_s"], "loop_wall_s": loop["wall_s"],
            "same_ranking": our_rank == loop_rank, "our_ranking": our_rank, "loop_ranking": loop_rank,
            "chunks_evaluated": chunks, "chunks_fraction": chunks / (len(types) * n_chunks),
            "front": loop_front, "front_within_ci": all(within[t] for t in loop_front),
            "all_within_ci": all(within.values()), "within_ci": within, "within_ci_how": how,
            "rel_diff_vs_loop": {t: ot[t]["reported_mean"] / lt[t]["kld_mean"] - 1 for t in types},
            "file_size_diff_bytes": {t: int(ot[t]["size_bytes"]) - int(lt[t]["size_bytes"]) for t in types},
            "ours": {k: v for k, v in ours.items() if k != "chunks"},
            "loop": {k: ({t: {kk: vv for kk, vv in d.items() if kk != "stats"} for t, d in v.items()}
                         if k == "types" else v) for k, v in loop.items() if k != "base_file"},
            "loop_stats": {t: lt[t]["stats"] for t in types}}


def print_model(r: dict) -> None:
    print(f"\n{r['name']}: {Path(r['model']).name}, {len(r['types'])} types x {r['n_chunks']} chunks of "
          f"{r['n_ctx']}; same chunks as llama-perplexity: {r['same_chunks']}")
    print(f"{'type':<8} {'ours mean':>11} {'interval':>25} {'chunks':>6} {'stop':<22} {'loop mean':>11} "
          f"{'± SE':>9} {'in':>3}")
    for t in r["types"]:
        o, lp = r["ours"]["types"][t], r["loop"]["types"][t]
        adj = "*" if o["kld_mean_adj"] is not None else " "
        print(f"{t:<8} {o['reported_mean']:>10.4g}{adj} [{o['lo']:>10.4g}, {o['hi']:>10.4g}] {o['chunks']:>6} "
              f"{str(o['stop_reason'])[:22]:<22} {lp['kld_mean']:>11.4g} {lp['kld_mean_se'] or 0:>9.2g} "
              f"{'y' if r['within_ci'][t] else 'N':>3}")
    o, lp = r["ours"], r["loop"]
    print("(* = kld_mean_adj and its interval; else kld_mean +- t x chunk SE. in: the loop's mean in our "
          "interval, or for all-chunk candidates ours in the loop's +- 1.96 SE)")
    print(f"ours  {o['wall_s']:7.1f} s = ray start {o['ray_start_s']:.1f} + data {o['data_s']:.1f} + baseline "
          f"{o['baseline_s']:.1f} + trials {o['trials_s']:.1f} (quantize inside trials {o['quantize_s_sum']:.1f}) "
          f"+ report {o['report_s'] or 0:.1f} + other {o['other_s']:.1f}")
    print(f"loop  {lp['wall_s']:7.1f} s = quantize {lp['quantize_s']:.1f} + base {lp['base_s']:.1f} + "
          f"--kl-divergence {lp['kld_s']:.1f}")
    print(f"wall_ratio {r['wall_ratio']:.3f} (goal <= 0.5); chunks_fraction {r['chunks_fraction']:.3f} (goal <= 0.3); "
          f"same_ranking {r['same_ranking']}; front_within_ci {r['front_within_ci']} (front {r['front']}); "
          f"file size ours - llama-quantize {sorted(set(r['file_size_diff_bytes'].values()))} bytes")


def run_model(name: str, model: Path, raw_text: str, types: list[str], n_ctx: int, n_chunks: int, threads: int,
              tools: Path, work: Path, loop_first: bool) -> dict:
    from ggufopt_ray.engine.tokenizer import VocabTokenizer

    work.mkdir(parents=True, exist_ok=True)
    with VocabTokenizer(model) as tok:
        text = text_prefix(tok, raw_text, n_ctx, n_chunks, work / "text.txt")
    sides = ["loop", "ours"] if loop_first else ["ours", "loop"]
    res, load = {}, {}
    for side in sides:
        print(f"[{name}] running {side} ...", file=sys.stderr, flush=True)
        before = os.getloadavg()[0]
        if side == "loop":
            res["loop"] = llama_loop(tools, model, text, types, n_ctx, n_chunks, threads, work / "loop")
        else:
            res["ours"] = our_sweep(model, text, types, n_ctx, n_chunks, work / "ours")
        # the machine's 1-minute load average around each side: on a shared machine, a side that ran
        # while others were busy is slower for reasons that are not its own
        load[side] = {"before": before, "after": os.getloadavg()[0]}
    r = compare(name, model, types, n_ctx, n_chunks, res["loop"], res["ours"])
    r["order"], r["load_average"] = sides, load
    print(f"load average (1 min) around each side: " + ", ".join(
        f"{k} {v['before']:.1f} -> {v['after']:.1f}" for k, v in load.items()) + f" on {threads} CPUs")
    print_model(r)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="trained model only, 3 types x 8 chunks of 256 (~1 min)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)

    for name in ("gguf", "matplotlib"):
        import logging

        logging.getLogger(name).setLevel(logging.WARNING)
    tools = find_tools()
    if not TRAINED_MODEL.exists() or not EVAL_TEXT.exists():
        raise SystemExit(f"{TRAINED_MODEL} and {EVAL_TEXT} are needed")
    raw = EVAL_TEXT.read_text()
    threads = default_threads()
    if args.quick:
        plan = [("trained", TRAINED_MODEL, QUICK_TYPES, 256, 8)]
    else:
        plan = [("trained", TRAINED_MODEL, FULL_TYPES, 512, 32),
                (f"synthetic-v{SYNTH_VOCAB}-l{SYNTH_LAYERS}", synthetic_model(), FULL_TYPES, 512, 32)]
    work = Path(tempfile.mkdtemp(prefix="sweep-vs-llamacpp-"))
    models = []
    try:
        for i, (name, model, types, n_ctx, n_chunks) in enumerate(plan):
            models.append(run_model(name, model, raw, types, n_ctx, n_chunks, threads, tools, work / name,
                                    loop_first=i % 2 == 0))
            if args.json:  # what is done so far survives a later failure
                Path(args.json + ".partial").write_text(json.dumps(models, indent=2, default=float))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = sum(m["ours_wall_s"] for m in models)
    loop = sum(m["loop_wall_s"] for m in models)
    chunks = sum(m["chunks_evaluated"] for m in models)
    total = sum(len(m["types"]) * m["n_chunks"] for m in models)
    out = {"wall_ratio": ours / loop, "same_ranking": all(m["same_ranking"] for m in models),
           "chunks_fraction": chunks / total, "front_within_ci": all(m["front_within_ci"] for m in models),
           "front_within_ci_interval": "the loop's all-chunks mean KLD lies in the interval we report: "
                                       "kld_mean_adj_lo..kld_mean_adj_hi (finite-population, over the sweep's "
                                       "chunks) where the row has kld_mean_adj, else kld_mean +- t(0.975, n-1) x "
                                       "kld_mean_chunk_se; for a candidate that evaluated every chunk (zero-width "
                                       "interval) our mean lies in the loop's mean +- 1.96 x llama-perplexity's SE; "
                                       "front = the loop's size/mean-KLD Pareto front",
           "all_within_ci": all(m["all_within_ci"] for m in models),
           "same_chunks": all(m["same_chunks"] for m in models), "threads": threads,
           "quick": args.quick, "ours_wall_s": ours, "loop_wall_s": loop,
           "models": {m["name"]: m for m in models}}
    print(f"\nall models: wall_ratio {out['wall_ratio']:.3f} (goal <= 0.5), chunks_fraction "
          f"{out['chunks_fraction']:.3f} (goal <= 0.3), same_ranking {out['same_ranking']}, "
          f"front_within_ci {out['front_within_ci']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
        Path(args.json + ".partial").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
