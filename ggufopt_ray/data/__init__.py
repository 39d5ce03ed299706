"""Corpus and token chunks: data-source plugins, a per-language cache, calibration/evaluation sets.

The path from text to what the engine evaluates:

- :mod:`~ggufopt_ray.data.plugins` - where text comes from (registered names, entry points,
  plugin files) and how to find it in a record (a dotted field path);
- :mod:`~ggufopt_ray.data.hf`, :mod:`~ggufopt_ray.data.local` - the built-in sources (Hugging
  Face ``datasets``, OSCAR preset, local files, the shipped corpus);
- :mod:`~ggufopt_ray.data.cache` - incremental, crash-safe per-language caching of fetched text;
- :mod:`~ggufopt_ray.data.chunks` - seeded, balanced, fingerprinted token chunks in two disjoint
  sets, stored as Parquet, and the loader that checks them;
- :mod:`~ggufopt_ray.data.build` - all of the above in one call (``prepare_chunks``).
"""

from ggufopt_ray.data.build import ChunkFile, chunks_from_corpus, model_tokenizer, prepare_chunks
from ggufopt_ray.data.cache import Corpus, CorpusCache, collect_corpus, default_cache_dir
from ggufopt_ray.data.chunks import (ChunkDataset, ChunkParams, ChunkSet, Tokenizer, build_chunks,
                                     load_chunks, read_chunk_metadata)
from ggufopt_ray.data.plugins import (DataSource, extract_field, get_source_class,
                                      load_source_class_from_file, make_source, register_source,
                                      registered_sources)

__all__ = [
    "ChunkDataset", "ChunkFile", "ChunkParams", "ChunkSet", "Corpus", "CorpusCache", "DataSource",
    "Tokenizer", "build_chunks", "chunks_from_corpus", "collect_corpus", "default_cache_dir",
    "extract_field", "get_source_class", "load_chunks", "load_source_class_from_file",
    "make_source", "model_tokenizer", "prepare_chunks", "read_chunk_metadata", "register_source",
    "registered_sources",
]
