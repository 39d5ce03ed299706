"""KLD-statistics throughput: this implementation vs the original toolkit's style vs memory bandwidth.

Per chunk of scored tokens, both sides turn the baseline and the candidate rows into per-token KL
divergences and the chunk's statistics:

- ours: ``kld_per_token`` (baseline float32 log-probs + candidate float32 logits -> KLD, top-1
  agreement, Δp, both NLLs) then ``summarize`` (mean ± SE, exact percentiles, PPLs, ...);
- original style (src/compare_logits.py of the original toolkit, with --precision 32): float32
  softmax of both full-vocabulary chunks, probabilities clipped to [1e-10, 1], KL = sum p (log p -
  log q), then mean, std, min, max and percentiles of the chunk.

Roofline: the KLD must read 8 * n_vocab bytes per token (a float32 row of each side); nothing
else is proportional to the vocabulary. ``copy bandwidth`` is the traffic of ``np.copyto`` on a
256 MiB float32 array (bytes read + bytes written, per second; the STREAM "copy" convention) on
this machine, one thread. ``roofline tokens/s = copy bandwidth / (8 * n_vocab)``: how fast a pass
that only streams the two inputs at the speed of a numpy copy would go; ``roofline_fraction`` =
our tokens/s divided by that.

The three are measured alternately, round after round, in one run (medians reported), with BLAS
and OpenMP pinned to one thread so that both sides use one core (the machine is shared).

    python bench/kld_throughput.py [--quick] [--json PATH]

Default shape: 8 chunks of 256 tokens x 32000 vocabulary (llama-2 size); --quick: 4 x 256 x 8192.
JSON keys: tokens_per_s, original_style_tokens_per_s, speedup_vs_original_style,
roofline_fraction (plus the shape, bandwidth and accuracy figures).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ggufopt_ray.metrics.kld import kld_per_token, log_softmax  # noqa: E402
from ggufopt_ray.metrics.stats import summarize  # noqa: E402


def original_style(base_logits: np.ndarray, cand_logits: np.ndarray) -> dict:
    """The original toolkit's per-chunk KL and statistics, float32, whole chunk at once."""
    p = base_logits.astype(np.float32)
    q = cand_logits.astype(np.float32)
    p = np.exp(p - p.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    q = np.exp(q - q.max(axis=-1, keepdims=True))
    q /= q.sum(axis=-1, keepdims=True)
    p = np.clip(p, 1e-10, 1)
    q = np.clip(q, 1e-10, 1)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    kl = np.where(np.isfinite(kl), kl, 0)
    stats = {"Average": float(kl.mean()), "StdDev": float(kl.std()), "Minimum": float(kl.min()),
             "Maximum": float(kl.max())}
    for q_ in (99, 95, 90, 50, 10, 5, 1):
        stats[f"KLD_{q_:02d}"] = float(np.percentile(kl, q_))
    return {"kl": kl, "stats": stats}


def ours(base_lp: np.ndarray, cand_logits: np.ndarray, ref: np.ndarray):
    m = kld_per_token(base_lp, cand_logits, ref)
    return m, summarize(m)


def broad_logits(rng, n, v):
    """Broad next-token distributions (Zipf-like ranks plus noise), like a small trained LM's."""
    z = -1.15 * np.log(np.arange(1, v + 1, dtype=np.float32))[None, :] + rng.standard_normal((n, v), np.float32)
    return np.take_along_axis(z, rng.permuted(np.tile(np.arange(v), (n, 1)), axis=1), axis=1) + np.float32(3.0)


def copy_bandwidth(src: np.ndarray, dst: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    dt = time.perf_counter() - t0
    return 2 * src.nbytes / dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape, few rounds (about a minute or less)")
    ap.add_argument("--json", type=Path, help="write the figures as one JSON object to this file")
    ap.add_argument("--rounds", type=int, default=None, help="alternating measurement rounds")
    args = ap.parse_args(argv)

    n_chunks, n_tok, v = (4, 256, 8192) if args.quick else (8, 256, 32000)
    rounds = args.rounds or (3 if args.quick else 5)
    rng = np.random.default_rng(0)
    base_logits = [broad_logits(rng, n_tok, v) for _ in range(n_chunks)]
    cand_logits = [(b + np.float32(0.05) * rng.standard_normal(b.shape, np.float32)) for b in base_logits]
    base_lp = [log_softmax(b) for b in base_logits]  # what a baseline store keeps
    refs = [rng.integers(0, v, n_tok) for _ in range(n_chunks)]
    big = np.ones(64 << 20, np.float32)  # 256 MiB, far beyond the caches
    big_dst = np.empty_like(big)
    n_tokens = n_chunks * n_tok

    # accuracy, once: both against a float64 reference on the first chunk
    from scipy.special import log_softmax as log_softmax64

    la = log_softmax64(base_lp[0].astype(np.float64), axis=1)
    lb = log_softmax64(cand_logits[0].astype(np.float64), axis=1)
    exact = (np.exp(la) * (la - lb)).sum(axis=1)
    err_ours = float(np.max(np.abs(ours(base_lp[0], cand_logits[0], refs[0])[0].kld / exact - 1)))
    err_orig = float(np.max(np.abs(original_style(base_logits[0], cand_logits[0])["kl"] / exact - 1)))

    t_ours, t_orig, bw = [], [], []
    copy_bandwidth(big, big_dst)  # touch the pages once
    for _ in range(rounds):
        t0 = time.perf_counter()
        for b, c, r in zip(base_lp, cand_logits, refs):
            ours(b, c, r)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b, c in zip(base_logits, cand_logits):
            original_style(b, c)
        t_orig.append(time.perf_counter() - t0)
        bw.append(copy_bandwidth(big, big_dst))

    tps = n_tokens / float(np.median(t_ours))
    tps_orig = n_tokens / float(np.median(t_orig))
    bandwidth = float(np.median(bw))
    bytes_per_token = 8 * v
    roofline_tps = bandwidth / bytes_per_token
    result = {
        "tokens_per_s": tps,
        "original_style_tokens_per_s": tps_orig,
        "speedup_vs_original_style": tps / tps_orig,
        "roofline_fraction": tps / roofline_tps,
        "roofline_tokens_per_s": roofline_tps,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "bytes_read_per_token": bytes_per_token,
        "n_vocab": v, "tokens_per_chunk": n_tok, "chunks": n_chunks, "rounds": rounds, "threads": 1,
        "max_rel_error_vs_float64": err_ours, "original_style_max_rel_error_vs_float64": err_orig,
    }
    print(f"KLD statistics, {n_chunks} chunks x {n_tok} tokens x {v} vocab, one thread, "
          f"median of {rounds} alternating rounds")
    print(f"{'':34s} {'tokens/s':>10s} {'ratio':>8s} {'max rel err vs f64':>19s}")
    print(f"{'ours (kld_per_token + summarize)':34s} {tps:10.0f} {1.0:8.2f} {err_ours:19.1e}")
    print(f"{'original style (float32 softmax)':34s} {tps_orig:10.0f} {tps_orig / tps:8.2f} {err_orig:19.1e}")
    print(f"{'roofline (copy bandwidth / 8V)':34s} {roofline_tps:10.0f} {roofline_tps / tps:8.2f}")
    print(f"speedup vs original style: {tps / tps_orig:.2f}x; roofline fraction: {tps / roofline_tps:.2f} "
          f"(copy bandwidth {bandwidth / 1e9:.1f} GB/s, {bytes_per_token} bytes read per token)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
