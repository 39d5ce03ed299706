"""``ggufopt logits``: compute a model's baseline log-probabilities into a baseline store.

The successor of the original generate_logits: chunks come from a chunks file (``ggufopt
dataset``) or from a text file cut into ``--ctx`` tokens; each chunk's scored positions are
encoded (exact float32 by default, or a compact encoding) and committed atomically, so an
interrupted run resumes at the first missing chunk and a finished store is reused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_chunk_source_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--chunks-file", help="chunks file from `ggufopt dataset` (its evaluation set is used)")
    src.add_argument("--text-file", help="plain text, tokenized with the model and cut into --ctx chunks")
    p.add_argument("--ctx", type=int, default=512, help="context / chunk length in tokens (default 512)")
    p.add_argument("--from", dest="from_chunk", type=int, default=0, help="first chunk (inclusive, default 0)")
    p.add_argument("--to", dest="to_chunk", type=int, default=None,
                   help="last chunk (inclusive; default: the last one)")


def add_runtime_args(p) -> None:
    p.add_argument("--batch", type=int, default=None, help="n_batch (default: --ctx)")
    p.add_argument("--ubatch", type=int, default=None, help="n_ubatch (default: min(--batch, 512))")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (default 0)")
    p.add_argument("--flash-attn", action="store_true", help="use flash attention")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log output")


def runtime_settings(args):
    from ggufopt_ray.engine import RuntimeSettings

    batch = args.batch or args.ctx
    return RuntimeSettings(n_ctx=args.ctx, n_batch=batch, n_ubatch=args.ubatch or min(batch, 512),
                           n_threads=args.threads, n_gpu_layers=args.gpu_layers, flash_attn=args.flash_attn,
                           verbose=args.verbose)


def load_eval_chunks(args, model_path):
    """(chunks, corpus fingerprint) from --chunks-file or --text-file."""
    import hashlib

    import numpy as np

    from ggufopt_ray.errors import UserError

    if args.chunks_file:
        from ggufopt_ray.data import load_chunks
        from ggufopt_ray.gguf.inspect import inspect_model

        cs = load_chunks(args.chunks_file, "evaluation", n_ctx=args.ctx,
                         vocab_fingerprint=inspect_model(model_path).vocab_fingerprint)
        return list(cs.chunks), cs.fingerprint
    path = Path(args.text_file)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist")
    from ggufopt_ray.engine.tokenizer import VocabTokenizer, text_chunks

    text = path.read_text(errors="replace")
    with VocabTokenizer(model_path) as tok:
        chunks = text_chunks(tok, text, args.ctx)  # cut as llama-perplexity cuts them
    fp = hashlib.sha256(np.concatenate(chunks).tobytes() + str(args.ctx).encode()).hexdigest()[:16]
    return chunks, fp


def chunk_range(args, n: int) -> range:
    from ggufopt_ray.errors import UserError

    last = n - 1 if args.to_chunk is None else args.to_chunk
    if not 0 <= args.from_chunk <= last < n:
        raise UserError(f"chunk range --from {args.from_chunk} --to {last} is outside the {n} chunks (0..{n - 1})")
    return range(args.from_chunk, last + 1)


def compute_into_store(engine, store, chunks, todo, encoding: str, first: int, progress=None) -> None:
    """Compute the payloads of chunks ``todo`` and commit each to ``store``, ``engine.n_seq``
    chunks per decode.

    Committing a chunk (checksums, the HDF5 image, write and fsync: ~0.1 s for a 25 MB float16
    chunk at a 49k vocabulary, much of it waiting for the disk) runs on a writer thread from the
    moment the chunk is encoded, while the next chunks are encoded and decoded; hashing, file I/O
    and decoding release the GIL. At most two decodes' worth of chunks wait for the writer, so
    memory stays bounded and a failed write stops the run soon after. ``progress(n)`` is told of
    every ``n`` chunks committed.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from ggufopt_ray.evaluation import baseline_payloads

    def commit(i, payload):
        store.write_payload(i, chunks[i], payload)
        if progress is not None:
            progress(1)

    todo = list(todo)
    waiting: deque = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="baseline-writer") as writer:
        for g in range(0, len(todo), engine.n_seq):
            group = todo[g:g + engine.n_seq]

            def submit(j, payload, group=group):
                while len(waiting) >= 2 * engine.n_seq:
                    waiting.popleft().result()
                waiting.append(writer.submit(commit, group[j], payload))

            baseline_payloads(engine, [chunks[i] for i in group], encoding, first, on_payload=submit)
        while waiting:
            waiting.popleft().result()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "logits",
        help="compute baseline log-probabilities of a model into a resumable baseline store",
        description="Evaluate the baseline model chunk by chunk and store, per chunk, the token ids and "
        "the encoded log-probabilities of the scored positions (by default the second half of each "
        "chunk, as llama-perplexity scores). Chunks commit atomically: a killed run resumes at the "
        "first missing chunk; a store made from other inputs is refused.",
    )
    p.add_argument("model", help="baseline GGUF (full precision)")
    p.add_argument("--output", "-o", required=True, help="baseline store directory")
    add_chunk_source_args(p)
    p.add_argument("--encoding", default="float16",
                   help="how log-probs are kept: exact (4 bytes per vocab entry), float16 (default: half of "
                   "exact, mean-KLD error < 0.03%%), llamacpp_uint16 (llama.cpp's format), topk (a lower bound), "
                   "compact (a quarter of llama.cpp's bytes, mean-KLD error ~0.1%%)")
    p.add_argument("--first", type=int, default=None, help="first scored position per chunk (default ctx/2)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing store first")
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ggufopt_ray.engine import LogitsEngine
    from ggufopt_ray.engine.native import versions
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.evaluation import encoding_params
    from ggufopt_ray.gguf.inspect import inspect_model, model_fingerprint
    from ggufopt_ray.store.baseline import BaselineStore, tensor_signature

    settings = runtime_settings(args)
    info = inspect_model(args.model)
    if info.context_length and args.ctx > int(info.context_length):
        raise UserError(f"--ctx {args.ctx} is longer than the model's training context ({info.context_length})")
    first = args.ctx // 2 if args.first is None else args.first
    if not 0 <= first < args.ctx - 1:
        raise UserError(f"--first {first} leaves nothing to score in chunks of {args.ctx}")
    params = encoding_params(args.encoding)
    chunks, corpus_fp = load_eval_chunks(args, args.model)
    wanted = chunk_range(args, len(chunks))
    header = {"model_fingerprint": model_fingerprint(args.model), "vocab_fingerprint": info.vocab_fingerprint,
              "corpus_fingerprint": corpus_fp, "n_ctx": args.ctx, "n_vocab": info.vocab_size,
              "encoding": args.encoding, "encoding_params": params, "first": first, "n_chunks": len(chunks),
              "model_path": str(Path(args.model).resolve()), "runtime": settings.to_dict(), "llama_cpp": versions(),
              "tensor_signature": tensor_signature(args.model)}
    store = BaselineStore.create_or_open(args.output, header, overwrite=args.overwrite)
    # Verify what is there (a full read, far cheaper than computing it): damaged chunks are
    # reported, removed and recomputed below instead of being taken as complete.
    for path, problem in store.discard_damaged(wanted):
        print(f"ggufopt logits: warning: {path} was damaged ({problem}); recomputing it", file=sys.stderr)
    todo = [i for i in wanted if not store.has(i)]
    if not todo:
        print(f"{args.output}: chunks {wanted.start}..{wanted.stop - 1} already complete; nothing to do")
        return 0
    t0 = time.perf_counter()
    with LogitsEngine(args.model, settings) as engine, \
            tqdm(total=len(todo), desc="baseline", unit="chunk", file=sys.stderr, disable=None) as bar:
        compute_into_store(engine, store, chunks, todo, args.encoding, first, progress=bar.update)
    dt = time.perf_counter() - t0
    print(f"{args.output}: {len(todo)} chunks computed in {dt:.1f} s "
          f"({len(todo) * args.ctx / dt:.0f} tokens/s), {len(store.committed())}/{len(chunks)} in the store")
    return 0
