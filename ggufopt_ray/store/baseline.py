"""The baseline store: per chunk, the token ids and the baseline's encoded log-probabilities.

A store belongs to exactly one (model, evaluation chunks, n_ctx, encoding, scored positions)
identity, recorded in its header with the runtime settings and llama.cpp version that produced
it, and with the base model's tensor signature (``tensor_signature``), so that candidates made
from another model are refused. Opening it with a different identity is refused rather than mixing chunks. Chunks commit
atomically (see ``chunkdir``), so a killed writer loses at most the chunk in flight.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ggufopt_ray.errors import UserError
from ggufopt_ray.store.chunkdir import ChunkStore

IDENTITY_KEYS = ("model_fingerprint", "vocab_fingerprint", "corpus_fingerprint", "n_ctx", "n_vocab",
                 "encoding", "encoding_params", "first", "n_chunks")
_PAYLOAD_PREFIX = "enc__"


def baseline_identity(header: dict) -> str:
    """Stable id of what a baseline store holds (its identity fields only)."""
    ident = {k: header.get(k) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_signature(model_path: str | Path) -> str:
    """Hash of a model's architecture and tensor table (names and logical shapes, not types).

    Every candidate made from a base model (any quant type, mix, imatrix or ZFP setting) keeps
    its architecture, tensor names and shapes; another model that merely shares the tokenizer
    (another size, another architecture) does not. ``bench`` compares a candidate's signature
    with the one its baseline recorded, so a baseline is never judged against a foreign model.
    """
    from ggufopt_ray.gguf.inspect import open_reader

    reader = open_reader(model_path)
    arch = reader.fields.get("general.architecture")
    h = hashlib.sha256(str(arch.contents() if arch is not None else "").encode())
    for name, shape in sorted((t.name, tuple(int(d) for d in t.shape)) for t in reader.tensors):
        h.update(f";{name}:{'x'.join(map(str, shape))}".encode())
    return h.hexdigest()[:16]


def recorded_tensor_signature(header: dict) -> str | None:
    """The base model's tensor signature of a baseline store (None when it cannot be known).

    Stores written before the signature was recorded get it from the model file they name, but
    only while that file still has the recorded fingerprint.
    """
    if header.get("tensor_signature"):
        return str(header["tensor_signature"])
    path = header.get("model_path")
    if not path or not Path(path).is_file():
        return None
    from ggufopt_ray.gguf.inspect import model_fingerprint

    try:
        if model_fingerprint(path) != header.get("model_fingerprint"):
            return None
        return tensor_signature(path)
    except UserError:
        return None


class BaselineStore(ChunkStore):
    KIND = "baseline"
    IDENTITY_KEYS = IDENTITY_KEYS
    REPAIR_HINT = ("rerun `ggufopt logits` (or the sweep) with the same settings: it recomputes "
                   "damaged chunks")
    REMAKE = "`ggufopt logits ... --overwrite`"

    @classmethod
    def prepare_header(cls, header: dict) -> dict:
        missing = [k for k in IDENTITY_KEYS if k not in header]
        if missing:
            raise ValueError(f"baseline header lacks {missing}")
        return {**header, "baseline_id": baseline_identity(header)}

    @property
    def baseline_id(self) -> str:
        return self.header["baseline_id"]

    @property
    def n_chunks(self) -> int:
        return int(self.header["n_chunks"])

    def complete(self) -> bool:
        return self.dir.first_missing(0, self.n_chunks) is None

    def n_leading(self) -> int:
        """How many chunks from 0 on are committed without a gap (what ``bench`` can evaluate)."""
        first_gap = self.dir.first_missing(0, self.n_chunks)
        return self.n_chunks if first_gap is None else first_gap

    def write_payload(self, index: int, tokens: np.ndarray, payload: dict) -> None:
        if not 0 <= index < self.n_chunks:
            raise UserError(f"chunk {index} is outside this store's {self.n_chunks} chunks")
        arrays = {"tokens": np.asarray(tokens, dtype=np.int32)}
        arrays.update({_PAYLOAD_PREFIX + k: np.asarray(v) for k, v in payload.items()})
        self.dir.write_chunk(index, arrays, {"n_tokens": int(len(tokens))})

    def read_payload(self, index: int) -> dict:
        arrays, _ = self.dir.read_chunk(index)
        return {k[len(_PAYLOAD_PREFIX):]: v for k, v in arrays.items() if k.startswith(_PAYLOAD_PREFIX)}

    def read_tokens(self, index: int) -> np.ndarray:
        arrays, _ = self.dir.read_chunk(index, names=["tokens"])
        return arrays["tokens"]

    def check_tokens(self, index: int, tokens: np.ndarray) -> None:
        """Refuse a candidate evaluated on other tokens than the baseline's."""
        stored = self.read_tokens(index)
        if stored.shape != np.shape(tokens) or not np.array_equal(stored, tokens):
            raise UserError(f"chunk {index} tokens differ from the baseline's in {self.root}; "
                            "evaluate the candidate on the baseline's own chunks")
