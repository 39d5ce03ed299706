"""``ggufopt quantize MODEL --types Q4_K_M Q8_0 ...``: llama.cpp quantization, in process, several types at once.

Each type becomes ``{name}-{TYPE}.gguf`` in ``--out-dir``; existing outputs are skipped unless
``--overwrite``. ``--dry-run`` prints the exact size and bits per weight each output would have
without writing anything.
"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a GGUF model to one or more llama.cpp types (Q4_K_M, Q8_0, IQ4_XS, IQ2_XS...)",
        description="Quantize MODEL in process with llama.cpp's quantizer. Every type in --types "
        "becomes OUT_DIR/NAME-TYPE.gguf (written as .partial and renamed when complete); outputs that "
        "exist are skipped unless --overwrite. IQ1/IQ2-class types need --imatrix (see `ggufopt "
        "imatrix`). All inputs are validated for every type before the first file is written.",
    )
    p.add_argument("model", nargs="?", help="path of the input .gguf (F32, F16 or BF16 weights)")
    p.add_argument("--types", nargs="+", metavar="TYPE",
                   help="file types, any case, e.g. Q8_0 Q6_K Q4_K_M IQ4_XS IQ2_XS (--list-types shows all)")
    p.add_argument("--list-types", action="store_true", help="print every valid type name and exit")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix: GGUF (llama-imatrix / ggufopt "
                   "imatrix) or legacy .dat")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="per-tensor override, repeatable, e.g. 'attn_v=q8_0' or 'blk\\.0\\..*=q6_k'; the "
                   "regex is searched in tensor names and the first matching override wins")
    p.add_argument("--output-type", metavar="TYPE", help="ggml type for output.weight, e.g. q8_0")
    p.add_argument("--embd-type", metavar="TYPE", help="ggml type for token_embd.weight, e.g. q8_0")
    p.add_argument("--pure", action="store_true",
                   help="no mixture rules: every quantizable tensor gets the type's base type")
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing; print the size and bits per weight each output would have")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: all CPUs)")
    p.add_argument("--out-dir", default=None, help="folder for the outputs, created if missing (default: the model's folder)")
    p.add_argument("--name", default=None,
                   help="output base name (default: the model's file name without .gguf and -f32/-f16)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--allow-requantize", action="store_true",
                   help="accept an input whose weights are already quantized (quality suffers)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ggufopt_ray.engine import native
    from ggufopt_ray.engine.quantize import file_types, quantize_types
    from ggufopt_ray.errors import UserError

    if args.list_types:
        print(" ".join(file_types()))
        return 0
    if not args.model:
        raise UserError("give the model to quantize: ggufopt quantize MODEL --types Q4_K_M")
    if not args.types:
        raise UserError("give at least one type with --types, e.g. --types Q4_K_M Q8_0")
    native.set_verbose(args.verbose)
    results = quantize_types(
        args.model, args.types, out_dir=_ensure_dir(args.out_dir, args.dry_run), name=args.name, imatrix=args.imatrix,
        tensor_types=args.tensor_type, output_type=args.output_type, embd_type=args.embd_type,
        pure=args.pure, dry_run=args.dry_run, threads=args.threads, overwrite=args.overwrite,
        allow_requantize=args.allow_requantize, progress=not (args.json or args.dry_run))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    print(f"{'type':<9} {'size MiB':>10} {'bpw':>7} {'seconds':>8}  {'status':<8} path")
    for r in results:
        status = "dry run" if r.dry_run else ("skipped" if r.skipped else "written")
        print(f"{r.type:<9} {r.size_bytes / 2**20:>10.3f} {r.bits_per_weight:>7.3f} {r.seconds:>8.2f}  "
              f"{status:<8} {r.path}")
    if any(r.skipped for r in results):
        print("skipped outputs already existed; pass --overwrite to redo them", file=sys.stderr)
    return 0


def _ensure_dir(out_dir, dry_run: bool):
    """Create ``--out-dir`` when it is missing (a dry run writes nothing, so it creates nothing)."""
    from pathlib import Path

    from ggufopt_ray.errors import UserError

    if out_dir and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a folder; give a folder")
    if out_dir and not dry_run:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return out_dir
