"""Token chunks: seeded, language-balanced, split into disjoint calibration and evaluation sets.

Every later stage reads the chunks this module writes: importance matrices are collected on
the calibration set, and baseline/candidate logits are compared on the evaluation set. So:

- **Exactly what is evaluated.** A chunk holds exactly ``n_ctx`` token ids, with BOS at
  position 0 when the model adds one (as llama-perplexity does), so the engine evaluates the
  stored ids unchanged (``prepare_chunk`` is then a no-op).
- **Balanced.** Each chunk holds one language; chunks are dealt to the languages in turn, so
  in each set (and in both together) the languages' chunk counts differ by at most one, and
  results can be reported per language. The original mixed languages inside a chunk and
  ignored the tokens of its ``"lang: "`` prefixes, so its balance was approximate at best.
- **Nothing silently dropped.** Samples are concatenated (separated by BOS when the model uses
  one, like documents in pre-training) and a sample longer than the room left in a chunk
  continues in the next one. What is not used (the tail of the last sample in each set, unused
  samples, empty and duplicate texts) is counted in the report.
- **Disjoint by construction.** Per language the samples are shuffled with the seed; the
  evaluation set takes samples from the front until its chunks are full, and the calibration
  set starts at the next sample, so no text sample (not even a duplicate of one: duplicates are
  removed first) is in both. The evaluation set does not depend on the calibration size, so a
  bigger calibration set from the same corpus keeps the same evaluation chunks (and baseline).
- **Fingerprinted.** The file fingerprint hashes the tokenizer's vocabulary fingerprint, the
  source texts, the chunking parameters and the seed; each set has its own fingerprint of the
  inputs that determine it. :func:`load_chunks` refuses a file that does not match what the
  caller expects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggufopt_ray.errors import UserError

FORMAT_VERSION = 1
META_KEY = b"ggufopt_ray.chunks"
SETS = ("evaluation", "calibration")


@dataclass(frozen=True)
class Tokenizer:
    """What chunking needs from the target model's tokenizer."""

    tokenize: Callable[[str], Sequence[int]]  # text -> ids, without BOS
    vocab_fingerprint: str
    bos_id: int | None = None
    add_bos: bool = False

    @classmethod
    def from_engine(cls, engine: Any, vocab_fingerprint: str) -> "Tokenizer":
        """Wrap a :class:`ggufopt_ray.engine.LogitsEngine` (it must stay open while in use)."""
        return cls(tokenize=lambda text: engine.tokenize(text, add_bos=False),
                   vocab_fingerprint=vocab_fingerprint, bos_id=int(engine.bos_id),
                   add_bos=bool(engine.add_bos))


@dataclass(frozen=True)
class ChunkParams:
    n_ctx: int
    n_calibration: int
    n_evaluation: int
    seed: int = 0
    separator: str = "auto"  # between samples: "bos", "none", or "auto" (bos when the model adds one)
    max_sample_tokens: int | None = None  # cut longer samples (more, shorter samples: more variety)

    def validate(self) -> None:
        if self.n_ctx < 2:
            raise UserError(f"the chunk size must be at least 2 tokens, not {self.n_ctx}")
        if self.n_calibration < 0 or self.n_evaluation < 0:
            raise UserError("the numbers of calibration and evaluation chunks must not be negative")
        if self.n_calibration + self.n_evaluation == 0:
            raise UserError("ask for at least one chunk (--calibration-chunks or --evaluation-chunks)")
        if self.max_sample_tokens is not None and self.max_sample_tokens < 1:
            raise UserError(f"the sample token limit must be positive, not {self.max_sample_tokens}")
        if self.separator not in ("auto", "bos", "none"):
            raise UserError(f"separator must be auto, bos or none, not {self.separator!r}")


def sample_id(text: str) -> str:
    """Identity of a text sample: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def text_hash(texts: dict[str, list[str]]) -> str:
    """Hash of the source texts: languages in order, and each text in order."""
    h = hashlib.sha256()
    for lang, items in texts.items():
        h.update(b"\x01" + lang.encode())
        for t in items:
            h.update(b"\x00" + sample_id(t).encode())
    return h.hexdigest()[:16]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def separator_tokens(tokenizer: Tokenizer, params: ChunkParams) -> list[int]:
    mode = params.separator
    if mode == "auto":
        mode = "bos" if tokenizer.add_bos and tokenizer.bos_id is not None else "none"
    if mode == "bos":
        if tokenizer.bos_id is None or tokenizer.bos_id < 0:
            raise UserError("separator 'bos' needs a model with a BOS token; use separator none")
        return [int(tokenizer.bos_id)]
    return []


def allocation(langs: list[str], n_chunks: int, start: int = 0) -> dict[str, int]:
    """Deal ``n_chunks`` to the languages in turn, beginning with language ``start``."""
    counts = {lang: 0 for lang in langs}
    for k in range(n_chunks):
        counts[langs[(start + k) % len(langs)]] += 1
    return counts


def fingerprints(vocab_fingerprint: str, source_text_hash: str, langs: list[str], params: ChunkParams,
                 add_bos: bool, bos_id: int | None, separator: list[int]) -> tuple[str, dict[str, str]]:
    """(file fingerprint, {set: set fingerprint}) from everything that determines the chunks."""
    base = {"format": FORMAT_VERSION, "vocab": vocab_fingerprint, "texts": source_text_hash,
            "langs": list(langs), "n_ctx": params.n_ctx, "seed": params.seed,
            "add_bos": bool(add_bos), "bos_id": bos_id if add_bos else None, "separator": separator}
    if params.max_sample_tokens is not None:
        base["max_sample_tokens"] = params.max_sample_tokens
    whole = _hash({**base, "n_calibration": params.n_calibration, "n_evaluation": params.n_evaluation})
    per_set = {
        # the evaluation set is packed first, so it depends on its own size only
        "evaluation": _hash({**base, "set": "evaluation", "n_chunks": params.n_evaluation}),
        "calibration": _hash({**base, "set": "calibration", "n_chunks": params.n_calibration,
                              "after_evaluation": params.n_evaluation}),
    }
    return whole, per_set


@dataclass
class LangReport:
    """What happened to one language's samples."""

    lang: str
    samples: int = 0  # texts given
    empty: int = 0  # left out: no text, or no tokens
    duplicates: int = 0  # left out: the same text appeared earlier (in any language)
    chunks: dict[str, int] = field(default_factory=dict)
    samples_used: dict[str, int] = field(default_factory=dict)
    tokens_used: dict[str, int] = field(default_factory=dict)  # sample tokens placed in chunks
    tokens_dropped: dict[str, int] = field(default_factory=dict)  # tail of the last sample of a set
    samples_split: int = 0  # samples that continue in the next chunk
    tokens_truncated: int = 0  # cut off samples longer than max_sample_tokens
    samples_unused: int = 0  # after both sets were full

    def describe(self) -> str:
        sets = ", ".join(f"{s} {self.chunks.get(s, 0)} chunks from {self.samples_used.get(s, 0)} samples"
                         for s in SETS)
        cut = f", {self.tokens_truncated} tokens cut from long samples" if self.tokens_truncated else ""
        return (f"{self.lang}: {sets}; {self.samples_split} samples split across chunks, "
                f"{sum(self.tokens_dropped.values())} tail tokens and {self.samples_unused} samples "
                f"unused, {self.empty} empty and {self.duplicates} duplicate samples left out{cut}")


@dataclass
class Chunk:
    set: str
    index: int  # position within its set
    lang: str
    tokens: np.ndarray  # int32 [n_ctx]
    sample_ids: list[str]  # samples with tokens in this chunk, in order


@dataclass
class ChunkDataset:
    """Both sets, before or after writing; :meth:`write` stores them as Parquet."""

    chunks: list[Chunk]
    params: ChunkParams
    langs: list[str]
    vocab_fingerprint: str
    text_hash: str
    add_bos: bool
    bos_id: int | None
    separator: list[int]
    fingerprint: str
    set_fingerprints: dict[str, str]
    report: list[LangReport]

    def set(self, which: str) -> list[Chunk]:
        return [c for c in self.chunks if c.set == which]

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "set_fingerprints": self.set_fingerprints, "vocab_fingerprint": self.vocab_fingerprint,
            "text_hash": self.text_hash, "params": asdict(self.params), "langs": self.langs,
            "add_bos": self.add_bos, "bos_id": self.bos_id, "separator": self.separator,
            "counts": {s: len(self.set(s)) for s in SETS},
            "report": [asdict(r) for r in self.report],
        }

    def write(self, path: str | Path) -> Path:
        """Write to ``path`` via ``path.partial`` and a rename: a file that exists is complete."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        n_ctx = self.params.n_ctx
        tokens = np.stack([c.tokens for c in self.chunks]).astype(np.int32) if self.chunks \
            else np.zeros((0, n_ctx), np.int32)
        table = pa.table({
            "set": pa.array([c.set for c in self.chunks], pa.string()),
            "index": pa.array([c.index for c in self.chunks], pa.int32()),
            "lang": pa.array([c.lang for c in self.chunks], pa.string()),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.int32()), n_ctx),
            "sample_ids": pa.array([c.sample_ids for c in self.chunks], pa.list_(pa.string())),
        })
        table = table.replace_schema_metadata({META_KEY: json.dumps(self.metadata()).encode()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        try:
            pq.write_table(table, tmp)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path


class _LangStream:
    """One language's shuffled samples, tokenized lazily as the packer reaches them."""

    def __init__(self, lang: str, items: list[tuple[str, str]], tokenizer: Tokenizer,
                 max_tokens: int | None = None):
        self.lang = lang
        self.max_tokens = max_tokens
        self.truncated = 0
        self.items = items  # (sample id, text) in shuffled order
        self.tokenizer = tokenizer
        self.pos = 0  # next sample to use
        self.empty = 0

    def next_sample(self) -> tuple[str, np.ndarray] | None:
        while self.pos < len(self.items):
            sid, text = self.items[self.pos]
            self.pos += 1
            ids = np.asarray(self.tokenizer.tokenize(text), dtype=np.int32).reshape(-1)
            if self.max_tokens is not None and ids.size > self.max_tokens:
                self.truncated += int(ids.size) - self.max_tokens
                ids = ids[:self.max_tokens]
            if ids.size:
                return sid, ids
            self.empty += 1
        return None


def _pack(stream: _LangStream, which: str, n_chunks: int, n_ctx: int, header: list[int],
          separator: list[int], report: LangReport, progress: Any) -> list[Chunk]:
    """Fill ``n_chunks`` chunks from the stream; the last sample's unused tail is dropped."""
    chunks: list[Chunk] = []
    width = n_ctx - len(header)
    content: list[np.ndarray] = []
    filled = 0
    ids: list[str] = []
    used = tokens_used = split = 0
    while len(chunks) < n_chunks:
        sample = stream.next_sample()
        if sample is None:
            have = sum(report.tokens_used.values()) + tokens_used
            raise UserError(
                f"language {stream.lang!r} has too little text: {len(stream.items)} samples gave "
                f"{have} tokens, fewer than the {_needed(report, which, n_chunks, width)} needed "
                f"for its chunks of {n_ctx} tokens; fetch more (--samples-per-lang) or ask for "
                "fewer or smaller chunks")
        sid, ids_arr = sample
        used += 1
        continued = False
        pending = np.concatenate([np.asarray(separator, np.int32), ids_arr]) if filled and separator \
            else ids_arr
        n_sep = len(pending) - len(ids_arr)
        pos = 0
        while pos < len(pending):
            take = pending[pos:pos + width - filled]
            content.append(take)
            if pos + len(take) > n_sep:  # some of the sample itself is in this chunk
                if not ids or ids[-1] != sid:
                    ids.append(sid)
                tokens_used += pos + len(take) - max(pos, n_sep)
            filled += len(take)
            pos += len(take)
            if filled == width:
                tokens = np.concatenate([np.asarray(header, np.int32)] + content)
                chunks.append(Chunk(which, len(chunks), stream.lang, tokens, ids))
                if progress is not None:
                    progress.update(1)
                content, filled, ids = [], 0, []
                if len(chunks) == n_chunks:
                    report.tokens_dropped[which] = len(pending) - pos
                    break
                if pos < len(pending) and pos > n_sep and not continued:
                    split += 1  # the sample goes on in the next chunk
                    continued = True
    report.chunks[which] = len(chunks)
    report.samples_used[which] = used
    report.tokens_used[which] = tokens_used
    report.tokens_dropped.setdefault(which, 0)
    report.samples_split += split
    return chunks


def _needed(report: LangReport, which: str, n_chunks: int, width: int) -> int:
    done = sum(report.chunks.get(s, 0) for s in SETS if s != which)
    return (done + n_chunks) * width


def _rng_for(seed: int, lang: str) -> np.random.Generator:
    lang_key = int.from_bytes(hashlib.sha256(lang.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & (2**64 - 1), lang_key])


def build_chunks(texts: dict[str, list[str]], tokenizer: Tokenizer, params: ChunkParams,
                 progress: bool = False) -> ChunkDataset:
    """Shuffle, split and pack ``texts`` (``{lang: [text, ...]}``) into the two chunk sets."""
    params.validate()
    langs = list(texts)
    if not langs:
        raise UserError("no languages to build chunks from")
    header = [int(tokenizer.bos_id)] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    if params.n_ctx <= len(header):
        raise UserError(f"the chunk size {params.n_ctx} leaves no room after BOS")
    separator = separator_tokens(tokenizer, params)
    source_hash = text_hash(texts)
    whole, per_set = fingerprints(tokenizer.vocab_fingerprint, source_hash, langs, params,
                                  tokenizer.add_bos, tokenizer.bos_id, separator)

    seen: set[str] = set()
    streams: dict[str, _LangStream] = {}
    reports: dict[str, LangReport] = {}
    for lang in langs:
        report = reports[lang] = LangReport(lang, samples=len(texts[lang]))
        items = []
        for text in texts[lang]:
            if not text.strip():
                report.empty += 1
                continue
            sid = sample_id(text)
            if sid in seen:
                report.duplicates += 1
                continue
            seen.add(sid)
            items.append((sid, text))
        order = _rng_for(params.seed, lang).permutation(len(items))
        streams[lang] = _LangStream(lang, [items[i] for i in order], tokenizer, params.max_sample_tokens)

    eval_counts = allocation(langs, params.n_evaluation)
    cal_counts = allocation(langs, params.n_calibration, start=params.n_evaluation % len(langs))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=params.n_evaluation + params.n_calibration, desc="pack chunks", unit="chunk",
                   leave=False)
    try:
        by_set: dict[str, list[Chunk]] = {s: [] for s in SETS}
        for lang in langs:
            stream, report = streams[lang], reports[lang]
            for which, counts in (("evaluation", eval_counts), ("calibration", cal_counts)):
                by_set[which] += _pack(stream, which, counts[lang], params.n_ctx, header, separator,
                                       report, bar)
            report.samples_unused = len(stream.items) - stream.pos
            report.empty += stream.empty
            report.tokens_truncated = stream.truncated
    finally:
        if bar is not None:
            bar.close()

    chunks: list[Chunk] = []
    for which in SETS:
        # interleave languages in dealing order so any prefix of a set stays balanced
        start = 0 if which == "evaluation" else params.n_evaluation % len(langs)
        queues = {lang: [c for c in by_set[which] if c.lang == lang] for lang in langs}
        ordered: list[Chunk] = []
        k = 0
        while any(queues.values()):
            lang = langs[(start + k) % len(langs)]
            if queues[lang]:
                ordered.append(queues[lang].pop(0))
            k += 1
        for i, c in enumerate(ordered):
            c.index = i
        chunks += ordered
    return ChunkDataset(chunks=chunks, params=params, langs=langs,
                        vocab_fingerprint=tokenizer.vocab_fingerprint, text_hash=source_hash,
                        add_bos=tokenizer.add_bos, bos_id=tokenizer.bos_id, separator=separator,
                        fingerprint=whole, set_fingerprints=per_set,
                        report=[reports[lang] for lang in langs])


@dataclass
class ChunkSet:
    """One set of a chunks file, ready for the engine."""

    which: str
    chunks: list[np.ndarray]  # int32 [n_ctx] each
    langs: list[str]  # language of each chunk
    sample_ids: list[list[str]]
    fingerprint: str  # of this set
    dataset_fingerprint: str  # of the whole file
    vocab_fingerprint: str
    n_ctx: int
    add_bos: bool
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.chunks)


def read_chunk_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a chunks file (fingerprints, parameters, report) without its tokens."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"chunks file {path} does not exist; build it with `ggufopt dataset --model "
                        "MODEL --output PATH`")
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise UserError(f"{path} is not a readable Parquet file ({type(exc).__name__}); "
                        "rebuild it with `ggufopt dataset`") from exc
    if META_KEY not in meta:
        raise UserError(f"{path} is not a ggufopt chunks file (no {META_KEY.decode()} metadata); "
                        "build one with `ggufopt dataset`")
    info = json.loads(meta[META_KEY])
    if info.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} has chunks format {info.get('format')}, this version reads "
                        f"{FORMAT_VERSION}; rebuild it with `ggufopt dataset`")
    return info


def load_chunks(path: str | Path, which: str = "evaluation", *, fingerprint: str | None = None,
                vocab_fingerprint: str | None = None, n_ctx: int | None = None) -> ChunkSet:
    """Read one set (``evaluation`` or ``calibration``) of a chunks file.

    Each expectation that is given must match, or the file is refused with a UserError:
    ``fingerprint`` (of this set, or of the whole file), ``vocab_fingerprint`` (of the model that
    will evaluate the chunks) and ``n_ctx``.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if which not in SETS:
        raise UserError(f"unknown chunk set {which!r}; use evaluation or calibration")
    path = Path(path)
    info = read_chunk_metadata(path)
    set_fp = info["set_fingerprints"][which]
    if fingerprint is not None and fingerprint not in (set_fp, info["fingerprint"]):
        raise UserError(f"{path} holds {which} chunks with fingerprint {set_fp}, not the expected "
                        f"{fingerprint}; the corpus, tokenizer or chunk settings changed: rebuild the "
                        "chunks or point to the file the results were made with")
    if vocab_fingerprint is not None and vocab_fingerprint != info["vocab_fingerprint"]:
        raise UserError(f"{path} was tokenized for vocabulary {info['vocab_fingerprint']}, but the "
                        f"model has vocabulary {vocab_fingerprint}; rebuild the chunks with this "
                        "model (`ggufopt dataset --model ...`)")
    file_n_ctx = int(info["params"]["n_ctx"])
    if n_ctx is not None and int(n_ctx) != file_n_ctx:
        raise UserError(f"{path} has chunks of {file_n_ctx} tokens, not {n_ctx}; rebuild with "
                        f"--chunk-size {n_ctx} or use n_ctx={file_n_ctx}")
    table = pq.read_table(path)
    table = table.filter(pc.equal(table["set"], which))
    table = table.sort_by("index")
    flat = table["tokens"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    tokens = np.asarray(flat, dtype=np.int32).reshape(-1, file_n_ctx)
    return ChunkSet(which=which, chunks=[row.copy() for row in tokens],
                    langs=table["lang"].to_pylist(), sample_ids=table["sample_ids"].to_pylist(),
                    fingerprint=set_fp, dataset_fingerprint=info["fingerprint"],
                    vocab_fingerprint=info["vocab_fingerprint"], n_ctx=file_n_ctx,
                    add_bos=bool(info["add_bos"]), metadata=info)
