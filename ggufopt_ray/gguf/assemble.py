"""Per-tensor mixes assembled from files quantized once per type, byte-identical to llama-quantize.

A sweep over per-tensor mixes (``--tensor-type PATTERN=TYPE`` lists) would otherwise quantize the
whole model once per candidate. But llama.cpp quantizes every tensor on its own: a tensor's bytes
depend only on its float data, its target ggml type and its importance-matrix row (each row, each
block, is quantized independently; the thread count and chunking do not change them; the file type
only decides *which* type a tensor gets). So the model is quantized once per ggml type — a
*source* file in which every quantizable tensor has that type — and any mix is then a copy of each
tensor's bytes from the source of the type it gets, under a header written exactly as llama.cpp's
quantizer writes it. Building a mix then costs I/O, not quantization.

What makes this exact rather than approximate:

- **Which type each tensor gets** (the plan) comes from llama.cpp itself, a dry run of the base type
  with the same overrides (:func:`mix_plan`), not from "base type unless a pattern matches". The
  base type's rules count tensors as they go (``i_attention_wv``, ``i_ffn_down``) and a tensor taken
  by an override is not counted, so overriding ``blk.0``'s ffn_down moves the *other* layers' ffn_down
  types under Q4_K_M/Q5_K_M/Q3_K_M. Shape fallbacks (Q4_K on a row that is not a multiple of 256 ->
  Q5_0) and the imatrix-dependent rules (IQ4_XS's first ffn_down layers) come along too.
- **Sources** (:func:`ensure_sources`) are quantized with the override ``.*=TYPE`` on a Q8_0 base:
  every quantizable tensor takes TYPE (tensors it cannot fit get their fallback, which a plan never
  asks of that source). ``--pure`` gives the same bytes (tested) but needs a file type whose base
  type is TYPE, which Q5_1, Q4_0-as-override, F16... do not all have. A source is made with the
  same imatrix as the mix, since the imatrix changes the bytes of almost every type. ggml aborts
  the process on IQ2_XXS/IQ2_XS/IQ1_S without importance data, so those sources leave the tensors
  without data (token_embd, usually output) at Q8_0, and mixes that would abort are refused.
  Source names hold everything that decides their bytes (model fingerprint, type, imatrix hash,
  overrides), so an existing one is reused as it is.
- **The header** follows ``llama_model_quantize_impl``/``gguf_write_out``: the input's key-value
  pairs in order, then ``general.quantization_version`` and ``general.file_type`` re-set (removed and
  appended), the ``split.*`` keys dropped, then the KV overrides llama-quantize adds (the
  ``quantize.imatrix.*`` keys); tensors in the loader's order (layer number, then name); ``n_dims``
  without trailing 1s; every tensor padded to 32 bytes.

The pure I/O part (:func:`assemble_mix`) reads and writes GGUF only (headers cached per file, data
copied with ``copy_file_range``); the helpers that ask llama.cpp for a plan or make sources import
the engine lazily.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ggufopt_ray.errors import UserError

ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: llama-quant pads with it whatever the input declares
GGUF_VERSION = 3
SOURCE_FILE_TYPE = "Q8_0"  # any quantized file type: `.*=TYPE` overrides every quantizable tensor
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
# ggml types llama.cpp will not quantize a tensor to without importance data (token_embd/output exempt)
_IMATRIX_TYPES = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}
_EXEMPT_PATTERN = r"^(token_embd|per_layer_token_embd|output)\.weight$"
# ...and those ggml cannot quantize at all without importance data (GGML_ASSERT in ggml-quants.c)
_NEEDS_WEIGHTS = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}
_BLK = re.compile(r"^blk\.\s*([+-]?\d+)")
_COPY_CHUNK = 64 << 20

# GGUF value type ids (gguf.GGUFValueType)
_T_UINT32, _T_FLOAT32, _T_BOOL, _T_STRING = 4, 6, 7, 8


# -- llama.cpp's conventions -------------------------------------------------------------------------
def llama_tensor_order(names: Sequence[str]) -> list[str]:
    """Tensor names in the order llama.cpp's model loader (and so llama-quantize) writes them.

    ``weights_map`` is a ``std::map`` ordered by the layer number ``sscanf("blk.%d.")`` finds (-1
    when none, so global tensors come first), then by the name's bytes.
    """
    def key(name: str):
        m = _BLK.match(name)
        return (int(m.group(1)) if m else -1, name.encode())

    return sorted(names, key=key)


def ggml_n_dims(shape: Sequence[int]) -> int:
    """``ggml_n_dims``: dimensions up to the last one larger than 1 (at least 1), as GGUF writes them."""
    n = 1
    for i, d in enumerate(shape):
        if int(d) > 1:
            n = i + 1
    return n


def _gguf_str(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def _override_bytes(text) -> bytes:
    """A KV-override key or string as llama.cpp holds it: ``char[128]``, so at most 127 bytes."""
    return (text if isinstance(text, bytes) else str(text).encode())[:127]


def encode_kv_override(key: str, value) -> tuple[str, bytes]:
    """One llama-quantize KV override as GGUF bytes: int -> u32 of |value|, bool, float -> f32, str."""
    k = _override_bytes(key)
    if isinstance(value, bool):
        body = struct.pack("<I", _T_BOOL) + struct.pack("<B", int(value))
    elif isinstance(value, int):
        body = struct.pack("<I", _T_UINT32) + struct.pack("<I", abs(value) & 0xFFFFFFFF)
    elif isinstance(value, float):
        body = struct.pack("<I", _T_FLOAT32) + struct.pack("<f", value)
    elif isinstance(value, (str, bytes)):
        body = struct.pack("<I", _T_STRING) + _gguf_str(_override_bytes(value))
    else:
        raise UserError(f"metadata value for {key!r} must be int, bool, float or str, not {type(value).__name__}")
    return k.decode(errors="replace"), _gguf_str(k) + body


def binary_imatrix_kv(imatrix, file_label: str) -> list[tuple[str, object]]:
    """The ``quantize.imatrix.*`` keys llama-quantize adds for ``--imatrix FILE_LABEL``, in its order.

    ``file`` is the path exactly as given on the command line; ``dataset`` only when the imatrix
    names one; ``chunks_count`` only when positive.
    """
    kv: list[tuple[str, object]] = [("quantize.imatrix.file", str(file_label))]
    if imatrix.datasets:
        kv.append(("quantize.imatrix.dataset", imatrix.datasets[0]))
    kv.append(("quantize.imatrix.entries_count", len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        kv.append(("quantize.imatrix.chunks_count", int(imatrix.chunk_count)))
    return kv


def binary_patterns(overrides) -> list[str]:
    """``PATTERN=TYPE`` strings as llama-quantize's ``--tensor-type`` parses them (pattern lower-cased)."""
    from ggufopt_ray.engine.quantize import parse_tensor_overrides

    return [f"{pattern.lower()}={qtype}" for pattern, qtype in parse_tensor_overrides(list(overrides))]


def llama_quantize_command(model, out, base_type: str, overrides=(), imatrix_file=None,
                           binary: str = "llama-quantize") -> str:
    """The llama-quantize command line that writes the same file as the assembled mix."""
    argv = [binary]
    if imatrix_file is not None:
        argv += ["--imatrix", str(imatrix_file)]
    for o in overrides:
        argv += ["--tensor-type", str(o)]
    argv += [str(model), str(out), base_type]
    return shlex.join(argv)


# -- reading the inputs --------------------------------------------------------------------------------
@dataclass
class _TensorRef:
    name: str
    shape: list[int]  # ggml order, ne[0] = row length
    type_name: str  # upper-case ggml type
    type_id: int
    offset: int  # absolute file offset of the data
    nbytes: int


def _read_tensors(path: Path) -> tuple[object, dict[str, _TensorRef]]:
    """The header of ``path`` and its tensors by name; cached per (path, size, mtime), since a sweep
    assembles many mixes from the same model and sources and a big vocabulary makes headers slow."""
    st = Path(path).stat()
    return _read_tensors_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_tensors_cached(path: str, size: int, mtime_ns: int) -> tuple[object, dict[str, _TensorRef]]:
    from ggufopt_ray.gguf.inspect import open_reader

    reader = open_reader(path)
    if reader.byte_order != "I":
        raise UserError(f"{path} is a big-endian GGUF; assemble works on little-endian files only")
    refs = {}
    for t in reader.tensors:
        refs[t.name] = _TensorRef(t.name, [int(d) for d in t.shape], t.tensor_type.name.upper(),
                                  int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
    return reader, refs


def _model_kv(reader) -> list[tuple[str, bytes]]:
    """The input's key-value pairs in file order, each as its GGUF bytes (key, type, value)."""
    out = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields for the header
            continue
        out.append((key, b"".join(p.tobytes() for p in f.parts)))
    return out


def _output_kv(reader, file_type: int, extra_kv) -> list[tuple[str, bytes]]:
    """The KV list llama_model_quantize writes: each ``gguf_set_val_*`` removes the key, then appends it."""
    kv = _model_kv(reader)

    def set_(key: str, raw: bytes) -> None:
        kv[:] = [(k, r) for k, r in kv if k != key] + [(key, raw)]

    set_(*encode_kv_override("general.quantization_version", _quant_version()))
    set_(*encode_kv_override("general.file_type", int(file_type)))
    kv[:] = [(k, r) for k, r in kv if k not in _SPLIT_KEYS]
    for key, value in extra_kv:
        set_(*encode_kv_override(key, value))
    return kv


def _quant_version() -> int:
    import gguf

    return int(gguf.GGML_QUANT_VERSION)


# -- assembling ---------------------------------------------------------------------------------------
@dataclass
class AssembledFile:
    """What :func:`assemble_mix` wrote."""

    path: str
    size_bytes: int
    tensor_bytes: int
    n_params: int
    seconds: float
    tensor_types: dict[str, str]
    bytes_from: dict[str, int]  # source file -> bytes copied from it

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_params if self.n_params else 0.0


def _check_output(out) -> Path:
    """The output path, refused in one line unless it is a .gguf in an existing folder."""
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"output path {out} must end in .gguf")
    if not out.parent.is_dir():
        raise UserError(f"output folder {out.parent} does not exist; create it first")
    return out


def assemble_mix(model: str | Path, out: str | Path, tensor_types: Mapping[str, str],
                 sources: Mapping[str, str | Path], *, file_type: int,
                 extra_kv: Sequence[tuple[str, object]] = ()) -> AssembledFile:
    """Write ``out``: the model with each tensor's bytes taken from the source of its type.

    ``tensor_types`` maps every tensor of ``model`` to the ggml type it gets (a plan from
    :func:`mix_plan`); ``sources`` maps ggml type names to files in which those tensors already
    have that type (from :func:`ensure_sources`); a tensor whose planned type is the model's own
    is copied from the model, as llama.cpp copies it. ``file_type`` is the ``llama_ftype`` value
    written to ``general.file_type``; ``extra_kv`` are the KV overrides (``quantize.imatrix.*``)
    appended as llama-quantize appends them. Written to ``OUT.partial`` and renamed.
    """
    from ggufopt_ray.gguf.inspect import check_gguf_file

    t0 = time.perf_counter()
    model = check_gguf_file(model)
    out = _check_output(out)
    reader, base = _read_tensors(model)
    if int(reader.alignment) != ALIGNMENT:
        raise UserError(f"{model} declares general.alignment={reader.alignment}; llama-quantize writes "
                        f"{ALIGNMENT}-byte alignment regardless, so assemble refuses such inputs")
    plan = {n: str(t).upper() for n, t in tensor_types.items()}
    missing = [n for n in base if n not in plan]
    unknown = [n for n in plan if n not in base]
    if missing or unknown:
        raise UserError(f"the plan does not match {model.name}: "
                        + (f"{len(missing)} tensors have no type (e.g. {missing[0]})" if missing else
                           f"{len(unknown)} tensors are not in the model (e.g. {unknown[0]})")
                        + "; make the plan on this model (mix_plan)")
    src_paths = {str(t).upper(): Path(p) for t, p in sources.items()}
    if out.resolve() in {p.resolve() for p in [model, *src_paths.values()]}:
        raise UserError(f"output {out} would overwrite an input (the model or a source); pick another name")

    order = llama_tensor_order(list(base))
    opened: dict[str, dict[str, _TensorRef]] = {}
    chosen: list[tuple[Path, _TensorRef]] = []
    for name in order:
        want = plan[name]
        if want == base[name].type_name:
            chosen.append((model, base[name]))
            continue
        if want not in src_paths:
            raise UserError(f"no source file for type {want} (needed by {name}); make sources for every "
                            f"type in the plan (ensure_sources) or pass one for {want}")
        if want not in opened:
            src_reader, refs = _read_tensors(check_gguf_file(src_paths[want]))
            src_order = [t.name for t in src_reader.tensors]
            if sorted(src_order) != sorted(order):
                raise UserError(f"source {src_paths[want]} has other tensors than {model.name}; "
                                "it was made from another model - rebuild the sources")
            if src_order != order:
                raise RuntimeError(f"llama.cpp wrote {src_paths[want].name} in another tensor order than "
                                   "llama_tensor_order computes; the loader's ordering rule changed")
            opened[want] = refs
        ref = opened[want][name]
        if ref.type_name != want or ref.shape != base[name].shape:
            raise UserError(f"source {src_paths[want].name} holds {name} as {ref.type_name} {ref.shape}, "
                            f"not {want} {base[name].shape}; rebuild the source for {want}")
        chosen.append((src_paths[want], ref))

    # header: magic, version, counts, KV pairs, tensor infos, padding
    kv = _output_kv(reader, file_type, extra_kv)
    head = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(chosen), len(kv))]
    head += [raw for _, raw in kv]
    offset = 0
    for path, ref in chosen:
        n_dims = ggml_n_dims(ref.shape)
        head.append(_gguf_str(ref.name.encode()) + struct.pack("<I", n_dims)
                    + struct.pack(f"<{n_dims}Q", *ref.shape[:n_dims]) + struct.pack("<IQ", ref.type_id, offset))
        offset += _pad(ref.nbytes)
    header = b"".join(head)
    header += b"\0" * (_pad(len(header)) - len(header))

    tmp = out.with_name(out.name + ".partial")
    bytes_from: dict[str, int] = {}
    try:
        with open(tmp, "wb") as dst:
            dst.write(header)
            dst.flush()
            handles: dict[Path, int] = {}
            try:
                for path, ref in chosen:
                    if path not in handles:
                        handles[path] = os.open(path, os.O_RDONLY)
                    _copy_range(handles[path], ref.offset, dst.fileno(), ref.nbytes)
                    pad = _pad(ref.nbytes) - ref.nbytes
                    if pad:
                        os.write(dst.fileno(), b"\0" * pad)
                    bytes_from[str(path)] = bytes_from.get(str(path), 0) + ref.nbytes
            finally:
                for fd in handles.values():
                    os.close(fd)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    if size != len(header) + offset:
        raise RuntimeError(f"{out} is {size} bytes, expected {len(header) + offset}")
    return AssembledFile(
        path=str(out), size_bytes=size, tensor_bytes=sum(r.nbytes for _, r in chosen),
        n_params=sum(_n_elements(r.shape) for _, r in chosen), seconds=time.perf_counter() - t0,
        tensor_types={r.name: r.type_name for _, r in chosen}, bytes_from=bytes_from)


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _n_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, n: int) -> None:
    """Append ``n`` bytes of ``src_fd`` from ``src_offset`` to ``dst_fd``, in the kernel when it can."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < n:
        want = min(_COPY_CHUNK, n - done)
        got = 0
        if use_kernel:
            try:
                got = os.copy_file_range(src_fd, dst_fd, want, src_offset + done)
            except OSError:
                use_kernel = False  # e.g. across file systems on old kernels: fall back to read/write
        if not use_kernel:
            data = os.pread(src_fd, want, src_offset + done)
            got = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst_fd, view):]
        if got <= 0:
            raise RuntimeError(f"source ended early: copied {done} of {n} bytes")
        done += got


# -- plans and sources (llama.cpp through the engine) ------------------------------------------------
def mix_plan(model: str | Path, base_type: str, overrides=(), *, imatrix=None) -> dict[str, str]:
    """Each tensor's ggml type for ``llama-quantize --tensor-type O... MODEL OUT BASE_TYPE``.

    One dry run of llama.cpp's quantizer (metadata only, no tensor data read) with the overrides
    as llama-quantize parses them, so the base type's counting rules, shape fallbacks and
    imatrix-dependent choices are llama.cpp's own.
    """
    from ggufopt_ray.engine.quantize import quantize_model

    plan = quantize_model(model, base_type, dry_run=True, threads=1, tensor_types=binary_patterns(overrides),
                          imatrix=imatrix)
    return dict(plan.tensor_types)


def source_path(sources_dir: str | Path, model: str | Path, qtype: str, imatrix_hash: str | None,
                model_fp: str, overrides: Sequence[str]) -> Path:
    """Where the source of ggml type ``qtype`` lives, named by everything that decides its bytes:
    the model's fingerprint, the type, the imatrix hash and the overrides that made it."""
    how = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    stem = Path(model).stem
    return Path(sources_dir) / f"{stem}-{model_fp[:12]}-src-{qtype.upper()}-{imatrix_hash or 'noimx'}-{how}.gguf"


def source_overrides(qtype: str, shapes: Mapping[str, Sequence[int]], imatrix=None) -> list[str]:
    """The overrides that give every quantizable tensor ``qtype`` on a :data:`SOURCE_FILE_TYPE` base.

    Two llama.cpp limits shape them. IQ1/IQ2/IQ3_XXS types are refused without an imatrix except on
    token_embd/output, so without one the source covers only those. And ggml *aborts the process*
    when IQ2_XXS, IQ2_XS or IQ1_S meet a tensor that has no importance data (token_embd never has
    any, output only with --process-output): those tensors are sent to Q8_0 first (the first
    matching override wins), since no mix llama-quantize can write gives them that type.
    """
    qtype = qtype.upper()
    if qtype in _IMATRIX_TYPES and imatrix is None:
        if qtype in _NEEDS_WEIGHTS:
            raise UserError(f"{qtype} needs an importance matrix for every tensor it quantizes (ggml aborts "
                            "without one); pass --imatrix")
        return [f"{_EXEMPT_PATTERN}={qtype}"]
    if qtype in _NEEDS_WEIGHTS:
        bare = [n for n in _without_importance(shapes, imatrix) if ggml_n_dims(shapes[n]) >= 2]
        if bare:
            return [f"^({'|'.join(re.escape(n) for n in bare)})$={SOURCE_FILE_TYPE}", f".*={qtype}"]
    return [f".*={qtype}"]


def _without_importance(shapes: Mapping[str, Sequence[int]], imatrix) -> list[str]:
    """Tensors llama.cpp would quantize with no importance row: absent, or of the wrong size."""
    have = set()
    if imatrix is not None:
        for name, e in imatrix.entries.items():
            ne = list(shapes.get(name, [])) + [1, 1, 1]
            if name in shapes and e.size == ne[0] * ne[2]:
                have.add(name)
    return [n for n in shapes if n not in have]


def ensure_sources(model: str | Path, types, sources_dir: str | Path, *, imatrix=None, threads: int | None = None,
                   progress: bool = False) -> tuple[dict[str, Path], float]:
    """Make (or find) one source file per ggml type in ``types``; return {type: path} and seconds spent.

    ``imatrix`` is an Imatrix or the path of one; every source is quantized with it, because it
    changes the bytes. A source that exists is reused without being read: its name holds everything
    that decides its bytes (and :func:`assemble_mix` checks each tensor's type and shape).
    """
    from ggufopt_ray.engine.quantize import _load_imatrix_arg, quantize_model, resolve_tensor_type
    from ggufopt_ray.gguf.inspect import model_fingerprint

    folder = Path(sources_dir)
    folder.mkdir(parents=True, exist_ok=True)
    im, _ = _load_imatrix_arg(imatrix)
    im_hash = im.hash() if im is not None else None
    fp = model_fingerprint(model)
    _, refs = _read_tensors(Path(model))
    shapes = {n: r.shape for n, r in refs.items()}
    wanted = sorted({resolve_tensor_type(t)[0] for t in types})
    out: dict[str, Path] = {}
    spent = 0.0
    bar = None
    if progress and wanted:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(wanted), desc="sources", unit="type", file=sys.stderr)
    try:
        for qtype in wanted:
            overrides = source_overrides(qtype, shapes, im)
            path = source_path(folder, model, qtype, im_hash, fp, overrides)
            if not path.exists():  # the name is content-addressed: an existing file is the same source
                res = quantize_model(model, SOURCE_FILE_TYPE, path, tensor_types=overrides, imatrix=im,
                                     threads=threads, overwrite=True)
                spent += res.seconds
            out[qtype] = path
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out, spent


# -- one call: plan, sources, assembly ------------------------------------------------------------------
@dataclass
class MixResult:
    """A mix built by :func:`build_mix`, with the command line that reproduces it."""

    path: str
    base_type: str
    overrides: list[str]
    size_bytes: int
    bits_per_weight: float
    assemble_seconds: float  # header + copying bytes
    plan_seconds: float  # the dry run
    source_seconds: float  # quantizing sources that were missing (0 when all were cached)
    command: str
    sources: dict[str, str] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def build_mix(model: str | Path, out: str | Path, base_type: str, overrides=(), *, imatrix=None,
              sources_dir: str | Path | None = None, threads: int | None = None,
              progress: bool = False) -> MixResult:
    """Write the file ``llama-quantize [--imatrix IMATRIX] --tensor-type O... MODEL OUT BASE_TYPE`` writes.

    ``overrides`` are ``PATTERN=TYPE`` strings (patterns lower-cased, as llama-quantize does);
    ``imatrix`` a path (its text goes into ``quantize.imatrix.file`` as llama-quantize writes the
    argument) or an Imatrix (then ``ggufopt:HASH``). Sources are kept in ``sources_dir``
    (default: ``ggufopt-sources`` beside ``out``) and reused by later mixes.
    """
    from ggufopt_ray.engine.imatrix import Imatrix
    from ggufopt_ray.engine.quantize import _load_imatrix_arg, resolve_file_type
    from ggufopt_ray.gguf.inspect import check_gguf_file

    model = check_gguf_file(model)
    out = _check_output(out)
    base_name, ftype = resolve_file_type(base_type)
    patterns = binary_patterns(overrides)
    im, _ = _load_imatrix_arg(imatrix)
    t0 = time.perf_counter()
    plan = mix_plan(model, base_name, patterns, imatrix=im)
    plan_seconds = time.perf_counter() - t0

    extra_kv: list[tuple[str, object]] = []
    label = None
    if im is not None:
        label = f"ggufopt:{im.hash()}" if isinstance(imatrix, Imatrix) else str(imatrix)
        extra_kv = binary_imatrix_kv(im, label)
    _, base_refs = _read_tensors(model)
    shapes = {n: r.shape for n, r in base_refs.items()}
    bare = set(_without_importance(shapes, im))
    doomed = [n for n, t in plan.items() if t in _NEEDS_WEIGHTS and n in bare and t != base_refs[n].type_name]
    if doomed:
        raise UserError(f"{plan[doomed[0]]} for {doomed[0]} needs importance data that "
                        + ("no imatrix was given for" if im is None else "the imatrix lacks")
                        + " (llama-quantize would abort); give that tensor another type")
    needed = sorted({t for n, t in plan.items() if t != base_refs[n].type_name})
    folder = Path(sources_dir) if sources_dir is not None else out.parent / "ggufopt-sources"
    sources, source_seconds = ensure_sources(model, needed, folder, imatrix=im, threads=threads, progress=progress)
    done = assemble_mix(model, out, plan, sources, file_type=ftype, extra_kv=extra_kv)
    return MixResult(
        path=done.path, base_type=base_name, overrides=patterns, size_bytes=done.size_bytes,
        bits_per_weight=done.bits_per_weight, assemble_seconds=done.seconds, plan_seconds=plan_seconds,
        source_seconds=source_seconds,
        # an in-memory Imatrix has no file: the command names where to save it (Imatrix.save)
        command=llama_quantize_command(model, out, base_name, patterns,
                                       label if not isinstance(imatrix, Imatrix) else f"imatrix-{im.hash()}.gguf"),
        sources={t: str(p) for t, p in sources.items()}, tensor_types=dict(plan))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 16 MiB pieces (for checking a mix against llama-quantize's file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["AssembledFile", "MixResult", "assemble_mix", "build_mix", "mix_plan", "ensure_sources",
           "source_path", "source_overrides", "llama_tensor_order", "ggml_n_dims", "binary_imatrix_kv",
           "binary_patterns", "encode_kv_override", "llama_quantize_command", "file_sha256"]
