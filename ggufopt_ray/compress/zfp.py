"""ZFP compression of a GGUF model's weight matrices, measured exactly, written back as a GGUF.

The seed notes (004) wanted ZFP floating-point compression instead of quantization. llama.cpp
cannot run ZFP streams, so this module answers the question the notes asked without patching
llama.cpp: every selected weight matrix is compressed with zfpy, the exact compressed size is
counted, the stream is decompressed again, and the decompressed weights are written to a GGUF
with the source's metadata and tensor types. That file runs in llama.cpp like any other, so its
KL-divergence, perplexity and speed are measured by the same code as a quant; the size that
counts is the compressed byte count in the report, not the written file's size.

Modes (zfp's own): ``rate`` (fixed rate, bits per value), ``precision`` (fixed number of bit
planes), ``accuracy`` (fixed absolute error tolerance) and ``reversible`` (lossless, bit-exact).

Layout: ``dims`` (the seed's ZFPDIM). A weight with ggml shape ``(ne0, ne1, ...)`` is read as a
C-order matrix ``W`` of ``R`` rows by ``C = ne0`` columns (the contiguous axis, the input
features; ``R`` is the product of the other dimensions). zfp cuts a d-dimensional array into
independent blocks of 4^d values; the array it is given is

====  ==============================  ================================================
dims  array handed to zfp             one zfp block covers
====  ==============================  ================================================
1     ``W.reshape(R*C)``              4 consecutive weights of one row (rows follow each
                                      other, so if C % 4 != 0 a block spans a row end)
2     ``W`` ``(R, C)``                4 rows x 4 columns
3     ``W.reshape(R, C/4, 4)``        4 rows x 16 consecutive columns
4     ``W.reshape(R/4, 4, C/4, 4)``   16 rows x 16 columns
====  ==============================  ================================================

i.e. for dims 3 each row is cut into groups of 4 columns, and for dims 4 the rows are grouped
in 4s as well, so element ``[a, b, c, d]`` is ``W[4a + b, 4c + d]``. For dims 3 and 4, when C
(and for dims 4, R) is not a multiple of 4, ``W`` is first padded by repeating its last column
(row) up to the next multiple of 4, and the padding is cropped after decompression; the padding
is compressed too and counted in the byte count. Streams are written without zfp's header (the
GGUF tensor table and the config give shape, type and mode), so the byte count is the payload.

zfp works on float32 only here: F16 and BF16 weights are decoded to float32 first and the
decompressed values are rounded back to the source type when written. Errors (RMSE, SNR, max
absolute error) compare the values actually written with the source values. Quantized tensors
cannot be compressed (their values are codes, not floats): compress the F32/F16/BF16 original.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ggufopt_ray.errors import UserError

ZFP_MODES = ("rate", "precision", "accuracy", "reversible")
# Highest fixed rate accepted, in bits per value: twice float32's 32 bits, and within zfp's
# ZFP_MAX_BITS (16658) bits per block even for 4-d blocks of 256 values (256 * 64 = 16384).
ZFP_MAX_RATE = 64
_MODE_PARAMETER = {"rate": "rate", "precision": "precision", "accuracy": "tolerance", "reversible": None}
FLOAT_SOURCE_TYPES = ("F32", "F16", "BF16")
PROVENANCE_KEY = "ggufopt.zfp.config"


# -- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ZfpConfig:
    """How to compress: zfp mode with its one parameter, layout dimensionality, tensor selection.

    ``rate`` is bits per value (mode ``rate``); ``precision`` the number of uncompressed bit
    planes kept (mode ``precision``); ``tolerance`` the absolute error bound (mode ``accuracy``);
    mode ``reversible`` takes none. ``include``/``exclude`` are regular expressions searched in
    tensor names: a tensor is compressed when it has at least 2 dimensions, matches some
    ``include`` pattern (if any are given) and matches no ``exclude`` pattern.
    """

    mode: str = "rate"
    rate: float | None = None
    precision: int | None = None
    tolerance: float | None = None
    dims: int = 2
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None:
                value = ()
            elif isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))

    def validate(self) -> None:
        if self.mode not in ZFP_MODES:
            raise UserError(f"unknown ZFP mode {self.mode!r}; use one of {', '.join(ZFP_MODES)}")
        wanted = _MODE_PARAMETER[self.mode]
        for param in ("rate", "precision", "tolerance"):
            if param != wanted and getattr(self, param) is not None:
                raise UserError(f"{param} applies only to mode "
                                f"{[m for m, p in _MODE_PARAMETER.items() if p == param][0]!r}, "
                                f"not to mode {self.mode!r}; drop it or change the mode")
        if wanted is not None and getattr(self, wanted) is None:
            example = {"rate": "rate=8 (bits per value)", "precision": "precision=16 (bit planes)",
                       "tolerance": "tolerance=1e-4 (absolute error)"}[wanted]
            raise UserError(f"mode {self.mode!r} needs a {wanted}, e.g. {example}")
        if self.mode == "rate":
            if not (isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate > 0):
                raise UserError(f"rate must be a positive number of bits per value, not {self.rate!r}; "
                                "e.g. 8")
            if self.rate > ZFP_MAX_RATE:
                # zfpy sizes its buffer from the rate: far above the raw 32 bits it aborts in
                # native code (exit 134, no Python error), so refuse before calling it.
                raise UserError(f"rate {self.rate:g} is above zfp's useful maximum of {ZFP_MAX_RATE} bits "
                                "per value (float32 has 32); e.g. 8")
            block = 4 ** int(self.dims) if self.dims in (1, 2, 3, 4) else 16
            if math.floor(block * self.rate + 0.5) < 9:
                # zfp needs at least 9 bits per block of float32 values (zfp_stream_set_rate);
                # below that zfpy 1.0.1 crashes or writes garbage, so refuse it here.
                raise UserError(f"rate {self.rate:g} is below zfp's minimum for float32 with dims "
                                f"{self.dims}: 9 bits per block of {block} values = {9 / block:g} "
                                "bits per value; raise the rate or the dims")
        if self.mode == "precision":
            if not (isinstance(self.precision, (int, np.integer)) and 1 <= int(self.precision) <= 64):
                raise UserError(f"precision must be an integer number of bit planes in 1..64, "
                                f"not {self.precision!r}; e.g. 16")
        if self.mode == "accuracy":
            if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance)
                    and self.tolerance > 0):
                raise UserError(f"tolerance must be a positive absolute error, not {self.tolerance!r}; "
                                "e.g. 1e-4")
        if isinstance(self.dims, bool) or not isinstance(self.dims, (int, np.integer)) \
                or not 1 <= int(self.dims) <= 4:
            raise UserError(f"dims must be 1, 2, 3 or 4 (zfp's array dimensionality), not {self.dims!r}")
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"bad tensor-name regex {pattern!r}: {exc}")

    @property
    def parameter(self) -> float | int | None:
        """The mode's one setting (rate, precision or tolerance); None when reversible."""
        wanted = _MODE_PARAMETER.get(self.mode)
        return getattr(self, wanted) if wanted else None

    @property
    def label(self) -> str:
        """Short name for tables and file names, e.g. ``zfp-rate8-d2``, ``zfp-rev-d4``."""
        p = self.parameter
        tag = {"rate": "rate", "precision": "prec", "accuracy": "tol", "reversible": "rev"}[self.mode]
        return f"zfp-{tag}{'' if p is None else format(p, 'g')}-d{self.dims}"

    def zfpy_kwargs(self) -> dict:
        """Keyword arguments of ``zfpy.compress_numpy``/``zfpy._decompress`` for this mode."""
        if self.mode == "rate":
            return {"rate": float(self.rate)}
        if self.mode == "precision":
            return {"precision": int(self.precision)}
        if self.mode == "accuracy":
            return {"tolerance": float(self.tolerance)}
        return {}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["label"] = self.label
        return d


# -- layout -----------------------------------------------------------------------------------
def _padded_shape(rows: int, cols: int, dims: int) -> tuple[int, int]:
    pad4 = lambda n: -(-n // 4) * 4  # noqa: E731
    if dims == 3:
        return rows, pad4(cols)
    if dims == 4:
        return pad4(rows), pad4(cols)
    return rows, cols


def _zfp_shape(rows: int, cols: int, dims: int) -> tuple[int, ...]:
    r, c = _padded_shape(rows, cols, dims)
    return {1: (r * c,), 2: (r, c), 3: (r, c // 4, 4), 4: (r // 4, 4, c // 4, 4)}[dims]


def to_zfp_layout(matrix: np.ndarray, dims: int) -> np.ndarray:
    """The C-contiguous float32 array zfp compresses for a ``(R, C)`` matrix (module docstring)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {matrix.shape}")
    rows, cols = matrix.shape
    pr, pc = _padded_shape(rows, cols, dims)
    if (pr, pc) != (rows, cols):
        matrix = np.pad(matrix, ((0, pr - rows), (0, pc - cols)), mode="edge")
    return np.ascontiguousarray(matrix).reshape(_zfp_shape(rows, cols, dims))


def from_zfp_layout(array: np.ndarray, rows: int, cols: int, dims: int) -> np.ndarray:
    """Inverse of :func:`to_zfp_layout`: the ``(rows, cols)`` matrix, padding cropped."""
    pr, pc = _padded_shape(rows, cols, dims)
    m = np.asarray(array).reshape(pr, pc)
    return m[:rows, :cols] if (pr, pc) != (rows, cols) else m


def compress_matrix(matrix: np.ndarray, config: ZfpConfig) -> bytes:
    """The headerless zfp stream of a float32 ``(R, C)`` matrix in ``config``'s mode and layout."""
    import zfpy

    return zfpy.compress_numpy(to_zfp_layout(matrix, config.dims), write_header=False,
                               **config.zfpy_kwargs())


def decompress_matrix(payload: bytes, rows: int, cols: int, config: ZfpConfig) -> np.ndarray:
    """float32 ``(rows, cols)`` matrix decoded from a stream made by :func:`compress_matrix`."""
    import zfpy

    shape = _zfp_shape(rows, cols, config.dims)
    out = zfpy._decompress(payload, zfpy.type_float, list(shape), **config.zfpy_kwargs())
    return np.ascontiguousarray(from_zfp_layout(out, rows, cols, config.dims))


# -- error statistics -------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorStats:
    rmse: float
    snr_db: float  # 10 log10(sum x^2 / sum (x - y)^2); inf when exact
    max_abs_error: float
    rel_rmse: float  # rmse / rms of the original
    rms: float  # root mean square of the original


def error_stats(original: np.ndarray, restored: np.ndarray, block: int = 1 << 22) -> ErrorStats:
    """RMSE, SNR (dB) and max |error| of ``restored`` against ``original``, summed in float64."""
    a = np.asarray(original).reshape(-1)
    b = np.asarray(restored).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    n = a.size
    sig = err = 0.0
    max_err = 0.0
    for s in range(0, n, block):
        x = a[s:s + block].astype(np.float64)
        d = b[s:s + block].astype(np.float64) - x
        sig += float(np.dot(x, x))
        err += float(np.dot(d, d))
        if d.size:
            max_err = max(max_err, float(np.abs(d).max()))
    rmse = math.sqrt(err / n) if n else 0.0
    rms = math.sqrt(sig / n) if n else 0.0
    if err == 0.0:
        snr = math.inf
    elif sig == 0.0:
        snr = -math.inf
    else:
        snr = 10.0 * math.log10(sig / err)
    return ErrorStats(rmse=rmse, snr_db=snr, max_abs_error=max_err,
                      rel_rmse=rmse / rms if rms > 0 else (0.0 if rmse == 0 else math.inf), rms=rms)


# -- reports ----------------------------------------------------------------------------------
def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


@dataclass
class TensorZfpReport:
    """One compressed tensor: sizes (exact bytes of the zfp stream) and errors of the written values."""

    name: str
    rows: int
    cols: int
    source_type: str
    stored_bytes: int  # size in the source file
    compressed_bytes: int  # exact length of the zfp stream (no header)
    rmse: float
    snr_db: float
    max_abs_error: float
    rel_rmse: float
    rms: float  # root mean square of the source weights
    seconds_compress: float
    seconds_decompress: float

    @property
    def n_params(self) -> int:
        return self.rows * self.cols

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.compressed_bytes / self.n_params if self.n_params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_params"] = self.n_params
        d["bits_per_weight"] = self.bits_per_weight
        d["snr_db"] = _finite_or_none(self.snr_db)  # null: exact (no error)
        return d


@dataclass
class ZfpReport:
    """Sizes, errors and speed of one ZFP compression of a model.

    ``bits_per_weight`` counts the compressed tensors only; ``model_bits_per_weight`` counts
    every tensor, the uncompressed ones (norms, excluded tensors) at their stored size.
    """

    source: str
    output: str | None
    config: ZfpConfig
    tensors: list[TensorZfpReport] = field(default_factory=list)
    n_params_total: int = 0
    source_tensor_bytes: int = 0  # all tensors as stored in the source
    uncompressed_bytes: int = 0  # stored size of the tensors left as they were
    seconds_total: float = 0.0

    @property
    def n_params_compressed(self) -> int:
        return sum(t.n_params for t in self.tensors)

    @property
    def compressed_bytes(self) -> int:
        return sum(t.compressed_bytes for t in self.tensors)

    @property
    def compressed_source_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        n = self.n_params_compressed
        return 8.0 * self.compressed_bytes / n if n else 0.0

    @property
    def model_bytes(self) -> int:
        return self.compressed_bytes + self.uncompressed_bytes

    @property
    def model_bits_per_weight(self) -> float:
        return 8.0 * self.model_bytes / self.n_params_total if self.n_params_total else 0.0

    @property
    def compression_ratio(self) -> float:
        """Stored bytes of the compressed tensors in the source / their compressed bytes."""
        return self.compressed_source_bytes / self.compressed_bytes if self.compressed_bytes else 0.0

    @property
    def rmse(self) -> float:
        """RMSE over all compressed weights together."""
        n = self.n_params_compressed
        return math.sqrt(sum(t.rmse ** 2 * t.n_params for t in self.tensors) / n) if n else 0.0

    @property
    def snr_db(self) -> float:
        """SNR over all compressed weights together: 10 log10(sum x^2 / sum error^2); inf if exact."""
        sig = sum(t.rms ** 2 * t.n_params for t in self.tensors)
        err = sum(t.rmse ** 2 * t.n_params for t in self.tensors)
        return math.inf if err == 0 else (10.0 * math.log10(sig / err) if sig > 0 else -math.inf)

    @property
    def max_abs_error(self) -> float:
        return max((t.max_abs_error for t in self.tensors), default=0.0)

    @property
    def seconds_compress(self) -> float:
        return sum(t.seconds_compress for t in self.tensors)

    @property
    def seconds_decompress(self) -> float:
        return sum(t.seconds_decompress for t in self.tensors)

    @property
    def compress_mb_per_s(self) -> float:
        """float32 input megabytes (1e6) per second of zfp compression time."""
        s = self.seconds_compress
        return 4.0 * self.n_params_compressed / 1e6 / s if s > 0 else 0.0

    @property
    def decompress_mb_per_s(self) -> float:
        s = self.seconds_decompress
        return 4.0 * self.n_params_compressed / 1e6 / s if s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "source": self.source, "output": self.output, "config": self.config.to_dict(),
            "n_params_total": self.n_params_total, "n_params_compressed": self.n_params_compressed,
            "n_tensors_compressed": len(self.tensors),
            "compressed_bytes": self.compressed_bytes, "bits_per_weight": self.bits_per_weight,
            "uncompressed_bytes": self.uncompressed_bytes, "model_bytes": self.model_bytes,
            "model_bits_per_weight": self.model_bits_per_weight,
            "source_tensor_bytes": self.source_tensor_bytes,
            "compression_ratio": self.compression_ratio,
            "rmse": self.rmse, "snr_db": _finite_or_none(self.snr_db), "max_abs_error": self.max_abs_error,
            "seconds_compress": self.seconds_compress, "seconds_decompress": self.seconds_decompress,
            "compress_mb_per_s": self.compress_mb_per_s, "decompress_mb_per_s": self.decompress_mb_per_s,
            "seconds_total": self.seconds_total,
            "tensors": [t.to_dict() for t in self.tensors],
        }


def format_report(report: ZfpReport) -> str:
    """A per-tensor table and the totals, for people."""
    lines = [f"{'tensor':<32} {'type':>5} {'rows x cols':>13} {'bytes':>11} {'bpw':>7} "
             f"{'rmse':>10} {'rel':>9} {'snr dB':>7} {'max err':>10}"]
    for t in report.tensors:
        snr = "exact" if math.isinf(t.snr_db) and t.snr_db > 0 else f"{t.snr_db:.2f}"
        lines.append(f"{t.name:<32} {t.source_type:>5} {f'{t.rows}x{t.cols}':>13} {t.compressed_bytes:>11,} "
                     f"{t.bits_per_weight:>7.3f} {t.rmse:>10.3e} {t.rel_rmse:>9.2e} {snr:>7} "
                     f"{t.max_abs_error:>10.3e}")
    r = report
    lines += [
        "",
        f"config            {r.config.label} (mode {r.config.mode}, dims {r.config.dims})",
        f"compressed        {len(r.tensors)} tensors, {r.n_params_compressed:,} weights: "
        f"{r.compressed_bytes:,} bytes = {r.bits_per_weight:.4f} bits/weight "
        f"(ratio {r.compression_ratio:.2f}x vs stored)",
        f"whole model       {r.n_params_total:,} weights: {r.model_bytes:,} bytes = "
        f"{r.model_bits_per_weight:.4f} bits/weight (uncompressed tensors at stored size; "
        f"source {r.source_tensor_bytes:,} bytes)",
        f"error             rmse {r.rmse:.4e}, snr {r.snr_db:.2f} dB, max |error| {r.max_abs_error:.4e}",
        f"speed             compress {r.seconds_compress:.2f} s ({r.compress_mb_per_s:.0f} MB/s), "
        f"decompress {r.seconds_decompress:.2f} s ({r.decompress_mb_per_s:.0f} MB/s), "
        f"total {r.seconds_total:.2f} s",
    ]
    if r.output:
        lines.append(f"wrote             {r.output}")
    return "\n".join(lines)


# -- tensors of a GGUF ------------------------------------------------------------------------
def _matrix_shape(tensor) -> tuple[int, int]:
    """(R, C) of a reader tensor: C = ne0, R = product of the other ggml dimensions."""
    ne = [int(x) for x in tensor.shape]
    cols = ne[0]
    rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    return rows, cols


def _reader_of(model):
    from ggufopt_ray.gguf.inspect import open_reader

    if isinstance(model, (str, Path)):
        return open_reader(model)
    return model


def select_tensors(model, config: ZfpConfig) -> list[str]:
    """Names of the tensors ``config`` compresses, in file order (``model``: path or GGUFReader)."""
    reader = _reader_of(model)
    inc = [re.compile(p) for p in config.include]
    exc = [re.compile(p) for p in config.exclude]
    names = []
    for t in reader.tensors:
        if len(t.shape) < 2:
            continue
        if inc and not any(p.search(t.name) for p in inc):
            continue
        if any(p.search(t.name) for p in exc):
            continue
        names.append(t.name)
    return names


def _decode_float(tensor) -> np.ndarray:
    """float32 ``(R, C)`` view or copy of an F32/F16/BF16 reader tensor."""
    import gguf

    rows, cols = _matrix_shape(tensor)
    ttype = tensor.tensor_type
    if ttype == gguf.GGMLQuantizationType.F32:
        return np.asarray(tensor.data, dtype=np.float32).reshape(rows, cols)
    if ttype == gguf.GGMLQuantizationType.F16:
        return np.asarray(tensor.data).reshape(rows, cols).astype(np.float32)
    if ttype == gguf.GGMLQuantizationType.BF16:
        raw = np.ascontiguousarray(tensor.data).view(np.uint16).reshape(rows, cols)
        return (raw.astype(np.uint32) << 16).view(np.float32)
    raise AssertionError(f"not a float tensor: {ttype.name}")


def _encode_like(matrix: np.ndarray, tensor) -> np.ndarray:
    """``matrix`` (float32) in the source tensor's storage type and reader array shape."""
    import gguf

    ttype = tensor.tensor_type
    if ttype == gguf.GGMLQuantizationType.F32:
        out = matrix.astype(np.float32, copy=False)
    elif ttype == gguf.GGMLQuantizationType.F16:
        out = matrix.astype(np.float16)
    else:  # BF16, rounded as ggml does
        out = gguf.quants.quantize(np.ascontiguousarray(matrix, dtype=np.float32), ttype)
    return np.ascontiguousarray(out).reshape(tensor.data.shape)


def _check_float_sources(reader, names: Iterable[str]) -> None:
    wanted = set(names)
    bad = [(t.name, t.tensor_type.name) for t in reader.tensors
           if t.name in wanted and t.tensor_type.name not in FLOAT_SOURCE_TYPES]
    if bad:
        shown = ", ".join(f"{n} ({ty})" for n, ty in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"ZFP compresses float weights (F32, F16 or BF16) but {shown} "
                        f"{'is' if len(bad) == 1 else 'are'} quantized; compress the F32/F16 original "
                        "model instead, or leave these tensors out with an exclude regex")


def _copy_metadata(reader, writer, config: ZfpConfig) -> None:
    """Every KV field of the source (except the ones the writer makes itself) plus provenance."""
    import gguf

    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name == PROVENANCE_KEY:
            continue
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub_type)
    writer.add_key_value(PROVENANCE_KEY, json.dumps(config.to_dict(), sort_keys=True),
                         gguf.GGUFValueType.STRING)


def compress_model(model: str | Path, config: ZfpConfig, output: str | Path | None = None, *,
                   progress: bool = False) -> ZfpReport:
    """Compress the selected weights of ``model`` with ZFP; optionally write the decompressed GGUF.

    Returns the report (exact compressed bytes, bits per weight, per-tensor errors, timings).
    With ``output`` the model with decompressed weights is written there atomically (via
    ``OUTPUT.partial``): the same KV metadata (plus ``ggufopt.zfp.config``), the same tensors in
    the same order with the same types; unselected tensors are copied byte for byte.
    """
    import gguf
    from tqdm import tqdm

    config.validate()
    t_start = time.perf_counter()
    model = Path(model)
    reader = _reader_of(model)
    selected = set(select_tensors(reader, config))
    if not selected:
        raise UserError(f"no tensor of {model} is selected for compression (include={list(config.include)}, "
                        f"exclude={list(config.exclude)}); only tensors with 2 or more dimensions qualify")
    _check_float_sources(reader, selected)

    writer = tmp = None
    if output is not None:
        output = Path(output)
        if output.resolve() == model.resolve():
            raise UserError(f"output {output} is the input model; write to another file")
        if not output.parent.exists():
            raise UserError(f"output folder {output.parent} does not exist; create it first")
        tmp = output.with_name(output.name + ".partial")
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        writer = gguf.GGUFWriter(str(tmp), arch, endianess=reader.endianess)
        align = reader.fields.get(gguf.Keys.General.ALIGNMENT)
        if align is not None:
            writer.data_alignment = int(align.contents())
        _copy_metadata(reader, writer, config)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)

    report = ZfpReport(source=str(model), output=str(output) if output is not None else None, config=config)
    bar = None
    try:
        if writer is not None:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        bar = tqdm(total=sum(t.n_elements for t in reader.tensors if t.name in selected), unit="w",
                   unit_scale=True, desc=f"zfp {config.label}",
                   disable=None if progress else True)  # None: only on a terminal
        for t in reader.tensors:
            report.n_params_total += int(t.n_elements)
            report.source_tensor_bytes += int(t.n_bytes)
            if t.name not in selected:
                report.uncompressed_bytes += int(t.n_bytes)
                if writer is not None:
                    writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
                continue
            rows, cols = _matrix_shape(t)
            original = _decode_float(t)
            if config.mode != "reversible" and not np.isfinite(original).all():
                raise UserError(f"tensor {t.name} holds Inf or NaN values, which zfp's lossy modes "
                                "cannot code; use mode reversible or exclude the tensor")
            t0 = time.perf_counter()
            payload = compress_matrix(original, config)
            t1 = time.perf_counter()
            restored = decompress_matrix(payload, rows, cols, config)
            t2 = time.perf_counter()
            stored = _encode_like(restored, t)
            written = _decode_float(t._replace(data=stored)) if t.tensor_type.name != "F32" else stored
            err = error_stats(original, written)
            report.tensors.append(TensorZfpReport(
                name=t.name, rows=rows, cols=cols, source_type=t.tensor_type.name,
                stored_bytes=int(t.n_bytes), compressed_bytes=len(payload), rmse=err.rmse,
                snr_db=err.snr_db, max_abs_error=err.max_abs_error, rel_rmse=err.rel_rmse, rms=err.rms,
                seconds_compress=t1 - t0, seconds_decompress=t2 - t1))
            if writer is not None:
                writer.write_tensor_data(stored, tensor_endianess=reader.endianess)
            bar.update(int(t.n_elements))
        bar.close()
        if writer is not None:
            writer.close()
            tmp.replace(output)
    except BaseException as exc:
        if bar is not None:
            bar.close()
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the disk that failed the write may fail the close too
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and output is not None:
            from ggufopt_ray.store.chunkdir import write_failed

            raise write_failed(output, exc) from None
        raise
    report.seconds_total = time.perf_counter() - t_start
    return report
