"""``ggufopt imatrix MODEL --text-file F --output imatrix.gguf``: collect an importance matrix in process.

The file is llama.cpp's GGUF imatrix format (or legacy .dat when the output ends in .dat), which
``ggufopt quantize --imatrix`` and llama.cpp's own ``llama-quantize --imatrix`` accept.
``--append`` adds the new chunks to an existing imatrix, the way iterative calibration grows it.
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "imatrix",
        help="collect an importance matrix (per-tensor activation statistics) for quantization",
        description="Run MODEL over calibration chunks and record, for every weight matrix, the sum of "
        "squared activations per input column and the token count (as llama-imatrix does: every "
        "position of a chunk is evaluated and its first token is replaced by BOS). Text is cut "
        "into full chunks of --ctx tokens; a chunks file gives the chunks directly.",
    )
    p.add_argument("model", help="path of a .gguf model (best: the unquantized one)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="plain-text calibration file")
    src.add_argument("--chunks-file", help="Parquet file of token chunks: one row per chunk, in a list-of-int "
                     "column named 'tokens' (or the first list-of-int column)")
    p.add_argument("--ctx", type=int, default=512, help="chunk length / context in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="use at most this many chunks")
    p.add_argument("--skip-chunks", type=int, default=0,
                   help="skip this many chunks first (to continue an --append run on the same data)")
    p.add_argument("--output", "-o", default="imatrix.gguf",
                   help="output file (default imatrix.gguf; a .dat suffix writes the legacy format)")
    p.add_argument("--append", action="store_true",
                   help="add the new chunks to the imatrix already in --output (GGUF or .dat)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--process-output", action="store_true",
                   help="also collect output.weight (llama-imatrix --process-output)")
    p.add_argument("--ubatch", type=int, default=512, help="n_ubatch (default 512, at most --ctx)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log output")
    p.set_defaults(func=run)


def read_chunks_file(path: Path, n_ctx: int) -> list:
    """Token chunks from a Parquet file: a list-of-int column, 'tokens' preferred."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ggufopt_ray.errors import UserError

    if not path.is_file():
        raise UserError(f"chunks file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UserError(f"{path} is not a readable Parquet file ({type(exc).__name__}); "
                        "give a chunks file written by ggufopt")
    if "set" in table.column_names:
        # A chunks file from `ggufopt dataset`: only its calibration set feeds an imatrix, so the
        # evaluation chunks stay unseen by the quantizer.
        from ggufopt_ray.data import load_chunks

        chunks = load_chunks(path, "calibration").chunks
        if not chunks:
            raise UserError(f"{path} has no calibration chunks; rebuild it with --calibration-chunks N")
        longest = max(len(c) for c in chunks)
        if longest > n_ctx:
            raise UserError(f"{path} has chunks of {longest} tokens, longer than --ctx {n_ctx}; pass --ctx {longest}")
        return chunks
    listy = [f.name for f in table.schema
             if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and pa.types.is_integer(f.type.value_type)]
    if not listy:
        raise UserError(f"{path} has no list-of-int column of token ids (columns: {', '.join(table.column_names)})")
    col = "tokens" if "tokens" in listy else listy[0]
    chunks = [np.asarray(c, dtype=np.int32) for c in table.column(col).to_pylist() if c]
    if not chunks:
        raise UserError(f"{path} holds no token chunks")
    longest = max(len(c) for c in chunks)
    if longest > n_ctx:
        raise UserError(f"{path} has chunks of up to {longest} tokens, longer than --ctx {n_ctx}; "
                        f"pass --ctx {longest}")
    return chunks


def run(args) -> int:
    from tqdm import tqdm

    from ggufopt_ray.engine.imatrix import Imatrix, ImatrixCollector, imatrix_settings, text_chunks
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.gguf.inspect import check_gguf_file

    check_gguf_file(args.model)
    if args.ctx < 2:
        raise UserError(f"--ctx must be at least 2, not {args.ctx}")
    if args.chunks is not None and args.chunks < 1:
        raise UserError(f"--chunks must be positive, not {args.chunks}")
    if args.skip_chunks < 0:
        raise UserError(f"--skip-chunks must not be negative, not {args.skip_chunks}")
    out = Path(args.output)
    if not out.parent.exists():
        raise UserError(f"output folder {out.parent} does not exist; create it first")
    base = None
    if out.exists():
        if args.append:
            base = Imatrix.load(out, legacy_chunk_size=args.ctx)
        elif not args.overwrite:
            raise UserError(f"{out} exists; pass --append to add chunks to it or --overwrite to replace it")
    elif args.append:
        raise UserError(f"--append: {out} does not exist yet; run without --append first")

    if args.text_file:
        text_path = Path(args.text_file)
        if not text_path.is_file():
            raise UserError(f"text file {text_path} does not exist")
        dataset = str(text_path)
        chunks = None
    else:
        dataset = str(Path(args.chunks_file))
        chunks = read_chunks_file(Path(args.chunks_file), args.ctx)

    settings = imatrix_settings([[0] * args.ctx], n_ctx=args.ctx, n_threads=args.threads,
                                n_gpu_layers=args.gpu_layers, n_ubatch=args.ubatch, verbose=args.verbose)
    with ImatrixCollector(args.model, settings, base=base, dataset_name=dataset,
                          process_output=args.process_output) as collector:
        if chunks is None:
            text = text_path.read_text(errors="replace")
            chunks = text_chunks(collector.engine, text, args.ctx)
        chunks = chunks[args.skip_chunks:]
        if args.chunks is not None:
            chunks = chunks[: args.chunks]
        if not chunks:
            raise UserError(f"no chunks left after skipping {args.skip_chunks}; lower --skip-chunks")
        for c in tqdm(chunks, desc="imatrix", unit="chunk", file=sys.stderr):
            collector.add_chunk(c)
        im = collector.imatrix
    im.save(out)
    print(f"saved {out}: {im.summary()}")
    return 0
