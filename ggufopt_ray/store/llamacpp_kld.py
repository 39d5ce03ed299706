"""llama-perplexity's KL-divergence base file (``--kl-divergence-base``), read and written.

People who publish quants often already have these files for big models, and computing a
baseline is the most expensive step; importing one saves it. Exporting ours lets anyone check
our baseline with llama.cpp's own ``llama-perplexity --kl-divergence``.

Layout (little-endian, as llama-perplexity writes it):

- ``b"_logits_"``, ``uint32 n_ctx``, ``int32 n_vocab``, ``int32 n_chunk``;
- ``int32 tokens[n_chunk * n_ctx]``: the evaluated token stream (llama-perplexity puts BOS in
  place of each chunk's first token when it evaluates, so that token's stored value is moot);
- per chunk, for each of its ``n_ctx - 1 - n_ctx/2`` scored positions, one row of
  ``nv = 2*ceil(n_vocab/2) + 4`` uint16: float32 ``scale`` and float32 ``min_log_prob`` (two
  uint16 each), then one uint16 code per vocabulary entry (padded to an even count) with
  ``log p = scale * code + min_log_prob``.

That row is exactly our ``llamacpp_uint16`` encoding's payload, so nothing is re-encoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufopt_ray.errors import UserError

MAGIC = b"_logits_"
_HEADER = 8 + 4 + 4 + 4


def row_width(n_vocab: int) -> int:
    """uint16 values per scored position."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


@dataclass
class KldBaseFile:
    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 [n_chunk, n_ctx]

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    def payload(self, index: int) -> dict:
        """Chunk ``index`` as a ``llamacpp_uint16`` payload (codes, scale, min_log_prob)."""
        if not 0 <= index < self.n_chunk:
            raise IndexError(index)
        rows, nv = scored_per_chunk(self.n_ctx), row_width(self.n_vocab)
        offset = _HEADER + self.tokens.nbytes + index * rows * nv * 2
        block = np.fromfile(self.path, dtype="<u2", count=rows * nv, offset=offset).reshape(rows, nv)
        params = np.ascontiguousarray(block[:, :4]).view("<f4")
        payload = {"codes": np.ascontiguousarray(block[:, 4:4 + self.n_vocab]).astype(np.uint16),
                   "scale": params[:, 0].astype(np.float32), "min_log_prob": params[:, 1].astype(np.float32)}
        problem = payload_problem(payload, self.n_vocab)
        if problem:
            raise UserError(f"{self.path}: chunk {index} is not valid log-probabilities ({problem}); "
                            "the file is damaged: write it again with llama-perplexity --kl-divergence-base")
        return payload


def payload_problem(payload: dict, n_vocab: int) -> str | None:
    """Why a decoded chunk cannot be llama-perplexity's log-probabilities (None if it can be).

    llama-perplexity writes, per row, ``scale = (max - min) / 65535`` with ``max - min <= 16`` nats
    and ``min_log_prob = min - max - logsumexp``, in ``[-(16 + log V), 0]``; the decoded
    ``log p = scale * code + min_log_prob`` sum (as probabilities) to 1, up to the mass that
    clamping at 16 nats below the top adds (at most ``V e^-16``) and rounding. A valid header over
    a garbage payload fails these checks instead of turning into inf/nan KL-divergences later.
    """
    scale = np.asarray(payload["scale"], np.float64)
    minlp = np.asarray(payload["min_log_prob"], np.float64)
    codes = payload["codes"]
    if not (np.isfinite(scale).all() and np.isfinite(minlp).all()):
        return "a row's scale or min_log_prob is not finite"
    clamp, log_v = 16.0, float(np.log(n_vocab))
    if (scale < 0).any() or (scale > clamp / 65535 * (1 + 1e-4)).any():
        bad = scale[(scale < 0) | (scale > clamp / 65535 * (1 + 1e-4))][0]
        return f"a row's scale is {bad:g}, outside [0, 16/65535]"
    if (minlp > 1e-3).any() or (minlp < -(clamp + log_v) - 1e-3).any():
        bad = minlp[(minlp > 1e-3) | (minlp < -(clamp + log_v) - 1e-3)][0]
        return f"a row's min_log_prob is {bad:g}, outside [-(16 + log V), 0]"
    high = float(np.log1p(n_vocab * np.exp(-clamp))) + 1e-2
    for r0 in range(0, len(scale), 64):
        r1 = min(len(scale), r0 + 64)
        lp = scale[r0:r1, None] * np.asarray(codes[r0:r1], np.float64) + minlp[r0:r1, None]
        top = lp.max(axis=1)
        lse = top + np.log(np.exp(lp - top[:, None]).sum(axis=1))
        off = (lse < -1e-2) | (lse > high)
        if off.any():
            return (f"row {r0 + int(np.argmax(off))}'s probabilities sum to "
                    f"{float(np.exp(lse[off][0])):.4g}, not 1")
    return None


def read_kld_base(path: str | Path) -> KldBaseFile:
    """Open a llama-perplexity base file, checking its header against its length."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a file written by llama-perplexity --kl-divergence-base")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER)
    if len(head) < _HEADER or head[:8] != MAGIC:
        raise UserError(f"{path} is not a llama-perplexity KL-divergence base file (no '_logits_' header)")
    n_ctx = int(np.frombuffer(head, "<u4", 1, 8)[0])
    n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, "<i4", 2, 12))
    if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
        raise UserError(f"{path}: header says n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}; the file is damaged")
    expected = _HEADER + 4 * n_ctx * n_chunk + 2 * n_chunk * scored_per_chunk(n_ctx) * row_width(n_vocab)
    if size != expected:
        raise UserError(f"{path} has {size:,} bytes but its header ({n_chunk} chunks of {n_ctx}, vocab {n_vocab}) "
                        f"needs {expected:,}; the file is truncated or damaged, write it again")
    tokens = np.fromfile(path, dtype="<i4", count=n_ctx * n_chunk, offset=_HEADER).reshape(n_chunk, n_ctx)
    return KldBaseFile(path, n_ctx, n_vocab, n_chunk, tokens.astype(np.int32))


def write_kld_base(path: str | Path, n_ctx: int, n_vocab: int, chunks, payloads) -> Path:
    """Write ``chunks`` (int32 token arrays of ``n_ctx``) and their ``llamacpp_uint16`` payloads.

    Written to ``path.partial`` and renamed when complete, so a half-written file never looks done.
    """
    path = Path(path)
    rows, nv = scored_per_chunk(n_ctx), row_width(n_vocab)
    tmp = path.with_name(path.name + ".partial")
    try:
        _write_file(tmp, n_ctx, n_vocab, chunks, payloads, rows, nv)
        os.replace(tmp, path)
    except OSError as exc:
        from ggufopt_ray.store.chunkdir import write_failed

        raise write_failed(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_file(tmp: Path, n_ctx: int, n_vocab: int, chunks, payloads, rows: int, nv: int) -> None:
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(np.array([n_ctx], "<u4").tobytes())
        f.write(np.array([n_vocab, len(chunks)], "<i4").tobytes())
        for tokens in chunks:
            tokens = np.asarray(tokens)
            if tokens.shape != (n_ctx,):
                raise ValueError(f"a chunk has {tokens.shape} tokens, expected ({n_ctx},)")
            f.write(tokens.astype("<i4").tobytes())
        for payload in payloads:
            codes = np.asarray(payload["codes"])
            if codes.shape != (rows, n_vocab):
                raise ValueError(f"payload codes have shape {codes.shape}, expected ({rows}, {n_vocab})")
            block = np.zeros((rows, nv), "<u2")
            params = np.stack([np.asarray(payload["scale"], "<f4"), np.asarray(payload["min_log_prob"], "<f4")], 1)
            block[:, :4] = params.view("<u2")
            block[:, 4:4 + n_vocab] = codes
            f.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())
