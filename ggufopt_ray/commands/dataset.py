"""``ggufopt dataset``: fetch a corpus per language (cached) and pack it into token chunks.

The successor of the original ``imatrix_dataset.py``: the same options (plugin by name or file,
languages, samples per language, skip, count-only, overwrite), plus a cache directory that is
not the CWD, a seed, and, with ``--model``, seeded, language-balanced token chunks of the target
model in two disjoint sets (calibration for importance matrices, evaluation for KL-divergence)
written as one fingerprinted Parquet file.
"""

from __future__ import annotations

import argparse
import sys


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dataset",
        help="build the calibration/evaluation corpus and its token chunks (cached, per language)",
        description="Fetch --samples-per-lang text samples per language from a data source into a "
        "per-language cache (only what is missing is fetched), and with --model pack them into "
        "token chunks of --chunk-size tokens: seeded, one language per chunk, languages balanced, "
        "split into a calibration set and an evaluation set that share no sample. Without --model "
        "only the cache is filled (or counted, with --count-only).",
    )
    src = p.add_argument_group("data source")
    src.add_argument("--plugin", default=None,
                     help="data-source name: builtin (shipped corpus; the default), local (local "
                     "files, alias files), hf (Hugging Face datasets), oscar (OSCAR preset), or an installed "
                     "plugin (entry point group ggufopt_ray.datasources)")
    src.add_argument("--list-plugins", action="store_true",
                     help="list the data sources that --plugin can name, and exit")
    src.add_argument("--plugin-file", "--datasource-plugin", dest="plugin_file", default=None,
                     help="load the data source from this Python file instead")
    src.add_argument("--plugin-class", default=None,
                     help="class in --plugin-file (default: the only DataSource subclass in it)")
    src.add_argument("--source", "--url", dest="source", default=None,
                     help="dataset id, local dataset directory or path for the plugin; may contain "
                     "{lang} (hf: the path given to datasets.load_dataset, or a save_to_disk folder)")
    src.add_argument("--config-pattern", "--config-name", dest="config", default=None,
                     help="dataset configuration per language, {lang} replaced, e.g. "
                     "unshuffled_deduplicated_{lang}")
    src.add_argument("--split", default=None, help="dataset split (default train)")
    src.add_argument("--text-field", default=None,
                     help="dotted path of the text in a record, numbers index lists (default text), "
                     "e.g. meta.body or turns.0.content")
    src.add_argument("--data-files", nargs="+", default=None,
                     help="hf: data files for builders such as parquet or json; may contain {lang}")
    src.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                     help="hf: stream records instead of downloading the whole split")
    src.add_argument("--lang-field", default=None,
                     help="hf: keep only records whose FIELD equals the language (one multilingual dataset)")
    src.add_argument("--files", nargs="+", action="extend", default=None,
                     help="local: a glob with {lang} (corpus/{lang}/*.txt) or LANG=GLOB entries; "
                     "text (.txt, .gz), .jsonl, .json, .parquet")
    src.add_argument("--format", default=None, choices=("auto", "text", "jsonl", "json", "parquet"),
                     help="local: file format (default auto, by extension)")
    src.add_argument("--split-on", default=None, choices=("auto", "record", "blank", "line", "file"),
                     help="local: how text files divide into documents (default auto: the \\x1e "
                     "record-separator line if present, else blank lines)")
    src.add_argument("--option", dest="options", action="append", type=_key_value, default=[],
                     metavar="KEY=VALUE", help="extra keyword argument for the plugin (repeatable)")

    corpus = p.add_argument_group("corpus and cache")
    corpus.add_argument("--langs", nargs="+", default=None,
                        help="languages (default: those the source names, e.g. en code for builtin)")
    corpus.add_argument("--samples-per-lang", "--num-samples", dest="samples_per_lang", type=int,
                        default=200, help="samples per language to use (default 200)")
    corpus.add_argument("--skip", "--skip-samples", dest="skip", type=int, default=0,
                        help="first source record to fetch; fetching never goes back before records "
                        "already cached, so new data can be added later without duplicates")
    corpus.add_argument("--count-only", action="store_true",
                        help="only report how many samples the cache holds per language")
    corpus.add_argument("--overwrite", action="store_true",
                        help="replace the cached samples with --samples-per-lang fresh ones from --skip")
    corpus.add_argument("--cache-dir", default=None,
                        help="corpus cache directory (default $GGUFOPT_CACHE_DIR/corpus or "
                        "~/.cache/ggufopt_ray/corpus)")
    corpus.add_argument("--no-cache", action="store_true",
                        help="read the source directly, without the cache (local sources)")

    chunks = p.add_argument_group("token chunks (with --model)")
    chunks.add_argument("--model", default=None, help="GGUF model whose tokenizer makes the chunks")
    chunks.add_argument("--chunk-size", type=int, default=512,
                        help="tokens per chunk, BOS included: the n_ctx of evaluation (default 512)")
    chunks.add_argument("--calibration-chunks", type=int, default=32,
                        help="chunks in the calibration set, for importance matrices (default 32)")
    chunks.add_argument("--evaluation-chunks", type=int, default=32,
                        help="chunks in the evaluation set, for KL-divergence (default 32)")
    chunks.add_argument("--max-sample-tokens", type=int, default=None,
                        help="cut samples to this many tokens, so a few long documents cannot fill "
                        "most chunks (default: no limit; long samples continue across chunks)")
    chunks.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    chunks.add_argument("--output", default=None, help="chunks file to write (.parquet); required "
                        "with --model")
    chunks.add_argument("--rebuild", action="store_true",
                        help="rewrite --output even when it already holds these chunks")
    chunks.add_argument("--threads", type=int, default=None, help="CPU threads for the tokenizer")
    p.set_defaults(func=run)


def _make_source(args):
    from ggufopt_ray.data.plugins import make_source

    plugin = args.plugin
    if plugin is None and not args.plugin_file:
        plugin = "local" if args.files else ("hf" if args.source else "builtin")
    options = dict(args.options)
    options.update(source=args.source, config=args.config, split=args.split,
                   text_field=args.text_field, data_files=args.data_files, streaming=args.streaming,
                   lang_field=args.lang_field, files=args.files, format=args.format,
                   split_on=args.split_on)
    return make_source(plugin, plugin_file=args.plugin_file, plugin_class=args.plugin_class, **options)


def run(args) -> int:
    from ggufopt_ray.data.build import check_model_for_chunks, chunks_from_corpus, model_tokenizer
    from ggufopt_ray.data.cache import CorpusCache, collect_corpus, default_cache_dir, resolve_langs
    from ggufopt_ray.data.chunks import ChunkParams, LangReport
    from ggufopt_ray.errors import UserError

    if args.list_plugins:
        from ggufopt_ray.data.plugins import registered_sources

        for name, origin in registered_sources().items():
            print(f"{name}\t{origin}")
        return 0
    if args.samples_per_lang < 1:
        raise UserError(f"--samples-per-lang must be at least 1, not {args.samples_per_lang}")
    if args.skip < 0:
        raise UserError(f"--skip must not be negative, not {args.skip}")
    if args.model and not args.output:
        raise UserError("--model builds token chunks: name the file to write with --output")
    if args.output and not args.model:
        raise UserError("--output needs --model (the tokenizer of the chunks)")
    if args.count_only and (args.overwrite or args.model):
        raise UserError("--count-only only counts; leave out --overwrite and --model")
    if args.no_cache and (args.count_only or args.overwrite):
        raise UserError("--count-only and --overwrite work on the cache; leave out --no-cache")
    params = None
    if args.model:
        params = ChunkParams(n_ctx=args.chunk_size, n_calibration=args.calibration_chunks,
                             n_evaluation=args.evaluation_chunks, seed=args.seed,
                             max_sample_tokens=args.max_sample_tokens)
        params.validate()
        check_model_for_chunks(args.model, params.n_ctx)  # before a possibly long fetch

    source = _make_source(args)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    if args.count_only:
        cache = CorpusCache(cache_dir, source)
        for lang in resolve_langs(source, args.langs):
            print(f"{lang}\t{cache.count(lang)}")
        print(f"cache: {cache.dir}", file=sys.stderr)
        return 0

    corpus = collect_corpus(source, args.langs, args.samples_per_lang, skip=args.skip,
                            cache_dir=cache_dir, overwrite=args.overwrite, progress=True)
    result = None
    if args.model:
        with model_tokenizer(args.model, n_threads=args.threads,
                             chunk_size=params.n_ctx) as tokenizer:
            result = chunks_from_corpus(args.output, corpus, tokenizer, params,
                                        reuse=not args.rebuild, progress=True)
    # what happened, once everything succeeded (an error is the only line on failure)
    for lang, update in corpus.updates.items():
        print(update.describe() + f"; using {len(corpus.texts[lang])}", file=sys.stderr)
    if cache_dir is not None:
        print(f"cache: {CorpusCache(cache_dir, source).dir}", file=sys.stderr)
    if result is None:
        return 0
    if result.reused:
        print(f"{result.path} already holds these chunks (fingerprint {result.fingerprint}); kept it",
              file=sys.stderr)
    for row in result.report:
        print(LangReport(**row).describe(), file=sys.stderr)
    print(f"{result.path}\tfingerprint {result.fingerprint}\tevaluation "
          f"{result.counts['evaluation']} ({result.set_fingerprints['evaluation']})\tcalibration "
          f"{result.counts['calibration']} ({result.set_fingerprints['calibration']})")
    return 0
