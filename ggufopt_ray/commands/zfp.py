"""``ggufopt zfp MODEL --mode rate --rate 8 --dims 2 --output OUT.gguf``: ZFP-compress the weights.

Reports the exact compressed size and bits per weight with per-tensor errors, and writes a GGUF
holding the decompressed weights so that llama.cpp can run it and its KLD, perplexity and speed
can be measured like a quant's.
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "zfp",
        help="compress the weight matrices with ZFP; report exact size, bits/weight and errors",
        description="Compress every weight matrix (tensors with 2+ dimensions; select with "
        "--include/--exclude) with zfp in fixed-rate, fixed-precision, fixed-accuracy or reversible "
        "mode, report the exact compressed bytes, bits per weight, RMSE, SNR and max error per tensor, "
        "and optionally write a GGUF with the decompressed weights (same metadata and tensor types) "
        "for llama.cpp. Source weights must be F32, F16 or BF16.",
    )
    p.add_argument("model", help="path of an F32/F16/BF16 .gguf file")
    p.add_argument("--mode", default="rate", help="rate (fixed bits/value), precision (bit planes), "
                   "accuracy (absolute error tolerance) or reversible (lossless) (default rate)")
    p.add_argument("--rate", type=float, default=None, help="bits per value for --mode rate, e.g. 8")
    p.add_argument("--precision", type=int, default=None, help="bit planes kept for --mode precision, e.g. 16")
    p.add_argument("--tolerance", type=float, default=None,
                   help="absolute error bound for --mode accuracy, e.g. 1e-4")
    p.add_argument("--dims", type=int, default=2,
                   help="zfp array dimensionality: 1 = rows one after another, 2 = the matrix, "
                   "3 = rows cut into groups of 4 columns (blocks of 4 rows x 16 columns), "
                   "4 = also rows grouped by 4 (blocks of 16 x 16) (default 2)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="compress only tensors whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave tensors whose name matches uncompressed, e.g. '^(token_embd|output)\\.' keeps the embeddings (repeatable)")
    p.add_argument("--output", "-o", default=None,
                   help="write the model with decompressed weights here (default: report only)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from ggufopt_ray.compress.zfp import ZfpConfig, compress_model, format_report
    from ggufopt_ray.gguf.inspect import check_gguf_file

    config = ZfpConfig(mode=args.mode, rate=args.rate, precision=args.precision,
                       tolerance=args.tolerance, dims=args.dims, include=tuple(args.include),
                       exclude=tuple(args.exclude))
    config.validate()
    check_gguf_file(args.model)
    report = compress_model(args.model, config, args.output, progress=not args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0
