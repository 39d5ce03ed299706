"""One loaded model with one context and a single-sequence batch.

Everything in this package that runs a model — all-position logits, llama-bench-style speed
tests, importance-matrix collection — needs the same native setup: load the model, read its
vocabulary facts, create a context with given sizes and threads, allocate a batch for sequence 0,
and free it all exactly once. ``ModelSession`` is that setup; subclasses add what they compute.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import numpy as np

from ggufopt_ray.engine import native
from ggufopt_ray.errors import UserError


class ModelSession:
    """A model + context + batch. ``decode(n, pos0)`` runs the first ``n`` batch entries."""

    def __init__(self, model_path: str | Path, *, n_ctx: int, n_batch: int, n_ubatch: int,
                 n_threads: int | None = None, n_gpu_layers: int = 0, flash_attn: bool = False,
                 verbose: bool = False, cb_eval=None,
                 train_ctx_error: Callable[[int, int], str] | None = None):
        """``train_ctx_error(n_ctx, n_ctx_train)`` makes a context beyond training an error with
        that message; without it such a context is allowed (llama-bench style)."""
        self.model_path = str(model_path)
        native.set_verbose(verbose)
        lib = native.llama()
        self._lib = lib
        self._ctx = None
        self._batch = None
        self._model = native.load_model(model_path, n_gpu_layers=n_gpu_layers)
        try:
            self._vocab = lib.llama_model_get_vocab(self._model)
            self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
            self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
            self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
            self.bos_id = int(lib.llama_vocab_bos(self._vocab))
            if train_ctx_error is not None and n_ctx > self.n_ctx_train:
                raise UserError(train_ctx_error(int(n_ctx), self.n_ctx_train))
            self.n_ctx = int(n_ctx)
            self.n_batch = min(int(n_batch), self.n_ctx)
            self.n_ubatch = min(int(n_ubatch), self.n_batch)
            self.n_threads = int(n_threads) if n_threads else native.default_threads()
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = self.n_ctx
            cparams.n_batch = self.n_batch
            cparams.n_ubatch = self.n_ubatch
            cparams.n_seq_max = 1
            cparams.n_threads = self.n_threads
            cparams.n_threads_batch = self.n_threads
            cparams.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                       else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            cparams.no_perf = True
            if cb_eval is not None:
                self._cb_eval = cb_eval  # llama.cpp keeps the raw pointer: keep the callback alive
                cparams.cb_eval = cb_eval
                cparams.cb_eval_user_data = None
            self._ctx = lib.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise UserError(f"llama.cpp could not create a context (n_ctx={self.n_ctx}, "
                                f"n_batch={self.n_batch}, n_ubatch={self.n_ubatch}); lower them or free memory")
            self._memory = lib.llama_get_memory(self._ctx)
            self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
            b = self._batch
            # numpy views of the batch arrays; everything belongs to sequence 0.
            self._tok = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
            self._pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
            self._out = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
            self._out[:] = 1
            np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:] = 1
            for i in range(self.n_batch):
                b.seq_id[i][0] = 0
        except BaseException:
            self.close()
            raise

    def clear(self) -> None:
        """Empty the KV cache: the next decode starts a new sequence."""
        self._lib.llama_memory_clear(self._memory, True)

    def decode(self, n: int, pos0: int) -> None:
        """Decode the first ``n`` tokens of the batch at positions ``pos0 .. pos0 + n - 1``."""
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {pos0}")

    def output_rows(self, m: int) -> np.ndarray:
        """The logits of the last decode's ``m`` output positions, a view of llama.cpp's buffer."""
        ptr = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(m, self.n_vocab))

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            native.free_model(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
