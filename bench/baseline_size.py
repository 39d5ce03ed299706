"""Bytes per scored token of each baseline encoding, and the KLD error each one causes.

For every encoding: bytes stored per scored token, the ratio to llama.cpp's base file
(2 * n_vocab + 8 bytes per token) and to the original toolkit's float32 logits (4 * n_vocab),
and the relative error of the mean KLD (and p99) it induces against the exact float32 baseline,
for real llama.cpp candidates (Q8_0 and Q4_K_M) of the trained model in ../shared/models.
Everything runs through the project's engine: baseline and candidate logits from llama.cpp on
the same chunks, quantization in process.

    python bench/baseline_size.py [--quick] [--json PATH] [--model GGUF] [--text FILE]

--quick uses the built-in synthetic model and corpus (vocab 1024). JSON:
{"n_vocab": V, "encodings": {NAME: {"bytes_per_token", "ratio_vs_llama_cpp", "kld_mean_rel_error", ...}}}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "models"
ENCODINGS = ["exact", "float16", "llamacpp_uint16", "topk", "compact"]
CANDIDATES = ["Q8_0", "Q4_K_M"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="synthetic model and built-in corpus (~30 s)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--model", help="baseline GGUF (default: ../shared/models/tinycode-a-f32.gguf)")
    ap.add_argument("--text", help="evaluation text (default: ../shared/models/corpus/eval.txt)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=None, help="evaluation chunks (default 8 quick, 32 full)")
    args = ap.parse_args(argv)

    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.engine.quantize import quantize_model
    from ggufopt_ray.metrics.encodings import get_encoding
    from ggufopt_ray.metrics.kld import log_softmax

    tmp = Path(tempfile.mkdtemp(prefix="baseline-size-"))
    n_chunks = args.chunks or (8 if args.quick else 32)
    model = Path(args.model) if args.model else SHARED / "tinycode-a-f32.gguf"
    text_path = Path(args.text) if args.text else SHARED / "corpus" / "eval.txt"
    if args.quick or not model.exists():
        if not args.quick:
            print(f"note: {model} not found; using the synthetic model", file=sys.stderr)
        from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

        model = write_synthetic_model(tmp / "tiny.gguf", SynthSpec(seed=0))
        text_path = ROOT / "ggufopt_ray" / "data" / "builtin" / "en.txt"
    settings = RuntimeSettings(n_ctx=args.ctx, n_batch=args.ctx, n_ubatch=args.ctx)
    first = args.ctx // 2
    with LogitsEngine(model, settings) as base:
        stream = base.tokenize(text_path.read_text(errors="replace"))
        step = max(args.ctx, (stream.size - args.ctx) // n_chunks)
        chunks = [base.prepare_chunk(stream[i * step:i * step + args.ctx]) for i in range(n_chunks)
                  if i * step + args.ctx <= stream.size]
        base_lp = [log_softmax(base.logits(c)[first:-1]) for c in chunks]
        n_vocab = base.n_vocab
    refs = [c[first + 1:] for c in chunks]
    cand_logits = {}
    for t in CANDIDATES:
        path = quantize_model(model, t, tmp / f"cand-{t}.gguf", threads=None).path
        with LogitsEngine(path, settings) as e:
            cand_logits[t] = [e.logits(c)[first:-1] for c in chunks]

    exact = get_encoding("exact")
    truth = {t: _metrics(exact, base_lp, refs, cand_logits[t]) for t in CANDIDATES}
    llama_bytes = 2 * n_vocab + 8
    out = {"n_vocab": n_vocab, "model": str(model), "chunks": len(chunks), "scored_tokens": sum(len(r) for r in refs),
           "llama_cpp_bytes_per_token": llama_bytes, "original_bytes_per_token": 4 * n_vocab,
           "true_kld_mean": {t: truth[t].kld_mean for t in CANDIDATES}, "encodings": {}}
    print(f"model {model.name}, vocab {n_vocab}, {out['scored_tokens']} scored tokens; "
          f"true mean KLD: " + ", ".join(f"{t} {truth[t].kld_mean:.6f}" for t in CANDIDATES))
    print(f"{'encoding':<16} {'bytes/token':>11} {'vs llama.cpp':>12} {'vs original':>11} "
          + " ".join(f"{'mean err ' + t:>16} {'p99 err ' + t:>15}" for t in CANDIDATES))
    for name in ENCODINGS:
        enc = get_encoding(name)
        bpt = enc.bytes_per_token(n_vocab)
        row = {"bytes_per_token": bpt, "ratio_vs_llama_cpp": bpt / llama_bytes, "ratio_vs_original": bpt / (4 * n_vocab)}
        errs = {}
        for t in CANDIDATES:
            s = _metrics(enc, base_lp, refs, cand_logits[t])
            errs[t] = ((s.kld_mean - truth[t].kld_mean) / truth[t].kld_mean,
                       (s.kld_p99 - truth[t].kld_p99) / truth[t].kld_p99)
            row[f"kld_mean_rel_error_{t}"] = errs[t][0]
            row[f"kld_p99_rel_error_{t}"] = errs[t][1]
        row["kld_mean_rel_error"] = max(abs(errs[t][0]) for t in CANDIDATES)
        out["encodings"][name] = row
        print(f"{name:<16} {bpt:>11,} {row['ratio_vs_llama_cpp']:>12.3f} {row['ratio_vs_original']:>11.3f} "
              + " ".join(f"{100 * errs[t][0]:>+15.3f}% {100 * errs[t][1]:>+14.3f}%" for t in CANDIDATES))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _metrics(enc, base_lp, refs, cand_logits):
    from ggufopt_ray.metrics.kld import TokenMetrics
    from ggufopt_ray.metrics.stats import summarize

    parts = [enc.kld_against(enc.encode(lp, r), cl, r) for lp, r, cl in zip(base_lp, refs, cand_logits)]
    return summarize(TokenMetrics.concat(parts))


if __name__ == "__main__":
    sys.exit(main())
