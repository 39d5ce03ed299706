"""``ggufopt synth-model OUT.gguf --seed N``: write the built-in tiny llama model."""

from __future__ import annotations

import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth-model",
        help="write a small deterministic llama-architecture GGUF (for tests and demos)",
        description="Write a small random-weight llama model with a real SentencePiece vocabulary "
        "(byte fallback, so any text tokenizes), grouped-query attention and 256-wide rows so every "
        "K-quant applies. The same seed always gives the same file.",
    )
    p.add_argument("output", help="path of the GGUF file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="storage type of the 2-D weights")
    p.add_argument("--layers", type=int, default=2, help="number of transformer blocks (default 2)")
    p.add_argument("--embd", type=int, default=256, help="hidden size, a multiple of 256 (default 256)")
    p.add_argument("--ff", type=int, default=768, help="feed-forward size, a multiple of 256 (default 768)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads, for GQA (default 2)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    p.add_argument("--context", type=int, default=1024, help="training context length recorded in the file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ggufopt_ray.gguf.inspect import format_model_info, inspect_model
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    spec = SynthSpec(seed=args.seed, dtype=args.dtype, n_layer=args.layers, n_embd=args.embd,
                     n_ff=args.ff, n_head=args.heads, n_head_kv=args.kv_heads, n_vocab=args.vocab,
                     context_length=args.context)
    t0 = time.perf_counter()
    path = write_synthetic_model(args.output, spec)
    print(f"wrote {path} in {time.perf_counter() - t0:.2f} s")
    print(format_model_info(inspect_model(path)))
    return 0
