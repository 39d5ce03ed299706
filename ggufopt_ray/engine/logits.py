"""Full-vocabulary logits of the scored positions of token chunks, from a model loaded once.

This is the hot loop of the whole project: a baseline worker and every candidate evaluation run
it over many chunks. The model and context are created once per engine; each chunk clears the KV
cache and is decoded in ``n_batch``-sized pieces. Only positions from ``first`` on are marked as
outputs, as llama-perplexity marks only the second half of a chunk: llama.cpp then skips the
output norm, the output matmul (a large share of the model at big vocabularies) and the logits
copy for the rest. The logits are copied once, from llama.cpp's buffer into the result array.

When ``n_batch`` holds several chunks (``n_batch >= 2 * n_ctx``) the engine keeps
``n_batch // n_ctx`` sequences, and ``logits_many`` decodes that many chunks at once, each as
its own sequence — llama-perplexity's ``n_seq`` — which keeps the matmuls wide for short chunks.

``map_logits`` hands each chunk's rows to a function while they still sit in llama.cpp's output
buffer, without copying them: at a 49k vocabulary one chunk's scored rows are 50 MB, and the
baseline pass reads them exactly once (into its encoding), so a copy would be a whole extra pass
over memory, plus the page faults of a fresh 50 MB array per chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from ggufopt_ray.engine import native
from ggufopt_ray.engine.session import ModelSession
from ggufopt_ray.engine.tokenizer import tokenize_with_vocab
from ggufopt_ray.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class RuntimeSettings:
    """llama.cpp runtime settings that can change the logits or their speed."""

    n_ctx: int = 512
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None  # None: every CPU this process may use
    n_gpu_layers: int = 0  # layers to offload; harmless on a CPU-only build
    flash_attn: bool = False
    verbose: bool = False

    def resolved_threads(self) -> int:
        return int(self.n_threads) if self.n_threads else native.default_threads()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_threads"] = self.resolved_threads()
        return d

    def validate(self) -> None:
        if self.n_ctx < 2:
            raise UserError(f"n_ctx must be at least 2, not {self.n_ctx}")
        if not 1 <= self.n_ubatch <= self.n_batch:
            raise UserError(f"need 1 <= n_ubatch <= n_batch, got n_ubatch={self.n_ubatch}, "
                            f"n_batch={self.n_batch}; lower n_ubatch or raise n_batch")
        if self.n_threads is not None and self.n_threads < 1:
            raise UserError(f"n_threads must be positive, not {self.n_threads}")


class LogitsEngine(ModelSession):
    """One loaded model + context; ``logits(tokens)`` evaluates a chunk from an empty KV cache.

    With ``n_batch >= 2 * n_ctx`` the context holds ``n_batch // n_ctx`` sequences of ``n_ctx``
    tokens (KV memory grows accordingly) and ``logits_many`` packs that many chunks per decode.
    """

    def __init__(self, model_path: str | Path, settings: RuntimeSettings = RuntimeSettings(),
                 cb_eval=None):
        settings.validate()
        self.settings = settings
        super().__init__(
            model_path, n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
            n_threads=settings.resolved_threads(), n_gpu_layers=settings.n_gpu_layers,
            flash_attn=settings.flash_attn, verbose=settings.verbose, cb_eval=cb_eval,
            n_seq=max(1, settings.n_batch // settings.n_ctx),
            train_ctx_error=lambda n, t: (f"n_ctx={n} is longer than the model's training context ({t}); "
                                          f"use n_ctx <= {t}"))

    # -- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str | bytes, add_bos: bool = False) -> np.ndarray:
        """Token ids of ``text`` (special tokens in the text are treated as plain text)."""
        return tokenize_with_vocab(self._lib, self._vocab, text, add_bos)

    def prepare_chunk(self, tokens: Sequence[int]) -> np.ndarray:
        """A copy of ``tokens`` whose first token is BOS when the model adds one.

        llama-perplexity does the same: the first token of each chunk is replaced (not shifted)
        by BOS, so chunks cut from one token stream keep their length and the model sees the
        start-of-sequence it was trained with.
        """
        out = np.array(tokens, dtype=np.int32, copy=True)
        if out.size and self.add_bos and self.bos_id >= 0:
            out[0] = self.bos_id
        return out

    def _check_tokens(self, tokens: np.ndarray) -> None:
        if tokens.ndim != 1:
            raise UserError(f"a token chunk must be a 1-D sequence of ids, got shape {tokens.shape}")
        if tokens.size == 0:
            raise UserError("empty token chunk: nothing to evaluate; give at least one token")
        if tokens.size > self.settings.n_ctx:
            raise UserError(f"chunk of {tokens.size} tokens does not fit n_ctx={self.settings.n_ctx}; "
                            "cut chunks to n_ctx tokens or raise n_ctx")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.n_vocab:
            raise UserError(f"token ids must be in [0, {self.n_vocab}), got [{lo}, {hi}]; "
                            "the chunk was made with another tokenizer")

    def _check_first(self, n: int, first: int) -> int:
        first = int(first)
        if not 0 <= first < n:
            raise UserError(f"first output position {first} is outside 0..{n - 1} for a chunk of {n} "
                            "tokens; lower it")
        return first

    def _out_array(self, out: np.ndarray | None, rows: int) -> np.ndarray:
        shape = (rows, self.n_vocab)
        if out is None:
            return np.empty(shape, dtype=np.float32)
        if out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
        return out

    # -- logits -------------------------------------------------------------------------------
    def logits(self, tokens: Sequence[int], first: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """float32 logits ``[len(tokens) - first, n_vocab]`` of positions ``first ..
        len(tokens)-1``, from an empty cache; positions before ``first`` are decoded (they are the
        context) but not output. ``first=0`` gives every position (an importance-matrix collector
        needs that: the last layers only see output positions)."""
        if self._ctx is None:
            raise RuntimeError("engine is closed")
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self._check_tokens(tokens)
        n = tokens.size
        first = self._check_first(n, first)
        out = self._out_array(out, n - first)
        self.clear()
        done = 0  # rows of ``out`` filled
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            self._tok[:m] = tokens[start:start + m]
            k = max(0, min(m, start + m - first))  # outputs in this piece: its last k positions
            # A lone output row goes through llama.cpp's one-row matmul kernels, which round
            # differently (up to ~1e-3 on F16 weights); output one more row and drop it, so rows
            # stay those of an all-position call.
            extra = 1 if k == 1 and m >= 2 else 0
            self._out[:m - k - extra] = 0
            self._out[m - k - extra:m] = 1
            self.decode(m, start)
            if k:
                out[done:done + k] = self.output_rows(k + extra)[extra:]
                done += k
        return out

    def logits_many(self, chunks: Sequence[Sequence[int]], first: int = 0) -> list[np.ndarray]:
        """``[self.logits(c, first) for c in chunks]``, with up to ``n_seq`` chunks per decode.

        Chunks are packed in order, each as its own sequence, while they fit one batch of
        ``n_batch`` tokens; a chunk longer than that (or an engine with one sequence) is
        evaluated alone in pieces. All chunks are checked before anything runs.
        """
        return self.map_logits(chunks, lambda i, rows: np.array(rows, dtype=np.float32, copy=True), first)

    def map_logits(self, chunks: Sequence[Sequence[int]], fn: Callable[[int, np.ndarray], T],
                   first: int = 0) -> list[T]:
        """``[fn(i, rows_i) for each chunk i]``, ``rows_i`` being the float32 logits of chunk
        ``i``'s positions ``first ..`` (as ``logits(chunks[i], first)`` returns them), decoded
        ``n_seq`` chunks at a time as in ``logits_many``.

        ``rows_i`` is a read-only view of llama.cpp's output buffer whenever the chunk was decoded
        in one piece (a chunk longer than ``n_batch`` gets an array of its own): it is valid only
        during the call, since the next decode overwrites it, so ``fn`` must not keep it — copy
        what must outlive the call. Chunks decoded together are handed over in order before the
        next decode starts. All chunks are checked before anything runs.
        """
        if self._ctx is None:
            raise RuntimeError("engine is closed")
        chunks = [np.ascontiguousarray(c, dtype=np.int32) for c in chunks]
        for c in chunks:
            self._check_tokens(c)
            self._check_first(c.size, first)
        first = int(first)
        results: list = []
        i = 0
        while i < len(chunks):
            group = [chunks[i]]
            total = chunks[i].size
            while (len(group) < self.n_seq and i + len(group) < len(chunks)
                   and total + chunks[i + len(group)].size <= self.n_batch):
                total += chunks[i + len(group)].size
                group.append(chunks[i + len(group)])
            if len(group) == 1 and group[0].size > self.n_batch:
                results.append(fn(i, self.logits(group[0], first)))  # several decodes: rows of its own
            else:
                for j, rows in enumerate(self._decode_group(group, first)):
                    results.append(fn(i + j, rows))
            i += len(group)
        return results

    def _decode_group(self, group: list[np.ndarray], first: int) -> list[np.ndarray]:
        """One decode of whole chunks (together at most ``n_batch`` tokens), chunk ``s`` as
        sequence ``s``; returns read-only views of each chunk's output rows in llama.cpp's buffer."""
        total = sum(c.size for c in group)
        n_out = total - first * len(group)
        # A decode with a lone output row goes through llama.cpp's one-row matmul kernels, which
        # round differently (up to ~1e-3 on F16 weights): output one more row and drop it, so
        # rows stay those of an all-position call (as ``logits`` does).
        extra = 1 if n_out == 1 and first >= 1 else 0
        seq = np.empty(total, dtype=np.int32)
        at = 0
        for s, c in enumerate(group):
            n = c.size
            self._tok[at:at + n] = c
            self._pos[at:at + n] = np.arange(n, dtype=np.int32)
            seq[at:at + n] = s
            self._out[at:at + first - extra] = 0
            self._out[at + first - extra:at + n] = 1
            at += n
        self.set_seq_ids(seq)
        self.clear()
        self.decode_prepared(total, where=f"a batch of {len(group)} chunk(s)")
        rows = self.output_rows(n_out + extra)[extra:]
        rows.flags.writeable = False
        outs, r = [], 0
        for c in group:
            k = c.size - first
            outs.append(rows[r:r + k])
            r += k
        return outs
