"""Importance matrices: collect them in process, grow them chunk by chunk, read and write them.

An importance matrix holds, for every weight matrix ``W`` that llama.cpp multiplies with
activations (``MUL_MAT``, and ``MUL_MAT_ID`` for mixture-of-experts weights), the sum over
calibration tokens of the squared activation entering each input column of ``W``, plus how many
tokens were summed. llama.cpp's quantizers weight each column's rounding error by the mean,
``sum / count``; IQ1/IQ2-class types refuse to run without it.

Collection hooks llama.cpp's scheduler eval callback (``cb_eval``) into a
:class:`~ggufopt_ray.engine.logits.LogitsEngine`: for each matching matrix multiplication the
callback reads the activation tensor (``src[1]``) and accumulates it. Every position of a chunk
is requested as an output, so the last layers see all tokens, and each chunk's first token is
replaced by BOS exactly as ``llama-imatrix`` does.

Accumulation is float64 within a chunk and folded into the float32 sums (the precision of the
file format) once per chunk. Growing an imatrix chunk by chunk, with a save and load in between,
therefore gives bit-for-bit the same numbers as collecting all chunks at once.

Because the statistics are sums over tokens, imatrices of single languages collected once combine
into the imatrix of any language mix (:func:`mix_imatrices`, :func:`weighted_sum`): a weighted sum
of the parts equals collecting on the chunk list with each language's chunks weighted alike.

Files: llama.cpp's GGUF imatrix format (``general.type = imatrix``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``; tensors ``<weight>.in_sum2`` with ggml shape
``[n_cols, n_mat]`` and ``<weight>.counts`` with ``[1, n_mat]``), which llama.cpp's own
``llama-quantize --imatrix`` reads, and the legacy ``.dat`` format (read and write).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ggufopt_ray.errors import UserError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_FINGERPRINT = "ggufopt.imatrix.dataset_fingerprint"  # ours; llama.cpp ignores unknown keys
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"
LEGACY_DEFAULT_CHUNK_SIZE = 512  # the legacy format does not store it; llama.cpp guesses n_ctx


@dataclass
class ImatrixEntry:
    """Statistics of one weight: ``sums[m, j]`` = sum of x_j^2 over the tokens fed to matrix m."""

    sums: np.ndarray  # float32 [n_mat, n_cols]
    counts: np.ndarray  # int64 [n_mat]: tokens that went through each matrix (expert)

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.sums.shape[1])

    @property
    def size(self) -> int:
        return int(self.sums.size)

    def importance(self) -> np.ndarray:
        """Flat float32 ``[n_mat * n_cols]`` mean squared activation: what llama.cpp quantizes with.

        A matrix that never saw a token (an unused expert) gets 1.0 everywhere, as in llama.cpp.
        """
        out = np.ones_like(self.sums, dtype=np.float32)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None].astype(np.float32)
        return out.reshape(-1)

    def copy(self) -> "ImatrixEntry":
        return ImatrixEntry(self.sums.copy(), self.counts.copy())


@dataclass
class Imatrix:
    """Per-weight importance statistics plus where they came from."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    #: running hash of every token chunk added, in order (empty when unknown, e.g. a loaded .dat)
    dataset_fingerprint: str = ""

    # -- identity -------------------------------------------------------------------------------
    def hash(self) -> str:
        """Content hash of the statistics (names, shapes, sums, counts) for caching quantizations."""
        h = hashlib.sha256()
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(name.encode() + b"\x00")
            h.update(struct.pack("<qq", e.n_mat, e.n_cols))
            h.update(np.ascontiguousarray(e.sums, dtype="<f4").tobytes())
            h.update(np.ascontiguousarray(e.counts, dtype="<i8").tobytes())
        return h.hexdigest()[:16]

    def copy(self) -> "Imatrix":
        return Imatrix({k: v.copy() for k, v in self.entries.items()}, self.chunk_count, self.chunk_size,
                       list(self.datasets), self.dataset_fingerprint)

    def importance(self) -> dict[str, np.ndarray]:
        """Name -> flat float32 mean squared activations, the data llama.cpp's quantizer takes."""
        return {name: e.importance() for name, e in sorted(self.entries.items())}

    def summary(self) -> str:
        n_tok = max((int(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0)
        return (f"{len(self.entries)} tensors, {self.chunk_count} chunks of {self.chunk_size} tokens "
                f"({n_tok} tokens per tensor), hash {self.hash()}")

    # -- combining ------------------------------------------------------------------------------
    def merge(self, other: "Imatrix") -> "Imatrix":
        """A new imatrix holding the statistics of both (as ``llama-imatrix --in-file A --in-file B``)."""
        out = self.copy()
        for name, e in other.entries.items():
            mine = out.entries.get(name)
            if mine is None:
                out.entries[name] = e.copy()
                continue
            if mine.sums.shape != e.sums.shape:
                raise UserError(f"cannot merge imatrices: {name} has shape {mine.sums.shape} in one and "
                                f"{e.sums.shape} in the other; they come from different models")
            mine.sums += e.sums.astype(np.float32)
            mine.counts += e.counts
        out.chunk_count += other.chunk_count
        out.chunk_size = max(out.chunk_size, other.chunk_size)
        out.datasets += [d for d in other.datasets if d not in out.datasets]
        out.dataset_fingerprint = _chain(out.dataset_fingerprint, other.dataset_fingerprint.encode())
        return out

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write to ``path`` atomically; ``fmt`` ``gguf`` or ``dat`` (default: by suffix, .dat -> dat).

        The temporary file's name carries the process id: trials of one sweep (or two sweeps on one
        cache) may save the same imatrix at once, and each must rename only its own complete file."""
        path = Path(path)
        fmt = fmt or ("dat" if path.suffix.lower() == ".dat" else "gguf")
        if fmt not in ("gguf", "dat"):
            raise UserError(f"unknown imatrix format {fmt!r}; use gguf or dat")
        if not self.entries:
            raise UserError("the imatrix is empty (no tensor saw any token); feed it at least one chunk")
        if not path.parent.exists():
            raise UserError(f"output folder {path.parent} does not exist; create it first")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        if fmt == "gguf":
            self._write_gguf(tmp)
        else:
            self._write_dat(tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, legacy_chunk_size: int = LEGACY_DEFAULT_CHUNK_SIZE) -> "Imatrix":
        """Read a GGUF imatrix or a legacy ``.dat`` one (told apart by the GGUF magic)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"imatrix file {path} does not exist; check the path")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return cls._read_gguf(path)
        return cls._read_dat(path, legacy_chunk_size)

    def _datasets_for_file(self) -> list[str]:
        # llama-quantize prints datasets[0]; never write an empty list
        return self.datasets or [f"ggufopt:{self.dataset_fingerprint or 'unknown'}"]

    def _write_gguf(self, path: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(str(path), arch="imatrix")
        # llama-imatrix files carry no architecture key; the writer adds one unasked
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, self._datasets_for_file())
        writer.add_uint32(KEY_CHUNK_COUNT, int(self.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(self.chunk_size))
        if self.dataset_fingerprint:
            writer.add_string(KEY_FINGERPRINT, self.dataset_fingerprint)
        for name in sorted(self.entries):
            e = self.entries[name]
            writer.add_tensor(name + SUFFIX_SUMS, np.ascontiguousarray(e.sums, dtype=np.float32))
            writer.add_tensor(name + SUFFIX_COUNTS, e.counts.astype(np.float32).reshape(e.n_mat, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    @classmethod
    def _read_gguf(cls, path: Path) -> "Imatrix":
        from ggufopt_ray.gguf.inspect import open_reader

        reader = open_reader(path)

        def value(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            if t.name.endswith(SUFFIX_SUMS):
                sums[t.name[: -len(SUFFIX_SUMS)]] = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
            elif t.name.endswith(SUFFIX_COUNTS):
                counts[t.name[: -len(SUFFIX_COUNTS)]] = np.array(t.data, dtype=np.float32).reshape(-1)
        if not sums:
            raise UserError(f"{path} is a GGUF file without any '*{SUFFIX_SUMS}' tensor: not an imatrix "
                            "(a model file?); pass an imatrix made by `ggufopt imatrix` or llama-imatrix")
        entries = {}
        for name in sorted(sums):
            if name not in counts:
                raise UserError(f"{path}: tensor {name} has sums but no counts; the file is damaged")
            c = np.rint(counts[name]).astype(np.int64)
            if c.size != sums[name].shape[0]:
                raise UserError(f"{path}: {name} has {sums[name].shape[0]} matrices but {c.size} counts")
            entries[name] = ImatrixEntry(sums[name], c)
        datasets = value(KEY_DATASETS, []) or []
        return cls(entries, int(value(KEY_CHUNK_COUNT, 0) or 0), int(value(KEY_CHUNK_SIZE, 0) or 0),
                   [str(d) for d in datasets], str(value(KEY_FINGERPRINT, "") or ""))

    def _write_dat(self, path: Path) -> None:
        chunk_size = self.chunk_size or LEGACY_DEFAULT_CHUNK_SIZE
        names = [n for n in sorted(self.entries) if (self.entries[n].counts > 0).any()]
        with open(path, "wb") as fh:
            fh.write(struct.pack("<i", len(names)))
            for name in names:
                e = self.entries[name]
                raw = name.encode()
                ncall = int(-(-int(e.counts.max()) // chunk_size))  # ceiling division, as llama.cpp
                fh.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, e.size))
                cnt = e.counts.astype(np.float32)[:, None]
                vals = np.where(cnt > 0, e.sums / np.where(cnt > 0, cnt, 1), 1.0) * ncall
                fh.write(np.ascontiguousarray(vals, dtype="<f4").tobytes())
            dataset = self._datasets_for_file()[-1].encode()
            fh.write(struct.pack("<ii", int(self.chunk_count), len(dataset)) + dataset)

    @classmethod
    def _read_dat(cls, path: Path, chunk_size: int) -> "Imatrix":
        data = path.read_bytes()
        bad = UserError(f"{path} is neither a GGUF imatrix nor a readable legacy .dat imatrix "
                        "(truncated or another kind of file)")
        pos = 0

        def take(fmt):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(data):
                raise bad
            vals = struct.unpack_from(fmt, data, pos)
            pos += size
            return vals

        (n_entries,) = take("<i")
        if n_entries < 1 or n_entries > 1_000_000:
            raise bad
        entries = {}
        for _ in range(n_entries):
            (n,) = take("<i")
            if n <= 0 or n > 4096 or pos + n > len(data):
                raise bad
            name = data[pos:pos + n].decode("utf-8", "replace")
            pos += n
            ncall, nval = take("<ii")
            if nval < 1 or pos + 4 * nval > len(data):
                raise bad
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            # stored values are mean * ncall; rebuild sums and counts as llama-imatrix does
            entries[name] = ImatrixEntry((vals * np.float32(chunk_size)).reshape(1, nval),
                                         np.array([max(ncall, 0) * chunk_size], dtype=np.int64))
        chunk_count = max((int(e.counts.max()) for e in entries.values()), default=0) // chunk_size
        datasets: list[str] = []
        if pos + 8 <= len(data):
            (_last_call,) = take("<i")
            (n,) = take("<i")
            if 0 <= n <= len(data) - pos:
                datasets = [data[pos:pos + n].decode("utf-8", "replace")]
        return cls(entries, chunk_count, chunk_size, datasets, "")


# -- weighted combination (calibration mixes) -------------------------------------------------------
def weighted_sum(terms: Sequence[tuple[Imatrix, float]], *, label: str | None = None) -> Imatrix:
    """``sum_i f_i * im_i``: sums of squares and token counts of each imatrix scaled by ``f_i``.

    An imatrix is additive over chunks, so with integer factors this *is* the imatrix of the
    chunks of ``im_1`` repeated ``f_1`` times, plus those of ``im_2`` repeated ``f_2`` times, and
    so on. A non-integer factor gives every chunk of that imatrix the weight ``f`` in the sums of
    squares and in the token counts: the collection on a weighted chunk list, and the expected
    value of collecting on a random share ``f`` of those chunks (or ``f`` draws with replacement
    when ``f`` > 1). llama.cpp stores counts as whole numbers, so each combined count is rounded
    (up to at least 1 when any weight reached it) and its sums are rescaled by the same ratio:
    ``sums / counts``, the only thing the quantizer uses, stays exact; counts are off by less
    than one token. Arithmetic is float64, stored as float32 like every imatrix.

    Factors must be >= 0 and not all 0; zero-factor terms are left out. Every imatrix must come
    from the same model (same tensor shapes). Metadata: ``chunk_count`` is the rounded weighted
    chunk count, ``chunk_size`` the largest, ``datasets`` the parts' names plus ``label``, and
    the fingerprint hashes the parts' fingerprints with their factors (it differs from the
    fingerprint of an actual collection on the weighted chunks, which chains token ids).
    """
    terms = [(im, float(f)) for im, f in terms]
    for _, f in terms:
        if not np.isfinite(f) or f < 0:
            raise UserError(f"imatrix weights must be finite and >= 0, got {f}")
    terms = [(im, f) for im, f in terms if f > 0]
    if not terms:
        raise UserError("every imatrix weight is 0: give at least one language a positive weight")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for im, f in terms:
        for name, e in im.entries.items():
            if name not in sums:
                sums[name] = np.zeros(e.sums.shape, dtype=np.float64)
                counts[name] = np.zeros(e.counts.shape, dtype=np.float64)
            elif sums[name].shape != e.sums.shape:
                raise UserError(f"cannot combine imatrices: {name} has shape {sums[name].shape} in one and "
                                f"{e.sums.shape} in another; they come from different models")
            sums[name] += f * e.sums.astype(np.float64)
            counts[name] += f * e.counts.astype(np.float64)
    out = Imatrix()
    for name in sorted(sums):
        c = counts[name]
        whole = np.where(c > 0, np.maximum(np.rint(c), 1.0), 0.0)
        scale = np.divide(whole, c, out=np.ones_like(c), where=c > 0)
        out.entries[name] = ImatrixEntry((sums[name] * scale[:, None]).astype(np.float32), whole.astype(np.int64))
    out.chunk_count = int(round(sum(f * im.chunk_count for im, f in terms)))
    out.chunk_size = max(im.chunk_size for im, _ in terms)
    for im, _ in terms:
        out.datasets += [d for d in im.datasets if d not in out.datasets]
    if label:
        out.datasets.append(label)
    fp = ""
    for im, f in terms:
        fp = _chain(fp, f"{im.dataset_fingerprint or im.hash()}*{f!r}".encode())
    out.dataset_fingerprint = fp
    return out


def mix_imatrices(parts: Mapping[str, Imatrix], chunks: Mapping[str, float]) -> Imatrix:
    """The imatrix of a calibration mix from per-language imatrices collected once each.

    ``parts[lang]`` was collected on ``parts[lang].chunk_count`` chunks of that language;
    ``chunks[lang]`` says how many chunks' worth of it the mix holds. Each part is scaled by
    ``chunks[lang] / parts[lang].chunk_count`` (see :func:`weighted_sum`): asking for 4 chunks of
    a language collected on 2 counts each of its chunks twice, exactly as collecting on the
    chunk list with those chunks repeated; 1 chunk's worth of it weights each by 0.5 (the
    expected imatrix of one chunk drawn at random from the two). Languages left out of ``chunks``
    or given 0 are not in the mix. The quantizer uses only ``sums / counts``, so it sees the
    proportions; the total sets ``chunk_count`` and counts. Asking for more chunks than were
    collected extrapolates: the statistics are no more precise than the chunks behind them.
    """
    unknown = sorted(set(chunks) - set(parts))
    if unknown:
        raise UserError(f"the mix names {', '.join(map(repr, unknown))} but imatrices exist only for "
                        f"{', '.join(map(repr, sorted(parts))) or 'nothing'}")
    terms = []
    for lang in sorted(chunks):
        want = float(chunks[lang])
        if not np.isfinite(want) or want < 0:
            raise UserError(f"the mix gives {lang!r} {chunks[lang]} chunks; use a number >= 0")
        if want == 0:
            continue
        have = parts[lang].chunk_count
        if have <= 0:
            raise UserError(f"the imatrix of {lang!r} records no chunks (chunk_count 0); "
                            "collect it with collect_imatrix or give its weight as a factor to weighted_sum")
        terms.append((parts[lang], want / have))
    label = "mix:" + ",".join(f"{lang}={float(chunks[lang]):g}" for lang in sorted(chunks) if chunks[lang])
    return weighted_sum(terms, label=label)


def load_imatrix(path: str | Path, legacy_chunk_size: int = LEGACY_DEFAULT_CHUNK_SIZE) -> Imatrix:
    return Imatrix.load(path, legacy_chunk_size)


def _chain(previous: str, payload: bytes) -> str:
    h = hashlib.sha256()
    h.update(previous.encode() + b"|")
    h.update(payload)
    return h.hexdigest()[:16]


def chunk_fingerprint(previous: str, tokens: np.ndarray) -> str:
    """The dataset fingerprint after adding ``tokens`` (as evaluated, BOS included)."""
    return _chain(previous, np.ascontiguousarray(tokens, dtype="<i4").tobytes())


# -- collection -------------------------------------------------------------------------------------
def _weight_name(raw: str) -> str:
    """``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight`` (backend copies carry decorations)."""
    if "#" in raw:
        raw = raw.split("#", 2)[1]
    return raw


class ImatrixCollector:
    """A model loaded with an eval callback; :meth:`add_chunk` folds one chunk into :attr:`imatrix`.

    ``process_output`` also collects ``output.weight`` (llama-imatrix's ``--process-output``; off
    by default because llama.cpp advises against using it there). llama-imatrix ignores matrix
    multiplications over fewer than 16 rows; ``min_batch_tokens=16`` reproduces that, the default
    (1) keeps every token, which only differs when a ubatch tail is shorter than 16 tokens.
    """

    def __init__(self, model_path: str | Path, settings=None, *, base: Imatrix | None = None,
                 dataset_name: str | None = None, process_output: bool = False, min_batch_tokens: int = 1):
        from ggufopt_ray.engine import ggml, native
        from ggufopt_ray.engine.logits import LogitsEngine, RuntimeSettings

        settings = settings or RuntimeSettings()
        self._ggml = ggml
        ggml.lib()  # load and check the struct layout before any callback runs
        self.process_output = bool(process_output)
        self.min_batch_tokens = int(min_batch_tokens)
        self.imatrix = base.copy() if base is not None else Imatrix()
        if dataset_name and dataset_name not in self.imatrix.datasets:
            self.imatrix.datasets.append(dataset_name)
        self._chunk: dict[str, list] = {}
        self._error: BaseException | None = None
        self._in_chunk = False
        self._cb = native.llama().ggml_backend_sched_eval_callback(self._callback)
        self.engine = LogitsEngine(model_path, settings, cb_eval=self._cb)
        self._logits_buf = None

    # -- the callback (runs inside llama_decode) ---------------------------------------------------
    def _callback(self, t_ptr, ask, user_data):  # noqa: ARG002 - signature fixed by ggml
        try:
            t = self._ggml.ggml_tensor.from_address(t_ptr)
            if ask:
                return self._wants(t)
            if self._in_chunk:
                self._collect(t)
            return True
        except BaseException as exc:  # never let Python errors unwind through C
            self._error = exc
            return False

    def _wants(self, t) -> bool:
        op = self._ggml.op_name(t.op)
        if op not in ("MUL_MAT", "MUL_MAT_ID"):
            return False
        src0, src1 = t.src[0], t.src[1]
        if not src0 or not src1:
            return False
        if src1.contents.type != 0:  # GGML_TYPE_F32 activations only, as llama-imatrix
            return False
        name = _weight_name(self._ggml.tensor_name(src0.contents))
        if not (name.startswith("blk.") or (self.process_output and name == "output.weight")):
            return False
        if op == "MUL_MAT" and src1.contents.ne[1] < self.min_batch_tokens:
            return False
        return True

    def _acc(self, name: str, n_mat: int, n_cols: int):
        acc = self._chunk.get(name)
        if acc is None:
            base = self.imatrix.entries.get(name)
            if base is not None and (base.n_mat, base.n_cols) != (n_mat, n_cols):
                raise UserError(f"the imatrix being extended has {name} with shape {(base.n_mat, base.n_cols)}, "
                                f"this model gives {(n_mat, n_cols)}; it was made for another model")
            acc = [np.zeros((n_mat, n_cols), dtype=np.float64), np.zeros(n_mat, dtype=np.int64)]
            self._chunk[name] = acc
        return acc

    def _collect(self, t) -> None:
        g = self._ggml
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = _weight_name(g.tensor_name(src0))
        op = g.op_name(t.op)
        x = g.read_tensor(src1, np.float32)  # (ne13, ne12, ne11, ne10)
        n_cols = x.shape[-1]
        if op == "MUL_MAT_ID":
            n_as = int(src0.ne[2])
            ids = g.read_tensor(t.src[2].contents, np.int32)[0, 0]  # (n_tokens, n_ids)
            n_tokens, n_ids = ids.shape
            if x.shape[1] != n_tokens:
                raise RuntimeError(f"{name}: {ids.shape} expert ids for activations of shape {x.shape}")
            if ids.size and (ids.min() < 0 or ids.max() >= n_as):
                raise RuntimeError(f"{name}: expert id out of range [0, {n_as})")
            rows = x[0][:, np.arange(n_ids) % x.shape[2], :].astype(np.float64)  # (n_tokens, n_ids, cols)
            sums, counts = self._acc(name, n_as, n_cols)
            np.add.at(sums, ids.reshape(-1), (rows * rows).reshape(-1, n_cols))
            counts += np.bincount(ids.reshape(-1), minlength=n_as)
            return
        n02, n03 = int(src0.ne[2]), int(src0.ne[3])
        sums, counts = self._acc(name, n02 * n03, n_cols)
        if n02 * n03 == 1:
            x64 = x.reshape(-1, n_cols).astype(np.float64)
            sums[0] += np.einsum("ij,ij->j", x64, x64)
            counts[0] += x64.shape[0]
            return
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                m = (i3 % n03) * n02 + (i2 % n02)
                x64 = x[i3, i2].astype(np.float64)
                sums[m] += np.einsum("ij,ij->j", x64, x64)
                counts[m] += x64.shape[0]

    # -- chunks -------------------------------------------------------------------------------------
    def add_chunk(self, tokens: Sequence[int]) -> None:
        """Evaluate one chunk (first token -> BOS when the model adds one) and fold in its statistics."""
        chunk = self.engine.prepare_chunk(tokens)
        if chunk.size == 0:
            raise UserError("empty token chunk: give at least one token per chunk")
        n = chunk.size
        if self._logits_buf is None or self._logits_buf.shape[0] < n:
            self._logits_buf = np.empty((self.engine.settings.n_ctx, self.engine.n_vocab), dtype=np.float32)
        self._chunk = {}
        self._error = None
        self._in_chunk = True
        try:
            self.engine.logits(chunk, out=self._logits_buf[:n])
        except RuntimeError:
            if self._error is not None:
                raise self._error from None
            raise
        finally:
            self._in_chunk = False
        if self._error is not None:
            raise self._error
        if not self._chunk:
            raise RuntimeError("the eval callback saw no weight matrix multiplication; "
                               "this llama.cpp build does not call cb_eval as expected")
        im = self.imatrix
        for name, (sums, counts) in self._chunk.items():
            if not np.isfinite(sums).all():
                raise UserError(f"non-finite activations entering {name}: the model overflows on this "
                                "chunk (try an F32 model or other text)")
            entry = im.entries.get(name)
            if entry is None:
                entry = im.entries[name] = ImatrixEntry(np.zeros(sums.shape, dtype=np.float32),
                                                        np.zeros(counts.shape, dtype=np.int64))
            entry.sums += sums.astype(np.float32)
            entry.counts += counts
        self._chunk = {}
        im.chunk_count += 1
        im.chunk_size = max(im.chunk_size, n)
        im.dataset_fingerprint = chunk_fingerprint(im.dataset_fingerprint, chunk)

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
            self.engine = None

    def __enter__(self) -> "ImatrixCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def imatrix_settings(chunks: Sequence[np.ndarray], n_ctx: int | None = None, n_threads: int | None = None,
                     n_gpu_layers: int = 0, n_ubatch: int = 512, verbose: bool = False):
    """Runtime settings that fit the longest chunk in one context (and one batch)."""
    from ggufopt_ray.engine.logits import RuntimeSettings

    longest = max((len(c) for c in chunks), default=1)
    ctx = int(n_ctx or max(2, longest))
    if longest > ctx:
        raise UserError(f"a chunk has {longest} tokens but n_ctx is {ctx}; raise n_ctx or cut chunks shorter")
    return RuntimeSettings(n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, n_ubatch), n_threads=n_threads,
                           n_gpu_layers=n_gpu_layers, verbose=verbose)


def collect_imatrix(model_path: str | Path, chunks: Iterable[Sequence[int]], *, settings=None,
                    n_ctx: int | None = None, n_threads: int | None = None, base: Imatrix | None = None,
                    dataset_name: str | None = None, process_output: bool = False,
                    min_batch_tokens: int = 1, progress: bool = False) -> Imatrix:
    """Collect (or, with ``base``, extend) an importance matrix over token ``chunks``.

    ``chunks`` are int32 token-id sequences, each evaluated from an empty cache with every position
    an output and its first token replaced by BOS (when the model adds one). ``base`` is not
    modified; the result holds base + new chunks. Returns an :class:`Imatrix`.
    """
    chunks = [np.asarray(c, dtype=np.int32) for c in chunks]
    if not chunks:
        raise UserError("no token chunks to collect an imatrix from; give at least one chunk")
    if settings is None:
        settings = imatrix_settings(chunks, n_ctx=n_ctx, n_threads=n_threads)
    with ImatrixCollector(model_path, settings, base=base, dataset_name=dataset_name,
                          process_output=process_output, min_batch_tokens=min_batch_tokens) as collector:
        bar = None
        if progress:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(chunks), desc="imatrix", unit="chunk", file=sys.stderr)
        try:
            for c in chunks:
                collector.add_chunk(c)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return collector.imatrix


def text_chunks(engine, text: str, n_ctx: int, max_chunks: int | None = None) -> list[np.ndarray]:
    """Chunks of ``n_ctx`` tokens cut from ``text`` as llama-imatrix cuts them (see
    :func:`ggufopt_ray.engine.tokenizer.text_chunks`)."""
    from ggufopt_ray.engine.tokenizer import text_chunks as cut

    return cut(engine, text, n_ctx, max_chunks)


__all__ = ["Imatrix", "ImatrixEntry", "ImatrixCollector", "collect_imatrix", "load_imatrix",
           "imatrix_settings", "text_chunks", "chunk_fingerprint", "weighted_sum", "mix_imatrices"]
