"""``ggufopt assemble BASE.gguf OUT.gguf --base-type Q4_K_M --tensor-type PATTERN=TYPE ...``.

Writes the same file, byte for byte, as ``llama-quantize --tensor-type ... BASE OUT BASE_TYPE``,
but by copying each tensor's bytes from files quantized once per type (kept in ``--sources-dir``),
so the second and every later mix costs I/O instead of a quantization. See
:mod:`ggufopt_ray.gguf.assemble`.
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "assemble",
        help="build a per-tensor mix (llama-quantize --tensor-type ...) by copying already-quantized tensors",
        description="Write OUT: the file llama-quantize writes for BASE with --base-type and the given "
        "--tensor-type overrides, byte for byte, without re-quantizing. The model is quantized once per "
        "ggml type the mix needs (source files in --sources-dir, reused by every later mix with the same "
        "model and imatrix); the mix is then assembled from those bytes. Which type each tensor gets is "
        "asked of llama.cpp with a dry run, so the base type's own rules, shape fallbacks and imatrix "
        "rules apply exactly as in llama-quantize. Prints the time spent and the llama-quantize command "
        "that reproduces OUT.",
    )
    p.add_argument("model", help="the F32/F16/BF16 input .gguf (BASE.gguf)")
    p.add_argument("out", help="the mix to write (.gguf; written as OUT.partial and renamed when complete)")
    p.add_argument("--base-type", required=True, metavar="TYPE",
                   help="llama.cpp file type whose rules choose every tensor not overridden, e.g. Q4_K_M, "
                   "Q3_K_M, IQ4_XS; also written to general.file_type")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="per-tensor override as in llama-quantize, repeatable: the regex is searched in "
                   "tensor names (lower-cased, first match wins), TYPE is a ggml type, e.g. "
                   "'attn_v=q6_k' or 'blk\\.(0|1)\\.ffn_down=q5_k'")
    p.add_argument("--tensor-type-file", metavar="FILE",
                   help="more overrides, whitespace-separated PATTERN=TYPE entries (llama-quantize's "
                   "--tensor-type-file format), applied after the --tensor-type ones")
    p.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (GGUF or legacy .dat); sources are quantized with it, and its "
                   "path is recorded as llama-quantize records it")
    p.add_argument("--sources-dir", metavar="DIR", default=None,
                   help="folder of the per-type source files, created if missing and reused across mixes "
                   "(default: ggufopt-sources beside OUT)")
    p.add_argument("--threads", type=int, default=None, help="threads for making missing sources (default: all CPUs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log output")
    p.set_defaults(func=run)


def read_tensor_type_file(path) -> list[str]:
    """Entries of a llama-quantize ``--tensor-type-file``: whitespace-separated PATTERN=TYPE tokens."""
    from pathlib import Path

    from ggufopt_ray.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--tensor-type-file {path} does not exist; check the path")
    return p.read_text().split()


def run(args) -> int:
    from ggufopt_ray.engine import native
    from ggufopt_ray.gguf.assemble import build_mix

    native.set_verbose(args.verbose)
    overrides = list(args.tensor_type)
    if args.tensor_type_file:
        overrides += read_tensor_type_file(args.tensor_type_file)
    result = build_mix(args.model, args.out, args.base_type, overrides, imatrix=args.imatrix,
                       sources_dir=args.sources_dir, threads=args.threads, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    hist: dict[str, int] = {}
    for t in result.tensor_types.values():
        hist[t] = hist.get(t, 0) + 1
    print(f"wrote {result.path}: {result.size_bytes / 2**20:.3f} MiB, {result.bits_per_weight:.3f} bits per weight")
    print("tensor types: " + ", ".join(f"{t} x{n}" for t, n in sorted(hist.items())))
    print(f"time: assemble {result.assemble_seconds:.2f} s, plan (dry run) {result.plan_seconds:.2f} s, "
          f"sources {result.source_seconds:.2f} s"
          + (" (all cached)" if result.source_seconds == 0 else f" ({len(result.sources)} types)"))
    print("same file as: " + result.command)
    return 0
