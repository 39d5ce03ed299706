"""One loaded model with one context and a batch that can carry one or several sequences.

Everything in this package that runs a model — logits, llama-bench-style speed tests,
importance-matrix collection — needs the same native setup: load the model, read its vocabulary
facts, create a context with given sizes and threads, allocate a batch, and free it all exactly
once. ``ModelSession`` is that setup; subclasses add what they compute.

A session built with ``n_seq > 1`` holds ``n_seq`` independent sequences of ``n_ctx`` tokens each
(as llama-perplexity does with ``n_batch / n_ctx`` sequences): the context gets ``n_seq * n_ctx``
cells split into per-sequence KV streams (llama.cpp's non-unified cache), so several chunks can
share one decode without attending to each other.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import numpy as np

from ggufopt_ray.engine import native
from ggufopt_ray.errors import UserError


class ModelSession:
    """A model + context + batch. ``decode(n, pos0)`` runs the first ``n`` batch entries as one
    sequence; ``decode_prepared(n)`` runs them with positions, sequence ids and output flags the
    caller wrote (``_tok``, ``_pos``, ``_out`` views and ``set_seq_ids``)."""

    def __init__(self, model_path: str | Path, *, n_ctx: int, n_batch: int, n_ubatch: int,
                 n_threads: int | None = None, n_gpu_layers: int = 0, flash_attn: bool = False,
                 verbose: bool = False, cb_eval=None,
                 train_ctx_error: Callable[[int, int], str] | None = None, n_seq: int = 1):
        """``n_ctx`` is the context of one sequence; ``n_seq`` sequences fit side by side and one
        batch holds up to ``min(n_batch, n_seq * n_ctx)`` tokens. ``train_ctx_error(n_ctx,
        n_ctx_train)`` makes a context beyond training an error with that message; without it
        such a context is allowed (llama-bench style)."""
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
            self.n_seq = max(1, int(n_seq))
            self.n_batch = min(int(n_batch), self.n_ctx * self.n_seq)
            self.n_ubatch = min(int(n_ubatch), self.n_batch)
            self.n_threads = int(n_threads) if n_threads else native.default_threads()
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = self.n_ctx * self.n_seq
            cparams.n_batch = self.n_batch
            cparams.n_ubatch = self.n_ubatch
            cparams.n_seq_max = self.n_seq
            cparams.kv_unified = False  # one KV stream per sequence: no cross-sequence attention cost
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
                raise UserError(f"llama.cpp could not create a context (n_ctx={self.n_ctx}, n_seq={self.n_seq}, "
                                f"n_batch={self.n_batch}, n_ubatch={self.n_ubatch}); lower them or free memory")
            self._memory = lib.llama_get_memory(self._ctx)
            self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
            b = self._batch
            # numpy views of the batch arrays; every token belongs to exactly one sequence, at
            # first sequence 0 with every position an output (subclasses narrow that per decode).
            self._tok = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
            self._pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
            self._out = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
            self._out[:] = 1
            np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:] = 1
            # seq_id is an array of per-token pointers (not one numpy-viewable block): keep a
            # copy of what was written so that only changed entries are touched.
            self._seq = np.zeros(self.n_batch, dtype=np.int32)
            for i in range(self.n_batch):
                b.seq_id[i][0] = 0
        except BaseException:
            self.close()
            raise

    def clear(self) -> None:
        """Empty the KV cache: the next decode starts a new sequence."""
        self._lib.llama_memory_clear(self._memory, True)

    def set_seq_ids(self, seq: np.ndarray) -> None:
        """Sequence id of each of the first ``len(seq)`` batch entries (each in ``0 .. n_seq-1``)."""
        seq = np.asarray(seq, dtype=np.int32)
        n = seq.size
        if n and (int(seq.min()) < 0 or int(seq.max()) >= self.n_seq):
            raise ValueError(f"sequence ids must be in [0, {self.n_seq}), got [{seq.min()}, {seq.max()}]")
        changed = np.flatnonzero(self._seq[:n] != seq)
        ids = self._batch.seq_id
        for i in changed.tolist():
            ids[i][0] = int(seq[i])
        self._seq[:n] = seq

    def decode(self, n: int, pos0: int) -> None:
        """Decode the first ``n`` tokens of the batch at positions ``pos0 .. pos0 + n - 1`` of
        sequence 0, with the output flags as they stand."""
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        if self._seq[:n].any():  # a multi-sequence decode left other ids behind
            self.set_seq_ids(np.zeros(n, dtype=np.int32))
        self.decode_prepared(n, where=f"position {pos0}")

    def decode_prepared(self, n: int, where: str = "") -> None:
        """Decode the first ``n`` batch entries with the tokens, positions, sequence ids and
        output flags already written."""
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}" + (f" at {where}" if where else ""))

    def output_rows(self, m: int) -> np.ndarray:
        """The logits of the last decode's ``m`` output positions (in batch order), a view of
        llama.cpp's buffer that the next decode overwrites."""
        ptr = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(m, self.n_vocab))

    def set_threads(self, n_threads: int) -> None:
        """Decode (and run the KLD step, which reads ``n_threads``) on ``n_threads`` CPU threads
        from the next call on. Results do not depend on it: ggml gives each output row to one
        thread, so the numbers are the same bit for bit (tests/test_engine.py checks)."""
        n = int(n_threads)
        if n < 1:
            raise UserError(f"n_threads must be positive, not {n}")
        if self._ctx is None:
            raise RuntimeError("engine is closed")
        if n != self.n_threads:
            self._lib.llama_set_n_threads(self._ctx, n, n)
            self.n_threads = n

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
