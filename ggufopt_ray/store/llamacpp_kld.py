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
        return {"codes": np.ascontiguousarray(block[:, 4:4 + self.n_vocab]).astype(np.uint16),
                "scale": params[:, 0].astype(np.float32), "min_log_prob": params[:, 1].astype(np.float32)}


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
    os.replace(tmp, path)
    return path
