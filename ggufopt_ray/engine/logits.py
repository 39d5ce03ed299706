"""Full-vocabulary logits for every position of a token chunk, from a model loaded once.

This is the hot loop of the whole project: a baseline worker and every candidate evaluation run
it over many chunks. The model and context are created once per engine; each chunk clears the KV
cache, is decoded in ``n_batch``-sized pieces with every position marked as an output, and the
logits are copied once, straight from llama.cpp's buffer into the result array.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ggufopt_ray.engine import native
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


class LogitsEngine:
    """One loaded model + context; ``logits(tokens)`` evaluates a chunk from an empty KV cache."""

    def __init__(self, model_path: str | Path, settings: RuntimeSettings = RuntimeSettings(),
                 cb_eval=None):
        settings.validate()
        self.settings = settings
        self.model_path = str(model_path)
        native.set_verbose(settings.verbose)
        lib = native.llama()
        self._lib = lib
        self._model = native.load_model(model_path, n_gpu_layers=settings.n_gpu_layers)
        self._ctx = None
        self._batch = None
        try:
            vocab = lib.llama_model_get_vocab(self._model)
            self._vocab = vocab
            self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
            self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
            self.add_bos = bool(lib.llama_vocab_get_add_bos(vocab))
            self.bos_id = int(lib.llama_vocab_bos(vocab))
            if settings.n_ctx > self.n_ctx_train:
                raise UserError(f"n_ctx={settings.n_ctx} is longer than the model's training context "
                                f"({self.n_ctx_train}); use n_ctx <= {self.n_ctx_train}")
            self.n_batch = min(settings.n_batch, settings.n_ctx)
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = settings.n_ctx
            cparams.n_batch = self.n_batch
            cparams.n_ubatch = min(settings.n_ubatch, self.n_batch)
            cparams.n_seq_max = 1
            threads = settings.resolved_threads()
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
            cparams.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
                                       else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            cparams.no_perf = True
            if cb_eval is not None:
                self._cb_eval = cb_eval  # keep alive for as long as the context
                cparams.cb_eval = cb_eval
                cparams.cb_eval_user_data = None
            self._ctx = lib.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise UserError(f"llama.cpp could not create a context with {settings}; "
                                "lower n_ctx/n_batch or free memory")
            self._memory = lib.llama_get_memory(self._ctx)
            self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
            b = self._batch
            # Constant parts of the batch: one sequence (id 0), every position is an output.
            self._tok = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
            self._pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
            np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:] = 1
            np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))[:] = 1
            for i in range(self.n_batch):
                b.seq_id[i][0] = 0
        except BaseException:
            self.close()
            raise

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
        lib = self._lib
        lib.llama_memory_clear(self._memory, True)
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            self._tok[:m] = tokens[start:start + m]
            self._pos[:m] = np.arange(start, start + m, dtype=np.int32)
            self._batch.n_tokens = m
            rc = lib.llama_decode(self._ctx, self._batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at position {start}")
            ptr = lib.llama_get_logits(self._ctx)
            src = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                        shape=(m, self.n_vocab))
            out[start:start + m] = src
        return out

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            native.free_model(self._model)
            self._model = None

    def __enter__(self) -> "LogitsEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
