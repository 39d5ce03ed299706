"""``ggufopt kld-base``: move baselines between llama-perplexity's KLD base file and our stores.

``import`` turns a file from ``llama-perplexity --kl-divergence-base`` into a baseline store, so
``ggufopt bench`` and the sweep tools judge candidates against it without recomputing the base
model's logits; ``export`` writes a ``llamacpp_uint16`` baseline store as such a file, for
``llama-perplexity --kl-divergence``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "kld-base",
        help="import/export llama-perplexity's --kl-divergence-base files as baseline stores",
        description="Convert between llama-perplexity's KL-divergence base file and a baseline store "
        "(encoding llamacpp_uint16, the same bytes per token). Scored positions are llama-perplexity's: "
        "the second half of each chunk.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = actions.add_parser("import", help="a llama-perplexity base file -> a baseline store",
                             description="Read FILE (from llama-perplexity --kl-divergence-base) into a "
                             "baseline store for MODEL, the model that computed it (its tokenizer gives BOS).")
    imp.add_argument("file", help="llama-perplexity KL-divergence base file")
    imp.add_argument("--model", required=True, help="the base model the file was computed with (GGUF)")
    imp.add_argument("--output", "-o", required=True, help="baseline store directory to create")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing store")
    imp.set_defaults(func=run_import)
    exp = actions.add_parser("export", help="a baseline store -> a llama-perplexity base file",
                             description="Write STORE (encoding llamacpp_uint16; the exported chunks committed) as a "
                             "file llama-perplexity --kl-divergence reads.")
    exp.add_argument("store", help="baseline store from `ggufopt logits --encoding llamacpp_uint16`")
    exp.add_argument("--output", "-o", required=True, help="file to write")
    exp.add_argument("--chunks", type=int, default=None,
                     help="export only the first N chunks (llama-perplexity's KL mode uses every chunk in the file)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp.set_defaults(func=run_export)


def run_import(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from ggufopt_ray.engine.tokenizer import VocabTokenizer
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.evaluation import encoding_params
    from ggufopt_ray.gguf.inspect import check_gguf_file, inspect_model, model_fingerprint
    from ggufopt_ray.store.baseline import BaselineStore, tensor_signature
    from ggufopt_ray.store.llamacpp_kld import read_kld_base

    kf = read_kld_base(args.file)
    model = check_gguf_file(args.model)
    info = inspect_model(model)
    if info.vocab_size != kf.n_vocab:
        raise UserError(f"{args.file} has a vocabulary of {kf.n_vocab} tokens but {model} has {info.vocab_size}; "
                        "give the model the file was computed with")
    if (kf.tokens < 0).any() or (kf.tokens >= kf.n_vocab).any():
        raise UserError(f"{args.file} holds token ids outside [0, {kf.n_vocab}); the file is damaged")
    with VocabTokenizer(model) as tok:
        chunks = [row.copy() for row in kf.tokens]
        if tok.add_bos and tok.bos_id >= 0:
            for c in chunks:
                c[0] = tok.bos_id  # what llama-perplexity evaluated
    # the fingerprint `ggufopt logits --text-file` gives the same chunks, so the stores agree
    corpus_fp = hashlib.sha256(np.concatenate(chunks).tobytes() + str(kf.n_ctx).encode()).hexdigest()[:16]
    header = {"model_fingerprint": model_fingerprint(model), "vocab_fingerprint": info.vocab_fingerprint,
              "corpus_fingerprint": corpus_fp, "n_ctx": kf.n_ctx, "n_vocab": kf.n_vocab,
              "encoding": "llamacpp_uint16", "encoding_params": encoding_params("llamacpp_uint16"),
              "first": kf.first, "n_chunks": kf.n_chunk, "model_path": str(model.resolve()),
              "runtime": {"n_ctx": kf.n_ctx}, "llama_cpp": {"imported_from": str(Path(args.file).resolve())},
              "tensor_signature": tensor_signature(model)}
    existed = (Path(args.output) / "header.h5").exists() and not args.overwrite
    store = BaselineStore.create_or_open(args.output, header, overwrite=args.overwrite)
    for path, problem in store.discard_damaged():
        print(f"ggufopt kld-base: warning: {path} was damaged ({problem}); importing it again", file=sys.stderr)
    todo = [i for i in range(kf.n_chunk) if not store.has(i)]
    try:
        for i in tqdm(todo, desc="import", unit="chunk", file=sys.stderr, disable=None):
            store.write_payload(i, chunks[i], kf.payload(i))  # payload() refuses garbage rows
    except UserError:
        if not existed:  # leave nothing behind that looks like a (partial) baseline of this file
            store.dir.remove()
            try:
                store.root.rmdir()
            except OSError:
                pass
        raise
    print(f"{args.output}: {len(todo)} chunks imported ({kf.n_chunk} of {kf.n_ctx} tokens, vocab {kf.n_vocab}, "
          f"scored from position {kf.first}); judge candidates with `ggufopt bench MODEL --baseline {args.output}`")
    return 0


def run_export(args) -> int:
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.store.baseline import BaselineStore
    from ggufopt_ray.store.llamacpp_kld import write_kld_base

    store = BaselineStore.open(args.store)
    h = store.header
    if h["encoding"] != "llamacpp_uint16":
        raise UserError(f"{args.store} is encoded as {h['encoding']}; llama-perplexity reads only llamacpp_uint16 "
                        "baselines: recompute with `ggufopt logits ... --encoding llamacpp_uint16`")
    n_ctx, first = int(h["n_ctx"]), int(h["first"])
    if first != n_ctx // 2:
        raise UserError(f"{args.store} scores from position {first}; llama-perplexity scores from n_ctx/2 = "
                        f"{n_ctx // 2}: recompute without --first")
    n = store.n_chunks if args.chunks is None else args.chunks
    if not 1 <= n <= store.n_chunks:
        raise UserError(f"--chunks {n} is outside 1..{store.n_chunks}, the chunks in {args.store}")
    missing = [i for i in range(n) if not store.has(i)]
    if missing:
        raise UserError(f"{args.store} lacks {len(missing)} of the {n} chunks to export (first: {missing[0]}); "
                        "finish it with `ggufopt logits` first, or export fewer with --chunks")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    idx = range(n)
    write_kld_base(out, n_ctx, int(h["n_vocab"]), [store.read_tokens(i) for i in idx],
                   (store.read_payload(i) for i in idx))
    print(f"{out}: {n} chunks of {n_ctx} tokens; use it with "
          f"`llama-perplexity -m CANDIDATE.gguf --kl-divergence-base {out} --kl-divergence -c {n_ctx}`")
    return 0
