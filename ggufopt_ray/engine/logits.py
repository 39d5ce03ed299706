"""Full-vocabulary logits for every position of a token chunk, from a model loaded once.

This is the hot loop of the whole project: a baseline worker and every candidate evaluation run
it over many chunks. The model and context are created once per engine; each chunk clears the KV
cache, is decoded in ``n_batch``-sized pieces with every position marked as an output, and the
logits are copied once, straight from llama.cpp's buffer into the result array.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ggufopt_ray.engine import native
from ggufopt_ray.engine.session import ModelSession
from ggufopt_ray.engine.tokenizer import tokenize_with_vocab
from ggufopt_ray.errors import UserError


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
    """One loaded model + context; ``logits(tokens)`` evaluates a chunk from an empty KV cache."""

    def __init__(self, model_path: str | Path, settings: RuntimeSettings = RuntimeSettings(),
                 cb_eval=None):
        settings.validate()
        self.settings = settings
        super().__init__(
            model_path, n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
            n_threads=settings.resolved_threads(), n_gpu_layers=settings.n_gpu_layers,
            flash_attn=settings.flash_attn, verbose=settings.verbose, cb_eval=cb_eval,
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

    # -- logits -------------------------------------------------------------------------------
    def logits(self, tokens: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """float32 logits ``[len(tokens), n_vocab]``, one row per position, from an empty cache."""
        if self._ctx is None:
            raise RuntimeError("engine is closed")
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self._check_tokens(tokens)
        n = tokens.size
        if out is None:
            out = np.empty((n, self.n_vocab), dtype=np.float32)
        self.clear()
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            self._tok[:m] = tokens[start:start + m]
            self.decode(m, start)
            out[start:start + m] = self.output_rows(m)
        return out
