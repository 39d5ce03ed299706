"""``ggufopt inspect MODEL.gguf``: what a GGUF file holds, without loading it into llama.cpp."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show architecture, parameters, size, bits per weight, tensor types and vocab fingerprint",
        description="Read a GGUF file's metadata and tensor table (any architecture) and print its "
        "size, bits per weight overall and per tensor type, and the vocabulary fingerprint that "
        "later stages use to refuse mismatched comparisons.",
    )
    p.add_argument("model", help="path of a .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--tensors", action="store_true", help="also list every tensor with its type")
    p.set_defaults(func=run)


def run(args) -> int:
    from ggufopt_ray.gguf.inspect import format_model_info, inspect_model

    info = inspect_model(args.model)
    if args.json:
        d = info.to_dict()
        if args.tensors:
            d["tensors"] = info.tensor_types
        print(json.dumps(d, indent=2))
        return 0
    print(format_model_info(info))
    if args.tensors:
        print()
        for name, ttype in info.tensor_types.items():
            print(f"{name:<40} {ttype}")
    return 0
