"""KLD-statistics throughput at big vocabularies: ours vs the original toolkit's style vs memory bandwidth.

Per chunk of scored tokens, both sides turn the baseline and the candidate rows into per-token KL
divergences and the chunk's statistics:

- ours: ``Float16Encoding.compare`` (float16 baseline payload + candidate float32 logits -> KLD,
  top-1 agreement, Δp, both NLLs; row blocks, 1 and 2 threads) then ``summarize``, with the kernel
  the project uses by default (the compiled one, ``ggufopt_ray/engine/kld_native.py``, unless
  ``GGUFOPT_KLD_KERNEL`` says otherwise or no C compiler is found) and, alongside, with the numpy
  kernel (``GGUFOPT_KLD_KERNEL=numpy``);
- original style (src/compare_logits.py of the original toolkit, with --precision 32): float32
  softmax of both full-vocabulary chunks, probabilities clipped to [1e-10, 1], KL = sum p (log p -
  log q), then mean, std, min, max and percentiles of the chunk.

Roofline: our compare must read 6 * n_vocab bytes per token (a float16 base row and a float32
candidate row). ``copy bandwidth`` is the traffic of ``np.copyto`` on a 256 MiB float32 array
(bytes read + written per second, one thread); ``roofline_fraction`` = our one-thread tokens/s
divided by ``copy bandwidth / (6 * n_vocab)``.

The machine's own 2-thread scaling, in the same rounds: ``bench/machine_spin.c``, a loop of
multiply-adds on registers only, timed on 1 thread and on 2 side by side (``machine_speedup_2threads``).
It says what a second core gives dense arithmetic at that moment: on a shared or virtual machine
well below 2, moving with the neighbours' load and with the clocks two busy cores run at (it is a
reference, not a strict ceiling: its wider vectors may slow the clocks more than our kernel's do);
``speedup_2threads_vs_machine`` is our speedup over it (median of per-round ratios).

Also: the compact encoding's encode speed, now vs the implementation before issue 13 (read from
git at PREVIOUS_COMMIT), alternately.

All measured alternately, round after round, in one run, BLAS/OpenMP pinned to one thread.
Rates are medians; the 2-thread speedup and the roofline fraction are medians of per-round
ratios. The machine is shared: ratios are the figures to trust, not absolute rates.

    python bench/kld_throughput.py [--quick] [--json PATH] [--vocab 32000 128256]

JSON keys (top level: the largest vocabulary): kernel (the default path's: native or numpy),
speedup_vs_original_style, roofline_fraction, tokens_per_s_1thread, tokens_per_s_2threads,
speedup_2threads, machine_speedup_2threads, speedup_2threads_vs_machine, and the numpy kernel's
numpy_kernel_tokens_per_s_1thread / _2threads, numpy_kernel_speedup_vs_original_style,
numpy_kernel_roofline_fraction, speedup_vs_numpy_kernel;
``per_vocab``: those plus the compact encode figures and accuracy, per vocabulary size.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ggufopt_ray.engine import kld_native  # noqa: E402
from ggufopt_ray.metrics.encodings import get_encoding  # noqa: E402
from ggufopt_ray.metrics.kld import log_softmax  # noqa: E402
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


def ours(enc, payload, cand_logits: np.ndarray, ref: np.ndarray, threads: int = 1, kernel: str | None = None):
    """``kernel``: None for the default path, "numpy" for the numpy kernel (through the environment
    variable that selects it, as a user would)."""
    if kernel is None:
        m = enc.compare(payload, cand_logits, ref, threads=threads)
    else:
        old = os.environ.get(KERNEL_ENV)
        os.environ[KERNEL_ENV] = kernel
        try:
            m = enc.compare(payload, cand_logits, ref, threads=threads)
        finally:
            if old is None:
                del os.environ[KERNEL_ENV]
            else:
                os.environ[KERNEL_ENV] = old
    return m, summarize(m)


KERNEL_ENV = "GGUFOPT_KLD_KERNEL"


def default_kernel_name() -> str:
    from ggufopt_ray.metrics.kld import row_kernel

    return "numpy" if row_kernel() is None else "native"


def broad_logits(rng, n, v):
    """Broad next-token distributions (Zipf-like ranks plus noise), like a small trained LM's."""
    z = -1.15 * np.log(np.arange(1, v + 1, dtype=np.float32))[None, :] + rng.standard_normal((n, v), np.float32)
    return np.take_along_axis(z, rng.permuted(np.tile(np.arange(v), (n, 1)), axis=1), axis=1) + np.float32(3.0)


def copy_bandwidth(src: np.ndarray, dst: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    dt = time.perf_counter() - t0
    return 2 * src.nbytes / dt


class MachineSpin:
    """``bench/machine_spin.c`` built with the kernels' compiler and flags, its calls sized to about
    ``seconds`` on one thread (OSError without a C compiler: then there is no native kernel to
    compare with either, and :func:`machine_spin` gives None)."""

    def __init__(self, seconds: float = 0.05):
        cc = kld_native._compiler()
        if cc is None:
            raise OSError("no C compiler")
        path = kld_native._build(cc, Path(tempfile.mkdtemp(prefix="machine-spin-")), ROOT / "bench" / "machine_spin.c")
        self.lib = ctypes.CDLL(str(path))
        self.lib.spin.restype, self.lib.spin.argtypes = ctypes.c_double, [ctypes.c_int64]
        self.iters = 1 << 16
        while self.one_thread() < seconds / 4:
            self.iters *= 2
        self.iters = int(self.iters * seconds / self.one_thread())

    def one_thread(self) -> float:
        t0 = time.perf_counter()
        self.lib.spin(self.iters)
        return time.perf_counter() - t0

    def two_threads(self) -> float:
        """Both calls side by side (ctypes lets go of the GIL during each)."""
        pair = [threading.Thread(target=self.lib.spin, args=(self.iters,)) for _ in range(2)]
        t0 = time.perf_counter()
        for t in pair:
            t.start()
        for t in pair:
            t.join()
        return time.perf_counter() - t0

    def speedup(self) -> float:
        """Twice the work on 2 threads vs once on 1: 2 where the second core is a whole one."""
        return 2 * self.one_thread() / self.two_threads()


def machine_spin() -> MachineSpin | None:
    try:
        return MachineSpin()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"note: no machine reference for the 2-thread speedup ({exc})", file=sys.stderr)
        return None


# The compact encoder before issue 13 (for the encode-speed ratio), read from git when present.
PREVIOUS_COMMIT = "2a57c8a62967a77b352bb8e169a5c7e0e1cfd71b"


def previous_compact():
    import importlib.util

    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{PREVIOUS_COMMIT}:ggufopt_ray/metrics/encodings.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "previous_encodings.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("previous_encodings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CompactEncoding()


def measure_vocab(v: int, n_chunks: int, n_tok: int, rounds: int, big, big_dst, rng, spin: MachineSpin | None) -> dict:
    """One vocabulary size: ours (float16 baseline, 1 and 2 threads) vs original style vs roofline
    vs the machine's own 2-thread scaling, alternately; compact encode now vs before."""
    from scipy.special import log_softmax as log_softmax64

    enc = get_encoding("float16")
    base_logits = [broad_logits(rng, n_tok, v) for _ in range(n_chunks)]
    cand_logits = [(b + np.float32(0.05) * rng.standard_normal(b.shape, np.float32)) for b in base_logits]
    refs = [rng.integers(0, v, n_tok) for _ in range(n_chunks)]
    payloads = [enc.encode(log_softmax(b), r) for b, r in zip(base_logits, refs)]  # what a store keeps
    n_tokens = n_chunks * n_tok

    # accuracy, once, on the first chunk: the float16 payload's KLD vs float64 KLD of the decoded
    # float16 log-probs (the encoding's own error is bench/baseline_size.py's business), and the
    # original style vs float64 on its float32 inputs
    la = log_softmax64(payloads[0]["logprobs"].astype(np.float64), axis=1)
    lb = log_softmax64(cand_logits[0].astype(np.float64), axis=1)
    exact16 = (np.exp(la) * (la - lb)).sum(axis=1) + payloads[0]["xent_correction"]
    err_ours = float(np.max(np.abs(ours(enc, payloads[0], cand_logits[0], refs[0])[0].kld / exact16 - 1)))
    err_numpy = float(np.max(np.abs(ours(enc, payloads[0], cand_logits[0], refs[0], kernel="numpy")[0].kld
                                    / exact16 - 1)))
    la = log_softmax64(base_logits[0].astype(np.float64), axis=1)
    exact = (np.exp(la) * (la - lb)).sum(axis=1)
    err_orig = float(np.max(np.abs(original_style(base_logits[0], cand_logits[0])["kl"] / exact - 1)))
    del la, lb

    t1, t2, t1n, t2n, t_orig, bw, machine = [], [], [], [], [], [], []
    for _ in range(rounds):
        for times, threads, kernel in ((t1, 1, None), (t2, 2, None), (t1n, 1, "numpy"), (t2n, 2, "numpy")):
            t0 = time.perf_counter()
            for p, c, r in zip(payloads, cand_logits, refs):
                ours(enc, p, c, r, threads, kernel)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b, c in zip(base_logits, cand_logits):
            original_style(b, c)
        t_orig.append(time.perf_counter() - t0)
        bw.append(copy_bandwidth(big, big_dst))
        if spin is not None:
            machine.append(spin.speedup())

    # compact encode: now vs the previous implementation, alternately on one chunk's rows
    lp = log_softmax(base_logits[0][: min(n_tok, 64)])
    compact, before = get_encoding("compact"), previous_compact()
    # One untimed call each first: the first call loads the compiled encoder (and warms the
    # caches), which is not the encoder's speed; with only two timed calls it halved the median.
    compact.encode(lp, refs[0][: lp.shape[0]])
    if before is not None:
        before.encode(lp, refs[0][: lp.shape[0]])
    te, te_old = [], []
    for _ in range(max(3, rounds)):
        t0 = time.perf_counter()
        compact.encode(lp, refs[0][: lp.shape[0]])
        te.append(time.perf_counter() - t0)
        if before is not None:
            t0 = time.perf_counter()
            before.encode(lp, refs[0][: lp.shape[0]])
            te_old.append(time.perf_counter() - t0)

    tps1 = n_tokens / float(np.median(t1))
    tps2 = n_tokens / float(np.median(t2))
    tps1n = n_tokens / float(np.median(t1n))
    tps2n = n_tokens / float(np.median(t2n))
    tps_orig = n_tokens / float(np.median(t_orig))
    bandwidth = float(np.median(bw))
    bytes_per_token = 6 * v  # float16 base row + float32 candidate row
    roofline_tps = bandwidth / bytes_per_token
    # ratios of two measurements: median of the per-round ratios (each round measures both within
    # a second or two, so the machine's drift over minutes cancels; a ratio of medians would not)
    t1a, t2a, t1na, t2na, bwa = (np.asarray(x, float) for x in (t1, t2, t1n, t2n, bw))
    speedup2 = float(np.median(t1a / t2a))
    speedup2n = float(np.median(t1na / t2na))
    machine2 = float(np.median(machine)) if machine else None
    vs_machine = float(np.median((t1a / t2a) / np.asarray(machine))) if machine else None
    roofline = float(np.median((n_tokens / t1a) / (bwa / bytes_per_token)))
    roofline_n = float(np.median((n_tokens / t1na) / (bwa / bytes_per_token)))
    enc_tps = lp.shape[0] / float(np.median(te))
    enc_old = lp.shape[0] / float(np.median(te_old)) if te_old else None
    # like the other ratios: the median of per-round ratios (both timed within a second)
    enc_speedup = float(np.median(np.asarray(te_old) / np.asarray(te))) if te_old else None
    return {
        "n_vocab": v, "tokens_per_chunk": n_tok, "chunks": n_chunks, "rounds": rounds, "kernel": default_kernel_name(),
        "tokens_per_s": tps1, "tokens_per_s_1thread": tps1, "tokens_per_s_2threads": tps2,
        "speedup_2threads": speedup2, "machine_speedup_2threads": machine2, "speedup_2threads_vs_machine": vs_machine,
        "original_style_tokens_per_s": tps_orig, "speedup_vs_original_style": tps1 / tps_orig,
        "speedup_vs_original_style_2threads": tps2 / tps_orig,
        "roofline_fraction": roofline, "roofline_tokens_per_s": roofline_tps,
        "copy_bandwidth_bytes_per_s": bandwidth, "bytes_read_per_token": bytes_per_token,
        "numpy_kernel_tokens_per_s_1thread": tps1n, "numpy_kernel_tokens_per_s_2threads": tps2n,
        "numpy_kernel_speedup_2threads": speedup2n,
        "numpy_kernel_speedup_vs_original_style": tps1n / tps_orig,
        "numpy_kernel_roofline_fraction": roofline_n, "speedup_vs_numpy_kernel": tps1 / tps1n,
        "max_rel_error_vs_float64": err_ours, "numpy_kernel_max_rel_error_vs_float64": err_numpy,
        "original_style_max_rel_error_vs_float64": err_orig,
        "compact_encode_tokens_per_s": enc_tps, "previous_compact_encode_tokens_per_s": enc_old,
        "compact_encode_speedup": enc_speedup,
    }


def fmt2(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (about a minute or two)")
    ap.add_argument("--json", type=Path, help="write the figures as one JSON object to this file")
    ap.add_argument("--rounds", type=int, default=None, help="alternating measurement rounds")
    ap.add_argument("--vocab", type=int, nargs="*", default=None, help="vocabulary sizes (default 32000 128256)")
    args = ap.parse_args(argv)

    vocabs = args.vocab or [32000, 128256]
    # A chunk is what one compare call gets in a sweep: the scored half of a 512-token context
    # (model.n_ctx=512 and metrics.scored_from unset, i.e. n_ctx // 2: the defaults, as in
    # llama-perplexity).
    n_chunks, n_tok = (2, 128) if args.quick else (4, 256)
    rounds = args.rounds or (3 if args.quick else 5)
    rng = np.random.default_rng(0)
    big = np.ones(64 << 20, np.float32)  # 256 MiB, far beyond the caches
    big_dst = np.empty_like(big)
    copy_bandwidth(big, big_dst)  # touch the pages once
    spin = machine_spin()
    per_vocab = [measure_vocab(v, n_chunks, n_tok, rounds, big, big_dst, rng, spin) for v in vocabs]
    del big, big_dst

    print(f"KLD statistics against a float16 baseline (Float16Encoding.compare + summarize), BLAS 1 thread, "
          f"median of {rounds} alternating rounds; machine = bench/machine_spin.c's 2-thread speedup; "
          f"roofline = copy bandwidth / (6 V bytes per token); "
          f"kernel: {per_vocab[-1]['kernel']} (numpy kernel alongside)")
    print(f"{'n_vocab':>8s} {'kernel':>7s} {'tok/s 1t':>9s} {'tok/s 2t':>9s} {'2t speedup':>10s} {'machine':>7s} "
          f"{'orig tok/s':>10s} {'vs orig':>8s} {'roofline':>9s} {'max rel err':>11s} {'compact enc':>11s} "
          f"{'vs before':>9s}")
    for r in per_vocab:
        sp = r["compact_encode_speedup"]
        print(f"{r['n_vocab']:8d} {r['kernel']:>7s} {r['tokens_per_s_1thread']:9.0f} {r['tokens_per_s_2threads']:9.0f} "
              f"{r['speedup_2threads']:10.2f} {fmt2(r['machine_speedup_2threads']):>7s} "
              f"{r['original_style_tokens_per_s']:10.0f} "
              f"{r['speedup_vs_original_style']:8.2f} {r['roofline_fraction']:9.3f} "
              f"{r['max_rel_error_vs_float64']:11.1e} {r['compact_encode_tokens_per_s']:11.0f} "
              f"{(f'{sp:.2f}' if sp else 'n/a'):>9s}")
        print(f"{'':8s} {'numpy':>7s} {r['numpy_kernel_tokens_per_s_1thread']:9.0f} "
              f"{r['numpy_kernel_tokens_per_s_2threads']:9.0f} {r['numpy_kernel_speedup_2threads']:10.2f} "
              f"{'':7s} {'':10s} "
              f"{r['numpy_kernel_speedup_vs_original_style']:8.2f} {r['numpy_kernel_roofline_fraction']:9.3f} "
              f"{r['numpy_kernel_max_rel_error_vs_float64']:11.1e}")
    head = per_vocab[-1]  # the largest vocabulary's figures at the top level
    result = {**{k: head[k] for k in ("kernel", "speedup_vs_original_style", "roofline_fraction",
                                      "tokens_per_s_1thread", "tokens_per_s_2threads", "speedup_2threads",
                                      "machine_speedup_2threads", "speedup_2threads_vs_machine",
                                      "numpy_kernel_tokens_per_s_1thread", "numpy_kernel_tokens_per_s_2threads",
                                      "numpy_kernel_speedup_vs_original_style", "numpy_kernel_roofline_fraction",
                                      "speedup_vs_numpy_kernel", "n_vocab")},
              "threads": [1, 2], "per_vocab": per_vocab}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
