"""Tokens/s of the logits engine: vs a bare llama-cpp-python loop, and the baseline pass vs
llama-perplexity.

Two comparisons, each timed alternately round after round in one run, so machine noise hits both
sides alike; the figures that matter are the ratios.

1. ``ratio`` (target >= 0.95): ``LogitsEngine.logits`` (every position) vs a bare
   llama-cpp-python ``eval`` loop, same model, n_ctx/n_batch/n_ubatch/threads.
2. ``ratio_vs_llama_perplexity`` (target >= 1.0): our baseline pass — logits of the scored half
   of each chunk, log-softmaxed, encoded and committed to a baseline store, as ``ggufopt logits``
   runs it (``commands.logits.compute_into_store``: ``evaluation.baseline_payloads``,
   the LogitsWorker's code, ``n_batch // n_ctx`` chunks per decode, with the store writes on a
   writer thread) — vs ``llama-perplexity --kl-divergence-base FILE`` on the same model, text,
   chunks (n_ctx), n_batch/n_ubatch and threads, with ``-fa off`` (ours runs without flash
   attention). llama-perplexity is a process that loads the model and tokenizes the text each
   time; its chunk loop is timed from its own log time stamps ("calculating perplexity" to
   "Final estimate": decode, log-probs and writing the base file), its whole process by the wall
   clock. Ours is timed on a loaded engine with tokenized chunks, from the first decode until the
   last chunk is committed (checksums, HDF5, fsync). Also printed: ``compute`` (the same payloads,
   no store) and ``per_chunk`` (``evaluation.baseline_payload`` one chunk at a time: a copy of the
   rows, ``kld.log_softmax`` on one thread, then ``encode``). The ratio is the median over rounds
   of llama-perplexity's time / ours.

    python bench/logits_throughput.py [--quick] [--json PATH] [--model GGUF] [--text FILE]

Without --quick and without --model it uses ../shared/models/tinycode-a-f16.gguf and its corpus
../shared/models/corpus/eval.txt when present. llama-perplexity is looked up in
$GGUFOPT_LLAMA_TOOLS/bin or ~/.cache/ggufopt_ray-llama-tools/VERSION/bin (built by
.ci/build-llama-tools); without it part 2 is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "models"
SHARED_MODEL = SHARED / "tinycode-a-f16.gguf"
SHARED_TEXT = SHARED / "corpus" / "eval.txt"
FALLBACK_TEXT = ("def quantize(model, value): return the number of the tensor in the matrix\n"
                 "The model was made after many years of work, and the people there said it was good. ")


# -- part 1: engine vs a bare llama-cpp-python loop ------------------------------------------
def bare_loop(llm, chunks):
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk.tolist())
        out.append(np.array(llm.scores[: len(chunk)], dtype=np.float32))
    return out


def engine_loop(engine, chunks):
    return [engine.logits(chunk) for chunk in chunks]


def vs_bare(model, chunks, n_ctx, threads, rounds) -> dict:
    from llama_cpp import Llama

    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings

    ub = min(n_ctx, 512)
    engine = LogitsEngine(model, RuntimeSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=ub, n_threads=threads))
    llm = Llama(str(model), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=ub, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    # Same numbers first: a speed comparison of different computations would mean nothing.
    max_diff = float(np.abs(engine_loop(engine, chunks[:1])[0] - bare_loop(llm, chunks[:1])[0]).max())
    engine_loop(engine, chunks)  # warm-up both
    bare_loop(llm, chunks)
    t_engine, t_bare = [], []
    for r in range(rounds):
        order = (engine_loop, bare_loop) if r % 2 == 0 else (bare_loop, engine_loop)
        for fn in order:
            t0 = time.perf_counter()
            fn(engine if fn is engine_loop else llm, chunks)
            (t_engine if fn is engine_loop else t_bare).append(time.perf_counter() - t0)
    engine.close()
    llm.close()
    tokens = sum(len(c) for c in chunks)
    e_tps, b_tps = tokens / float(np.median(t_engine)), tokens / float(np.median(t_bare))
    print(f"\n[1] all-position logits, n_ctx {n_ctx}, {len(chunks)} chunks, {rounds} rounds")
    print(f"{'loop':<10} {'median s':>10} {'tokens/s':>12}")
    print(f"{'engine':<10} {np.median(t_engine):>10.4f} {e_tps:>12.1f}")
    print(f"{'bare':<10} {np.median(t_bare):>10.4f} {b_tps:>12.1f}")
    print(f"ratio engine/bare = {e_tps / b_tps:.3f} (target >= 0.95); max |logit diff| = {max_diff:.3g}")
    return {"max_abs_logit_diff": max_diff, "engine_tokens_per_s": e_tps, "bare_tokens_per_s": b_tps,
            "ratio": e_tps / b_tps}


# -- part 2: baseline pass vs llama-perplexity --kl-divergence-base ---------------------------
def find_llama_perplexity(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    import importlib.metadata as md

    env = os.environ.get("GGUFOPT_LLAMA_TOOLS")
    base = Path(env) if env else Path.home() / ".cache" / "ggufopt_ray-llama-tools" / md.version("llama-cpp-python")
    tool = base / "bin" / "llama-perplexity"
    return tool if tool.exists() else None


def payloads_compute(engine, chunks, encoding: str, first: int, store=None) -> list[dict]:
    """What a LogitsWorker computes: ``baseline_payloads``, ``engine.n_seq`` chunks per decode."""
    from ggufopt_ray.evaluation import baseline_payloads

    out = []
    for g in range(0, len(chunks), engine.n_seq):
        out.extend(baseline_payloads(engine, chunks[g:g + engine.n_seq], encoding, first))
    return out


def payloads_per_chunk(engine, chunks, encoding: str, first: int, store=None) -> list[dict]:
    from ggufopt_ray.evaluation import baseline_payload

    return [baseline_payload(engine, c, encoding, first) for c in chunks]


def baseline_pass(engine, chunks, encoding: str, first: int, store=None) -> None:
    """The whole pass of ``ggufopt logits``: payloads committed to ``store``."""
    from ggufopt_ray.commands.logits import compute_into_store

    compute_into_store(engine, store, chunks, range(len(chunks)), encoding, first)


def fresh_store(path: Path, model, chunks, n_ctx: int, encoding: str, first: int):
    """An empty baseline store at ``path`` (emptied outside the timed region)."""
    from ggufopt_ray.evaluation import encoding_params
    from ggufopt_ray.store.baseline import BaselineStore

    header = {"model_fingerprint": Path(model).name, "vocab_fingerprint": "bench", "corpus_fingerprint": "bench",
              "n_ctx": n_ctx, "n_vocab": 0, "encoding": encoding, "encoding_params": encoding_params(encoding),
              "first": first, "n_chunks": len(chunks)}
    return BaselineStore.create_or_open(path, header, overwrite=True)


def max_payload_diff(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference between two lists of payloads (inf if their arrays differ in
    names, shapes or dtypes)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys():
            return float("inf")
        for k in x:
            u, v = np.asarray(x[k]), np.asarray(y[k])
            if u.shape != v.shape or u.dtype != v.dtype:
                return float("inf")
            if u.size:
                worst = max(worst, float(np.abs(u.astype(np.float64) - v.astype(np.float64)).max()))
    return worst


def text_file_for(engine, text: str, n_ctx: int, n_chunks: int, path: Path) -> Path:
    """A prefix of ``text`` that holds ``n_chunks`` chunks (and at least two, as llama-perplexity
    demands) written to ``path``: both sides then tokenize and cut the same thing."""
    need = max(n_chunks, 2) * n_ctx
    chars = min(len(text), need * 6)
    while True:
        prefix = text[:chars]
        if engine.tokenize(prefix, add_bos=engine.add_bos).size >= need or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    if engine.tokenize(prefix, add_bos=engine.add_bos).size < need:
        raise SystemExit(f"the text holds fewer than {need} tokens; give a longer --text or fewer --chunks")
    path.write_text(prefix)
    return path


_STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) \w "  # llama.cpp's log prefix: minutes.seconds.ms.us
_START = re.compile(_STAMP + r"perplexity: calculating perplexity over")
_FINAL = re.compile(_STAMP + r"Final estimate")


def _seconds(m: re.Match) -> float:
    mi, se, ms, us = (int(g) for g in m.groups()[:4])
    return mi * 60 + se + ms / 1e3 + us / 1e6


def run_llama_perplexity(tool: Path, model: Path, text: Path, n_ctx: int, n_batch: int, n_ubatch: int,
                         threads: int, chunks: int, base_out: Path) -> tuple[float, float]:
    """Wall seconds of one ``--kl-divergence-base`` run, and the seconds of its chunk loop (from
    its own log time stamps: from "calculating perplexity" to "Final estimate", so without
    process start, model load and tokenization; decode, log-probs and the base file inside)."""
    cmd = [str(tool), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_batch),
           "-ub", str(n_ubatch), "-t", str(threads), "-tb", str(threads), "--chunks", str(chunks),
           "--kl-divergence-base", str(base_out), "-fa", "off"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    a, b = _START.search(proc.stderr), _FINAL.search(proc.stderr)
    if not (a and b):
        raise SystemExit("llama-perplexity's log has no time-stamped 'calculating perplexity' / "
                         "'Final estimate' lines; cannot time its chunk loop")
    return wall, _seconds(b) - _seconds(a)


def vs_llama_perplexity(tool, model, text, n_ctx, n_batch, n_ubatch, threads, n_chunks, rounds,
                        encoding, tmp: Path) -> dict:
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.engine.tokenizer import text_chunks

    settings = RuntimeSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=threads)
    engine = LogitsEngine(model, settings)
    n_seq = engine.n_seq
    text_path = text_file_for(engine, text, n_ctx, n_chunks, tmp / "text.txt")
    chunks = text_chunks(engine, text_path.read_text(), n_ctx, n_chunks)
    n_chunks = len(chunks)
    first = n_ctx // 2  # llama-perplexity scores the second half of each chunk
    ours = {"pass": baseline_pass, "compute": payloads_compute, "per_chunk": payloads_per_chunk}
    store_path = tmp / "store"

    # Same numbers first: the pass's payloads (packed, from llama.cpp's buffer, fused encoding)
    # against evaluation.baseline_payload's, and what the store gives back.
    sample = chunks[:max(2, n_seq)]
    a = payloads_per_chunk(engine, sample, encoding, first)
    b = payloads_compute(engine, sample, encoding, first)
    store = fresh_store(store_path, model, sample, n_ctx, encoding, first)
    baseline_pass(engine, sample, encoding, first, store)
    pack_diff = max_payload_diff(a, b)
    store_diff = max_payload_diff(b, [store.read_payload(i) for i in range(len(sample))])
    codes_equal = all(np.array_equal(np.asarray(x[k]).view(np.uint8), np.asarray(y[k]).view(np.uint8))
                      for x, y in zip(a, b) for k in x if k not in ("xent_correction", "ref_logprob"))
    run_llama_perplexity(tool, model, text_path, n_ctx, n_batch, n_ubatch, threads, min(n_chunks, n_seq),
                         tmp / "base.kld")  # warm-up

    times: dict[str, list[float]] = {k: [] for k in ours}
    times.update({"lp_loop": [], "lp_wall": []})
    base = tmp / "base.kld"
    for r in range(rounds):
        steps = list(ours) + ["lp"]
        for step in (steps if r % 2 == 0 else steps[::-1]):
            if step == "lp":
                base.unlink(missing_ok=True)
                wall, loop = run_llama_perplexity(tool, model, text_path, n_ctx, n_batch, n_ubatch, threads,
                                                  n_chunks, base)
                times["lp_wall"].append(wall)
                times["lp_loop"].append(loop)
            else:
                store = fresh_store(store_path, model, chunks, n_ctx, encoding, first) if step == "pass" else None
                t0 = time.perf_counter()
                ours[step](engine, chunks, encoding, first, store)
                times[step].append(time.perf_counter() - t0)
    engine.close()
    tokens = n_chunks * n_ctx
    med = {k: float(np.median(v)) for k, v in times.items()}
    tps = {k: tokens / med[k] for k in med}
    # Each round's sides ran back to back: the median of per-round ratios resists the load
    # swings of a shared machine better than a ratio of medians.
    per_round = {k: [lp / t for lp, t in zip(times["lp_loop"], times[k])] for k in ours}
    round_ratio = {k: float(np.median(v)) for k, v in per_round.items()}
    res = {
        "n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "n_seq": n_seq, "chunks": n_chunks,
        "rounds": rounds, "encoding": encoding, "scored_from": first,
        "ours_pass_tokens_per_s": tps["pass"], "ours_compute_tokens_per_s": tps["compute"],
        "ours_per_chunk_tokens_per_s": tps["per_chunk"],
        "llama_perplexity_tokens_per_s": tps["lp_loop"],
        "llama_perplexity_wall_tokens_per_s": tps["lp_wall"],
        "ratio_vs_llama_perplexity": round_ratio["pass"],
        "ratio_compute_vs_llama_perplexity": round_ratio["compute"],
        "ratio_per_chunk_vs_llama_perplexity": round_ratio["per_chunk"],
        "ratio_of_medians": tps["pass"] / tps["lp_loop"],
        "per_round_ratios": per_round,
        "pass_vs_per_chunk_max_abs_payload_diff": pack_diff,
        "pass_vs_per_chunk_codes_identical": codes_equal,
        "store_roundtrip_max_abs_diff": store_diff,
        "times_s": times,
    }
    print(f"\n[2] baseline pass ({encoding}) vs llama-perplexity --kl-divergence-base, n_ctx {n_ctx}, "
          f"n_batch {n_batch}, n_ubatch {n_ubatch}, n_seq {n_seq}, {n_chunks} chunks, {rounds} rounds")
    print(f"{'side':<44} {'median s':>10} {'tokens/s':>12} {'ratio':>7}")
    for key, label in (("pass", "ours: baseline pass into a store"),
                       ("compute", "ours: payloads only (no store)"),
                       ("per_chunk", "ours: evaluation.baseline_payload per chunk"),
                       ("lp_loop", "llama-perplexity, chunk loop"), ("lp_wall", "llama-perplexity, whole process")):
        ratio = f"{round_ratio[key]:7.3f}" if key in round_ratio else ""
        print(f"{label:<44} {med[key]:>10.3f} {tps[key]:>12.1f} {ratio}")
    print(f"ratio_vs_llama_perplexity = {res['ratio_vs_llama_perplexity']:.3f} (median of per-round ratios; "
          f"target >= 1.0); payloads vs baseline_payload: codes identical {codes_equal}, max |diff| "
          f"{pack_diff:.3g}; store round trip max |diff| {store_diff:.3g}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny synthetic model, few chunks (~1 min)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--model", help="GGUF to measure (default: see module docstring)")
    ap.add_argument("--text", help="text for part 2 (default: the shared corpus's eval.txt)")
    ap.add_argument("--ctx", type=int, default=None, help="chunk length n_ctx")
    ap.add_argument("--batch", type=int, default=None, help="n_batch of part 2 (default 4 * n_ctx)")
    ap.add_argument("--ubatch", type=int, default=512, help="n_ubatch of part 2 (default 512)")
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--encoding", default=None, help="baseline encoding (default: the sweep's; auto means its first choice)")
    ap.add_argument("--llama-perplexity", help="path of the llama-perplexity binary")
    ap.add_argument("--skip-bare", action="store_true", help="only part 2")
    args = ap.parse_args(argv)

    from ggufopt_ray.config import MetricsConfig
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.engine.native import default_threads
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    if args.model:
        model = Path(args.model)
    elif not args.quick and SHARED_MODEL.exists():
        model = SHARED_MODEL
    else:
        if not args.quick:
            print(f"note: {SHARED_MODEL} not found; using the synthetic model", file=sys.stderr)
        model = write_synthetic_model(tmp / "tiny.gguf", SynthSpec(seed=0))
    text = Path(args.text).read_text() if args.text else (
        SHARED_TEXT.read_text() if SHARED_TEXT.exists() else FALLBACK_TEXT * 400)
    n_ctx = args.ctx or (256 if args.quick else 512)
    n_chunks = args.chunks or (8 if args.quick else 16)
    rounds = args.rounds or (3 if args.quick else 5)
    threads = args.threads or default_threads()
    n_batch = args.batch or 4 * n_ctx
    n_ubatch = min(args.ubatch, n_batch)
    encoding = args.encoding or MetricsConfig().encoding
    if encoding == "auto":  # the sweep's first choice, taken whenever the baseline fits memory
        from ggufopt_ray.memory_plan import AUTO_ENCODINGS

        encoding = AUTO_ENCODINGS[0]

    with LogitsEngine(model, RuntimeSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                                             n_threads=threads)) as e:
        n_vocab = e.n_vocab
        bare_chunks = [e.prepare_chunk(c) for c in np.random.default_rng(0).integers(
            3, e.n_vocab, (min(n_chunks, 4 if args.quick else 8), n_ctx), dtype=np.int32)]
    print(f"model {model.name}  vocab {n_vocab}  threads {threads}")
    result = {"model": str(model), "n_vocab": n_vocab, "threads": threads, "n_ctx": n_ctx}
    if not args.skip_bare:
        result.update(vs_bare(model, bare_chunks, n_ctx, threads, rounds))
    tool = find_llama_perplexity(args.llama_perplexity)
    if tool is None:
        print("\n[2] skipped: llama-perplexity not found (build it with .ci/build-llama-tools)")
        result["ratio_vs_llama_perplexity"] = None
    else:
        lp = vs_llama_perplexity(tool, model, text, n_ctx, n_batch, n_ubatch, threads, n_chunks, rounds,
                                 encoding, tmp)
        result["llama_perplexity"] = lp
        for k in ("ratio_vs_llama_perplexity", "ours_pass_tokens_per_s", "ours_per_chunk_tokens_per_s",
                  "llama_perplexity_tokens_per_s"):
            result[k] = lp[k]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
