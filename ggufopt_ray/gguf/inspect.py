"""Read what a GGUF file is: architecture, sizes, bits per weight, tensor types, vocab fingerprint.

Works for any architecture the ``gguf`` package can read, because everything comes from
generic metadata keys (``general.*``, ``{arch}.context_length``, ``tokenizer.ggml.*``) and the
tensor table, never from llama-specific assumptions. The vocabulary fingerprint is what lets
later stages refuse to compare a candidate with a baseline that tokenizes differently.

Files are read with ``gguf.header`` (milliseconds), not gguf-py's ``GGUFReader``, which takes
tens of seconds on a 128k-token vocabulary; ``open_gguf_reader`` still gives the latter.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ggufopt_ray.errors import UserError
from ggufopt_ray.gguf.header import GGUFHeader, ValueType, read_header

GGUF_MAGIC = b"GGUF"


@dataclass
class TensorTypeStats:
    count: int = 0
    n_params: int = 0
    n_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / self.n_params if self.n_params else 0.0


@dataclass
class ModelInfo:
    path: str
    architecture: str
    name: str
    vocab_size: int
    context_length: int | None
    n_params: int
    file_size: int
    tensor_bytes: int
    file_type: str
    vocab_fingerprint: str
    add_bos: bool
    by_type: dict[str, TensorTypeStats] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Bits per parameter of the tensor data, the figure llama.cpp prints as BPW."""
        return 8.0 * self.tensor_bytes / self.n_params if self.n_params else 0.0

    def to_dict(self) -> dict:
        return {
            "path": self.path, "architecture": self.architecture, "name": self.name,
            "vocab_size": self.vocab_size, "context_length": self.context_length,
            "n_params": self.n_params, "file_size": self.file_size, "tensor_bytes": self.tensor_bytes,
            "bits_per_weight": self.bits_per_weight, "file_type": self.file_type,
            "vocab_fingerprint": self.vocab_fingerprint, "add_bos": self.add_bos,
            "by_type": {k: {"count": s.count, "n_params": s.n_params, "n_bytes": s.n_bytes,
                            "bits_per_weight": s.bits_per_weight} for k, s in self.by_type.items()},
        }


def check_gguf_file(path: str | Path) -> Path:
    """Fail with a one-line message unless ``path`` is an existing file that starts like GGUF."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"model path {path} is not a file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic); "
                        "convert it with llama.cpp's convert_hf_to_gguf.py first")
    return path


def _field_value(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def open_reader(path: str | Path) -> GGUFHeader:
    """The parsed header of ``path`` (``ggufopt_ray.gguf.header``); damage becomes a UserError.

    It answers what callers used of gguf-py's ``GGUFReader`` (``fields[key].contents()``,
    ``tensors[i].name/.shape/.tensor_type/.n_elements/.n_bytes/.data_offset/.data``) in a
    fraction of the time: gguf-py builds a Python object per vocabulary entry on open.
    """
    return read_header(check_gguf_file(path))


def open_gguf_reader(path: str | Path):
    """gguf-py's own ``GGUFReader`` for the rare caller that needs exactly it (slow: tens of
    seconds for a 128k vocabulary); damaged or truncated files become a UserError."""
    import gguf

    path = check_gguf_file(path)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damage
        raise UserError(f"{path} is damaged or truncated ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); re-create or re-download it")


def vocab_fingerprint_from_tokens(tokens: list[str], model: str = "") -> str:
    """Stable hash of the token strings in id order (and the tokenizer model name)."""
    h = hashlib.sha256()
    h.update(model.encode())
    for t in tokens:
        h.update(b"\x00")
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def vocab_fingerprint_of(reader: GGUFHeader) -> str:
    """``vocab_fingerprint_from_tokens`` of the file's tokens, hashed from their raw bytes.

    Identical to hashing the decoded strings (valid UTF-8 encodes back to the same bytes) but
    without making 100k+ Python strings.
    """
    tok_model = _field_value(reader, "tokenizer.ggml.model", "") or ""
    h = hashlib.sha256()
    h.update(str(tok_model).encode())
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is not None and f.count:
        if f.types == [ValueType.ARRAY, ValueType.STRING]:
            h.update(f.joined_bytes(b"\x00"))
        else:  # not a string array (a damaged or odd file): hash what the value reads as
            return vocab_fingerprint_from_tokens([str(t) for t in f.contents()], str(tok_model))
    return h.hexdigest()[:16]


def inspect_model(path: str | Path) -> ModelInfo:
    import gguf

    path = Path(path)
    reader = open_reader(path)
    arch = _field_value(reader, "general.architecture", "unknown")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = _field_value(reader, f"{arch}.vocab_size") or (tokens.count if tokens is not None else 0)
    ftype_value = _field_value(reader, "general.file_type")
    try:
        file_type = gguf.LlamaFileType(int(ftype_value)).name if ftype_value is not None else "unknown"
    except ValueError:
        file_type = f"unknown({ftype_value})"

    by_type: dict[str, TensorTypeStats] = {}
    tensor_types: dict[str, str] = {}
    n_params = tensor_bytes = 0
    file_size = path.stat().st_size
    for t in reader.tensors:
        tname = t.tensor_type.name
        stats = by_type.setdefault(tname, TensorTypeStats())
        stats.count += 1
        stats.n_params += int(t.n_elements)
        stats.n_bytes += int(t.n_bytes)
        n_params += int(t.n_elements)
        tensor_bytes += int(t.n_bytes)
        tensor_types[t.name] = tname
        if int(t.data_offset) + int(t.n_bytes) > file_size:
            raise UserError(f"{path} is truncated (tensor {t.name} runs past the end of the file); "
                            "re-create or re-download it")
    return ModelInfo(
        path=str(path), architecture=str(arch),
        name=str(_field_value(reader, "general.name", "") or ""),
        vocab_size=int(vocab_size),
        context_length=_field_value(reader, f"{arch}.context_length"),
        n_params=n_params, file_size=file_size, tensor_bytes=tensor_bytes,
        file_type=file_type, vocab_fingerprint=vocab_fingerprint_of(reader),
        add_bos=bool(_field_value(reader, "tokenizer.ggml.add_bos_token", True)),
        by_type=dict(sorted(by_type.items(), key=lambda kv: -kv[1].n_params)),
        tensor_types=tensor_types,
    )


def format_model_info(info: ModelInfo) -> str:
    """A human-readable summary, one fact per line, and a table of tensor types."""
    lines = [
        f"file            {info.path}",
        f"architecture    {info.architecture}" + (f"  ({info.name})" if info.name else ""),
        f"file type       {info.file_type}",
        f"parameters      {info.n_params:,}",
        f"file size       {info.file_size:,} bytes ({info.file_size / 2**20:.2f} MiB)",
        f"bits per weight {info.bits_per_weight:.4f}",
        f"vocab           {info.vocab_size:,} tokens, fingerprint {info.vocab_fingerprint}",
        f"training ctx    {info.context_length}",
        "",
        f"{'type':<10} {'tensors':>8} {'params':>14} {'bytes':>14} {'bpw':>8}",
    ]
    for name, s in info.by_type.items():
        lines.append(f"{name:<10} {s.count:>8} {s.n_params:>14,} {s.n_bytes:>14,} {s.bits_per_weight:>8.4f}")
    return "\n".join(lines)


def tensor_type_histogram(info: ModelInfo) -> Counter:
    return Counter(info.tensor_types.values())


def model_fingerprint(path: str | Path, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A stable identity of a model file that costs milliseconds even for a 100 GB model.

    It hashes the file size, the tensor table (names, types, shapes) and ``samples`` evenly
    spaced slices of the file. Two different quantizations differ in the tensor table; two
    files with the same table but other weights differ in the sampled bytes with near certainty.
    """
    reader = open_reader(path)  # checks the file, including tensors running past its end
    path, size = reader.path, reader.file_size
    h = hashlib.sha256()
    h.update(str(size).encode())
    for t in reader.tensors:
        h.update(f"{t.name}:{t.tensor_type.name};".encode())
    with open(path, "rb") as fh:
        for k in range(samples):
            fh.seek(max(0, (size - sample_bytes) * k // max(1, samples - 1)))
            h.update(fh.read(sample_bytes))
    return h.hexdigest()[:16]
