"""Tokenization with a model's own vocabulary, without loading its weights.

Building a corpus for a 70B model must not load 140 GB of weights just to tokenize text:
llama.cpp's ``vocab_only`` load reads the tokenizer metadata alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ggufopt_ray.engine import native


def tokenize_with_vocab(lib, vocab, text: str | bytes, add_bos: bool = False) -> np.ndarray:
    """Token ids of ``text`` with a ``llama_vocab*`` (special tokens in the text stay plain text)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    n_max = len(data) + 8
    while True:
        buf = (lib.llama_token * n_max)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, n_max, add_bos, False)
        if n >= 0:
            return np.frombuffer(buf, dtype=np.int32, count=n).copy()
        n_max = -n


class VocabTokenizer:
    """A model's tokenizer: ``tokenize``, ``bos_id``, ``add_bos``, ``n_vocab``; weights not loaded."""

    def __init__(self, model_path: str | Path, verbose: bool = False):
        native.set_verbose(verbose)
        self._lib = native.llama()
        self._model = native.load_model(model_path, vocab_only=True)
        vocab = self._lib.llama_model_get_vocab(self._model)
        self._vocab = vocab
        self.n_vocab = int(self._lib.llama_vocab_n_tokens(vocab))
        self.add_bos = bool(self._lib.llama_vocab_get_add_bos(vocab))
        self.bos_id = int(self._lib.llama_vocab_bos(vocab))

    def tokenize(self, text: str | bytes, add_bos: bool = False) -> np.ndarray:
        return tokenize_with_vocab(self._lib, self._vocab, text, add_bos)

    def close(self) -> None:
        if getattr(self, "_model", None):
            native.free_model(self._model)
            self._model = None

    def __enter__(self) -> "VocabTokenizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


def text_chunks(tokenizer, text: str | bytes, n_ctx: int, max_chunks: int | None = None) -> list[np.ndarray]:
    """Whole chunks of ``n_ctx`` tokens cut from ``text``, exactly as llama-perplexity and
    llama-imatrix cut them, so numbers computed on a text file compare with theirs.

    The text is tokenized once with BOS in front when the model adds one (llama.cpp's
    ``common_tokenize(..., add_special=true)``); the stream is cut into consecutive chunks, the
    incomplete tail is dropped, and each chunk's first token is replaced (not shifted) by BOS.
    ``tokenizer`` is anything with ``tokenize``, ``add_bos`` and ``bos_id``: a
    :class:`VocabTokenizer` or a loaded engine.
    """
    from ggufopt_ray.errors import UserError

    add_bos = bool(tokenizer.add_bos) and tokenizer.bos_id >= 0
    stream = tokenizer.tokenize(text, add_bos=add_bos)
    n = stream.size // n_ctx
    if n < 1:
        raise UserError(f"the text tokenizes to {stream.size} tokens, fewer than one chunk of {n_ctx}; "
                        "give more text or a smaller context")
    if max_chunks is not None:
        n = min(n, int(max_chunks))
    chunks = []
    for i in range(n):
        chunk = stream[i * n_ctx:(i + 1) * n_ctx].astype(np.int32, copy=True)
        if add_bos:
            chunk[0] = tokenizer.bos_id
        chunks.append(chunk)
    return chunks
