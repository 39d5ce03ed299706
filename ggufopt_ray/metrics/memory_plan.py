"""How much memory one trial needs, predicted before it starts (numeric only: no Ray, no llama.cpp).

At big vocabularies the vocabulary-sized buffers dominate a trial: a 512-token chunk of float32
logits is 512·V·4 bytes (256 MiB at V = 128,256), and llama.cpp, the engine's copy and the KLD all
hold some of them. A scheduler that packs trials onto nodes needs the peak before the first trial
runs; this module adds up what a candidate evaluation of one chunk holds at once:

- the model's tensor bytes (memory-mapped; every page is touched by a forward pass);
- the KV cache: 2 (K and V) · n_layer · n_ctx · n_embd_kv · kv_bytes;
- llama.cpp's logits buffer, n_outputs · V · 4 (one decode's output rows), and its compute buffer
  (the output matmul's [n_ubatch, V] float32 result plus the widest activations);
- the engine's float32 copy of the scored rows (n_scored · V · 4);
- the baseline payload of the chunk (bytes per token of the encoding · n_scored);
- the KLD temporaries: per thread, six float32 blocks of row_block · V (kld.compare_rows) — or,
  for the compact encoding's encoder, a few more;
- a fixed runtime overhead (Python, numpy, the llama.cpp libraries), measured by bench/big_vocab.py.

``bench/big_vocab.py`` prints this prediction next to the measured peak RSS of a subprocess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MIB = 1 << 20

# What a trial process holds before its model: Python, numpy, Ray and Tune (a trial is a Ray
# worker), this package and the llama.cpp libraries. Measured in a Ray worker that imported what a
# trial does: 208 MiB (it was ~280 before trials stopped importing scipy.stats); bench/big_vocab.py
# measures a trial's peak in a process with the same imports (VmHWM, not ru_maxrss, which a forked
# child inherits), where the plan is within 0-10% of the peak at V = 32k-128k.
RUNTIME_OVERHEAD_BYTES = 230 * MIB

# float32 [row_block, V] blocks one KLD worker holds: four kernel buffers, a decoded base block
# and a converted candidate block (see kld._Scratch), rounded up for the fancy-index temporaries.
KLD_BLOCKS_PER_THREAD = 6


@dataclass(frozen=True)
class TrialMemory:
    """Predicted peak bytes of one trial, by component (``total`` is their sum)."""

    model: int
    kv_cache: int
    llama_logits: int
    llama_compute: int
    engine_rows: int
    baseline_payload: int
    kld_temporaries: int
    runtime: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def baseline_bytes_per_token(encoding: str, n_vocab: int, with_ref: bool = True, **params) -> int:
    """Bytes a baseline store keeps per scored token for ``encoding`` (its own formula)."""
    from ggufopt_ray.metrics.encodings import get_encoding

    return int(get_encoding(encoding, **params).bytes_per_token(int(n_vocab), with_ref=with_ref))


def baseline_bytes(encoding: str, n_vocab: int, n_tokens: int, **params) -> int:
    """Bytes of a whole baseline: ``n_tokens`` scored tokens in ``encoding``."""
    return int(n_tokens) * baseline_bytes_per_token(encoding, n_vocab, **params)


def plan_trial_memory(n_params_bytes: int, n_ctx: int, n_vocab: int, n_layer: int, n_embd: int,
                      encoding: str = "float16", row_block: int | None = None, *,
                      n_scored: int | None = None, n_batch: int | None = None,
                      n_ubatch: int | None = None, n_embd_kv: int | None = None, n_ff: int | None = None,
                      kv_bytes: int = 2, threads: int = 1,
                      runtime_bytes: int = RUNTIME_OVERHEAD_BYTES) -> TrialMemory:
    """Component-wise prediction; see ``predict_trial_peak_bytes`` for the arguments."""
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.metrics.kld import BLOCK_ELEMENTS, rows_per_block

    for name, value in (("n_params_bytes", n_params_bytes), ("n_ctx", n_ctx), ("n_vocab", n_vocab),
                        ("n_layer", n_layer), ("n_embd", n_embd), ("threads", threads)):
        if int(value) < (0 if name == "n_params_bytes" else 1):
            raise UserError(f"{name} must be positive, got {value}")
    v = int(n_vocab)
    n_scored = int(n_ctx) - 1 if n_scored is None else int(n_scored)
    n_batch = int(n_ctx) if n_batch is None else int(n_batch)
    n_ubatch = min(n_batch, 512) if n_ubatch is None else int(n_ubatch)
    n_embd_kv = int(n_embd) if n_embd_kv is None else int(n_embd_kv)
    n_ff = 4 * int(n_embd) if n_ff is None else int(n_ff)
    row_block = rows_per_block(v, BLOCK_ELEMENTS) if row_block is None else int(row_block)
    out_rows = min(n_batch, n_scored)  # outputs of one llama_decode call
    return TrialMemory(
        model=int(n_params_bytes),
        kv_cache=2 * int(n_layer) * int(n_ctx) * n_embd_kv * int(kv_bytes),
        llama_logits=out_rows * v * 4,
        llama_compute=min(n_ubatch, out_rows) * v * 4 + n_ubatch * (3 * n_ff + 6 * int(n_embd)) * 4,
        engine_rows=n_scored * v * 4,
        baseline_payload=n_scored * baseline_bytes_per_token(encoding, v),
        kld_temporaries=int(threads) * KLD_BLOCKS_PER_THREAD * row_block * v * 4,
        runtime=int(runtime_bytes),
    )


def predict_trial_peak_bytes(n_params_bytes: int, n_ctx: int, n_vocab: int, n_layer: int, n_embd: int,
                             encoding: str = "float16", row_block: int | None = None, **kwargs) -> int:
    """Predicted peak resident bytes of a candidate evaluation of one chunk.

    n_params_bytes: the model's tensor bytes (a quantized file's size is close). n_ctx: chunk
    length; n_scored (default n_ctx - 1) rows are output and compared. row_block: KLD rows per
    block (default from kld.BLOCK_ELEMENTS). Keywords: n_scored, n_batch (default n_ctx),
    n_ubatch (default min(n_batch, 512)), n_embd_kv (default n_embd; n_embd·n_head_kv/n_head with
    GQA), n_ff (default 4·n_embd), kv_bytes (2: f16 cache), threads (KLD threads),
    runtime_bytes (fixed overhead).
    """
    return plan_trial_memory(n_params_bytes, n_ctx, n_vocab, n_layer, n_embd, encoding, row_block,
                             **kwargs).total
