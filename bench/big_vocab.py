"""Big vocabularies end to end: baseline sizes and KLD error per encoding, KLD and encode speed, and
the peak memory of a trial (measured vs ggufopt_ray.metrics.memory_plan's prediction).

For each V (32,000, 128,256, 262,144; --quick: the first two, fewer tokens), a synthetic model made
by ``ggufopt synth-model OUT --vocab V --layers 2`` is the baseline and its Q8_0 quantization
(``engine.quantize.quantize_model``) the candidate; both give real llama.cpp logits of the same
chunk (``LogitsEngine(path, RuntimeSettings(...)).logits(tokens)``). Reported per V:

- ``baseline_bytes_per_token`` and ``kld_mean_rel_error`` per encoding (against the exact KLD);
- ``top_k_mass``: the baseline's mean probability mass in its top 32 / 128 / 1024 tokens;
- ``kld_tok_s_1thread``, ``kld_tok_s_all_threads`` (float16 encoding's compare), ``compact_encode_tok_s``;
- ``peak_rss_mib_per_trial``: max RSS of a subprocess that loads the candidate, computes one
  chunk's logits and compares them with the float16 payload; ``predicted_peak_mib`` from
  ``predict_trial_peak_bytes`` and their ratio (goal: within 20%).

    python bench/big_vocab.py [--quick] [--json PATH] [--work DIR]

Timings alternate 1-thread and all-thread runs; the machine is shared, so ratios are what count.
Loading a model at these vocabularies takes tens of seconds (gguf-py parses every token string).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENCODINGS = (("exact", {}), ("float16", {}), ("llamacpp_uint16", {}), ("topk", {"k": 128}), ("compact", {}))

# The child process of one trial: load the candidate, logits of one chunk, compare, report its peak
# RSS. VmHWM (this process's own high-water mark, reset by exec) and not ru_maxrss: on Linux
# ru_maxrss survives fork+exec, so a child of a big parent would report the parent's RSS.
TRIAL = r"""
import os, resource, sys, json
import numpy as np
sys.path.insert(0, sys.argv[1])
import ggufopt_ray.distributed.tune_adapter  # noqa: F401  (what a Ray trial process has loaded: ray, tune)
from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.metrics.encodings import get_encoding
model, payload_path, n_ctx, threads = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
data = np.load(payload_path)
tokens = data["tokens"]
payload = {k[2:]: data[k] for k in data.files if k.startswith("p_")}
eng = LogitsEngine(model, RuntimeSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=threads))
rows = eng.logits(tokens, first=1)[:-1]
m = get_encoding("float16").compare(payload, rows, tokens[2:], threads=threads)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"maxrss_kib": peak, "kld_mean": float(m.kld.mean())}))
"""


def make_models(v: int, work: Path) -> tuple[Path, Path]:
    from ggufopt_ray.engine.quantize import quantize_model

    base = work / f"synth-v{v}.gguf"
    if not base.exists():
        subprocess.run([sys.executable, "-m", "ggufopt_ray.cli", "synth-model", str(base), "--vocab", str(v),
                        "--layers", "2"], check=True, cwd=ROOT)
    cand = work / f"synth-v{v}-Q8_0.gguf"
    if not cand.exists():
        quantize_model(base, "Q8_0", cand)
    return base, cand


def measure(v: int, n_ctx: int, rounds: int, work: Path, threads_all: int) -> dict:
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.gguf.inspect import inspect_model
    from ggufopt_ray.gguf.synth import SynthSpec
    from ggufopt_ray.metrics.encodings import get_encoding
    from ggufopt_ray.metrics.kld import kld_per_token, log_softmax
    from ggufopt_ray.metrics.memory_plan import plan_trial_memory

    base_path, cand_path = make_models(v, work)
    rng = np.random.default_rng(v)
    settings = RuntimeSettings(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=threads_all)
    eng = LogitsEngine(base_path, settings)
    tokens = eng.prepare_chunk(rng.integers(300, min(v, 700), n_ctx))  # the trained part of the vocabulary
    base_lp = log_softmax(eng.logits(tokens, first=1)[:-1])
    eng.close()
    eng = LogitsEngine(cand_path, settings)
    cand = eng.logits(tokens, first=1)[:-1]
    eng.close()
    ref = tokens[2:]
    exact = kld_per_token(base_lp, cand, ref).kld.astype(np.float64)

    # encodings: bytes per token and the mean-KLD error each one causes
    per_encoding = {}
    for name, params in ENCODINGS:
        enc = get_encoding(name, **params)
        payload = enc.encode(base_lp, ref)
        got = enc.compare(payload, cand, ref).kld.astype(np.float64)
        per_encoding[name + (str(params["k"]) if params else "")] = {
            "baseline_bytes_per_token": int(enc.bytes_per_token(v)),
            "kld_mean_rel_error": float(got.mean() / exact.mean() - 1),
        }
    p = np.exp(base_lp.astype(np.float64))
    top = -np.sort(-p, axis=1)
    top_k_mass = {str(k): float(top[:, :k].sum(axis=1).mean()) for k in (32, 128, 1024)}
    del p, top

    # speed: float16 compare on 1 and all threads, alternately; compact encode
    f16 = get_encoding("float16")
    payload = f16.encode(base_lp, ref)
    t1, tn, te = [], [], []
    compact = get_encoding("compact")
    for _ in range(rounds):
        for times, th in ((t1, 1), (tn, threads_all)):
            t0 = time.perf_counter()
            f16.compare(payload, cand, ref, threads=th)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        compact.encode(base_lp[:32], ref[:32])
        te.append(time.perf_counter() - t0)
    n = len(ref)

    # one trial's peak memory, in a fresh process, vs the plan
    pay_file = work / f"payload-v{v}.npz"
    np.savez(pay_file, tokens=tokens, **{f"p_{k}": a for k, a in payload.items()})
    out = subprocess.run([sys.executable, "-c", TRIAL, str(ROOT), str(cand_path), str(pay_file), str(n_ctx),
                          str(threads_all)], check=True, capture_output=True, text=True, cwd=ROOT)
    trial = json.loads(out.stdout.strip().splitlines()[-1])
    info = inspect_model(cand_path)
    spec = SynthSpec(n_vocab=v)
    plan = plan_trial_memory(info.tensor_bytes, n_ctx, v, spec.n_layer, spec.n_embd, "float16",
                             n_scored=n, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                             n_embd_kv=spec.n_embd // spec.n_head * spec.n_head_kv, n_ff=spec.n_ff,
                             threads=threads_all)
    measured = trial["maxrss_kib"] * 1024
    return {
        "n_vocab": v, "n_ctx": n_ctx, "scored_tokens": n, "threads_all": threads_all,
        "exact_kld_mean": float(exact.mean()), "encodings": per_encoding, "top_k_mass": top_k_mass,
        "kld_tok_s_1thread": n / float(np.median(t1)), "kld_tok_s_all_threads": n / float(np.median(tn)),
        "compact_encode_tok_s": 32 / float(np.median(te)),
        "peak_rss_mib_per_trial": measured / 2**20, "predicted_peak_mib": plan.total / 2**20,
        "predicted_over_measured": plan.total / measured, "predicted_components_mib":
            {k: val / 2**20 for k, val in plan.to_dict().items()},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="V = 32,000 and 128,256 only, shorter chunks")
    ap.add_argument("--json", type=Path, help="write the figures as one JSON object to this file")
    ap.add_argument("--work", type=Path, help="folder for the synthetic models (default: a temporary one)")
    ap.add_argument("--vocab", type=int, nargs="*", help="vocabulary sizes (overrides the defaults)")
    args = ap.parse_args(argv)
    vocabs = args.vocab or ([32000, 128256] if args.quick else [32000, 128256, 262144])
    n_ctx, rounds = (128, 3) if args.quick else (512, 5)
    threads_all = len(os.sched_getaffinity(0))
    work = args.work or Path(tempfile.mkdtemp(prefix="big_vocab-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [measure(v, n_ctx, rounds, work, threads_all) for v in vocabs]

    names = list(results[0]["encodings"])
    print(f"Big vocabularies: synthetic 2-layer models vs their Q8_0, one chunk of {n_ctx} tokens, "
          f"{threads_all} threads for 'all'")
    print(f"{'n_vocab':>8s} " + " ".join(f"{n + ' B/tok (err)':>24s}" for n in names))
    for r in results:
        print(f"{r['n_vocab']:8d} " + " ".join(
            f"{r['encodings'][n]['baseline_bytes_per_token']:>12d} ({100 * r['encodings'][n]['kld_mean_rel_error']:+7.3f}%)"
            for n in names))
    print(f"{'n_vocab':>8s} {'top32/128/1024 mass':>22s} {'KLD tok/s 1t':>12s} {'all t':>8s} "
          f"{'compact enc tok/s':>17s} {'peak MiB':>9s} {'predicted':>9s} {'ratio':>6s}")
    for r in results:
        m = r["top_k_mass"]
        print(f"{r['n_vocab']:8d} {m['32']:7.3f}/{m['128']:.3f}/{m['1024']:.3f} {r['kld_tok_s_1thread']:12.0f} "
              f"{r['kld_tok_s_all_threads']:8.0f} {r['compact_encode_tok_s']:17.0f} "
              f"{r['peak_rss_mib_per_trial']:9.0f} {r['predicted_peak_mib']:9.0f} {r['predicted_over_measured']:6.2f}")
    result = {"per_vocab": results, "n_ctx": n_ctx, "threads_all": threads_all}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
