"""From a data source to a chunks file in one call: the function the CLI and the sweep share.

``prepare_chunks`` collects the corpus (through the cache), opens the target model's tokenizer,
and writes the chunks file, unless a file with the same fingerprint is already there, in which
case it is reused as it is (a rerun of a sweep does not re-tokenize anything).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggufopt_ray.data.cache import Corpus, collect_corpus, default_cache_dir
from ggufopt_ray.data.chunks import (ChunkParams, Tokenizer, build_chunks, fingerprints,
                                     read_chunk_metadata, separator_tokens, text_hash)
from ggufopt_ray.data.plugins import DataSource, make_source
from ggufopt_ray.errors import UserError


def check_model_for_chunks(model_path: str | Path, chunk_size: int | None = None):
    """Inspect the GGUF (fast, no llama.cpp) and refuse chunks longer than its training context.

    Called before fetching a corpus, so a wrong model path fails at once, not after a download.
    """
    from ggufopt_ray.gguf.inspect import inspect_model

    info = inspect_model(model_path)
    if chunk_size is not None and info.context_length and chunk_size > int(info.context_length):
        raise UserError(f"chunks of {chunk_size} tokens do not fit the training context of "
                        f"{model_path} ({info.context_length} tokens); lower --chunk-size")
    return info


@contextmanager
def model_tokenizer(model_path: str | Path, n_threads: int | None = None,
                    chunk_size: int | None = None) -> Iterator[Tokenizer]:
    """The tokenizer of a GGUF model, through the engine (the model stays loaded inside the block).

    With ``chunk_size``, a model whose training context is shorter is refused up front.
    """
    from ggufopt_ray.engine.tokenizer import VocabTokenizer

    info = check_model_for_chunks(model_path, chunk_size)
    engine = VocabTokenizer(model_path)  # vocabulary only: the weights are not loaded
    try:
        yield Tokenizer.from_engine(engine, info.vocab_fingerprint)
    finally:
        engine.close()


@dataclass
class ChunkFile:
    """A chunks file on disk and what identifies it."""

    path: Path
    fingerprint: str
    set_fingerprints: dict[str, str]
    vocab_fingerprint: str
    reused: bool
    counts: dict[str, int]
    report: list[dict[str, Any]] = field(default_factory=list)


def _chunk_file(path: Path, meta: dict[str, Any], reused: bool) -> ChunkFile:
    return ChunkFile(path=path, fingerprint=meta["fingerprint"], set_fingerprints=meta["set_fingerprints"],
                     vocab_fingerprint=meta["vocab_fingerprint"], reused=reused, counts=meta["counts"],
                     report=meta["report"])


def chunks_from_corpus(output: str | Path, corpus: Corpus, tokenizer: Tokenizer, params: ChunkParams,
                       *, reuse: bool = True, progress: bool = False) -> ChunkFile:
    """Write the chunks of ``corpus`` to ``output``; keep an existing file with the same fingerprint."""
    output = Path(output)
    params.validate()
    if reuse and output.is_file():
        separator = separator_tokens(tokenizer, params)
        want, _ = fingerprints(tokenizer.vocab_fingerprint, text_hash(corpus.texts), corpus.langs,
                               params, tokenizer.add_bos, tokenizer.bos_id, separator)
        try:
            meta = read_chunk_metadata(output)
        except UserError:
            meta = None
        if meta is not None and meta["fingerprint"] == want:
            return _chunk_file(output, meta, reused=True)
    dataset = build_chunks(corpus.texts, tokenizer, params, progress=progress)
    dataset.write(output)
    return _chunk_file(output, dataset.metadata(), reused=False)


def prepare_chunks(output: str | Path, *, model_path: str | Path, params: ChunkParams,
                   source: DataSource | None = None, langs: list[str] | None = None,
                   samples_per_lang: int = 200, skip: int = 0, cache_dir: str | Path | None = "auto",
                   overwrite_cache: bool = False, reuse: bool = True, progress: bool = False,
                   n_threads: int | None = None) -> ChunkFile:
    """Corpus -> tokenizer of ``model_path`` -> chunks file at ``output`` (reused when up to date).

    ``source`` defaults to the built-in corpus. ``cache_dir="auto"`` caches sources that are slow
    to read (``source.cache_by_default``: Hugging Face) in :func:`default_cache_dir` and reads
    local files directly; ``None`` never caches. Read the sets back with
    ``load_chunks(result.path, "calibration" | "evaluation", fingerprint=..., n_ctx=...)``.
    """
    check_model_for_chunks(model_path, params.n_ctx)  # before a possibly long fetch
    source = source if source is not None else make_source("builtin")
    if isinstance(cache_dir, str) and cache_dir == "auto":
        cache_dir = default_cache_dir() if source.cache_by_default else None
    corpus = collect_corpus(source, langs, samples_per_lang, skip=skip, cache_dir=cache_dir,
                            overwrite=overwrite_cache, progress=progress)
    with model_tokenizer(model_path, n_threads=n_threads, chunk_size=params.n_ctx) as tokenizer:
        return chunks_from_corpus(output, corpus, tokenizer, params, reuse=reuse, progress=progress)
