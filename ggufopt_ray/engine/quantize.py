"""Quantize a GGUF model in process with llama.cpp's own quantizer (``llama_model_quantize``).

One call can produce several types; each output is ``{name}-{TYPE}.gguf``, written to
``NAME.partial`` and renamed when complete, so an interrupted run never leaves a half file that
looks finished. Outputs that already exist are skipped (unless ``overwrite``); each output carries
the hash of the recipe that made it (``ggufopt.quantize.recipe``), and an existing file with a
different recipe is an error rather than a silent stale result.

Before every real quantization a dry run (``params.dry_run``, metadata only, no tensor data read)
asks llama.cpp which type each tensor will get — its mixture rules, the user's overrides and its
shape fallbacks. That plan lets this module refuse bad input with a one-line message before any
work (an IQ1/IQ2-class type without an importance matrix, an imatrix made for another model) and
predict the exact output size. llama.cpp's dry run only *logs* its result (tensor bytes, in MiB
with two decimals, no header); the exact file size here is computed from ggml's row sizes and the
GGUF metadata llama.cpp will write, and checked against the logged figure.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ggufopt_ray.errors import UserError

RECIPE_KEY = "ggufopt.quantize.recipe"
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize accepts
# ggml types whose tensors llama.cpp refuses to quantize without an importance matrix
_IMATRIX_TYPES = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}
_DTYPE_SUFFIX = re.compile(r"[-_.](f32|f16|bf16|fp16|fp32)$", re.IGNORECASE)
_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type\s*=\s*(\S+),\s*size\s*=\s*(.*)$")
_QUANT_SIZE = re.compile(r"quant size\s*=\s*([0-9.]+)\s*MiB")
_FAILED = re.compile(r"failed to quantize:\s*(.*)")


# -- type names ---------------------------------------------------------------------------------------
def file_types() -> dict[str, int]:
    """Every llama.cpp file type (``Q4_K_M``, ``IQ2_XS``, ``F16``...) -> its ``llama_ftype`` value.

    Derived from the binding's ``LLAMA_FTYPE_*`` constants, so a newer llama-cpp-python brings its
    new types along.
    """
    from ggufopt_ray.engine import native

    lib = native.llama()
    out = {}
    for attr in dir(lib):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            out[attr[len("LLAMA_FTYPE_MOSTLY_"):]] = int(getattr(lib, attr))
        elif attr == "LLAMA_FTYPE_ALL_F32":
            out["F32"] = int(lib.LLAMA_FTYPE_ALL_F32)
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def resolve_file_type(name: str) -> tuple[str, int]:
    """``"q4_k_m"`` -> ``("Q4_K_M", 15)``; unknown names raise a UserError listing the valid ones."""
    types = file_types()
    key = str(name).strip().upper()
    key = _ALIASES.get(key, key)
    if key not in types:
        raise UserError(f"unknown quantization type {name!r}; valid types: {', '.join(types)}")
    return key, types[key]


def resolve_tensor_type(name: str, what: str = "tensor type") -> tuple[str, int]:
    """A ggml storage type by name (``q8_0``, ``Q6_K``, ``f16``) -> (upper-case name, ggml id)."""
    from ggufopt_ray.engine import ggml

    types = ggml.weight_types()
    key = str(name).strip().upper()
    if key not in types:
        raise UserError(f"unknown {what} {name!r}; valid ggml types: {', '.join(types)}")
    return key, types[key]


def parse_tensor_overrides(overrides) -> list[tuple[str, str]]:
    """``["attn_v=q8_0", ...]``, ``{"attn_v": "q8_0"}`` or ``[("attn_v", "q8_0")]`` -> [(regex, TYPE)].

    Patterns are regular expressions searched in tensor names (``std::regex_search``); for each
    tensor the first matching pattern wins, as in llama.cpp. Overrides apply when the file type
    is a quantized one (not F32/F16/BF16).
    """
    if not overrides:
        return []
    items: Iterable
    if isinstance(overrides, Mapping):
        items = overrides.items()
    elif isinstance(overrides, str):
        items = [overrides]
    else:
        items = overrides
    out = []
    for item in items:
        if isinstance(item, str):
            pattern, sep, tname = item.rpartition("=")
            if not sep or not pattern or not tname:
                raise UserError(f"tensor type override {item!r} must look like REGEX=TYPE, e.g. 'attn_v=q8_0'")
        else:
            pattern, tname = item
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"tensor type override pattern {pattern!r} is not a valid regular expression ({exc})")
        tname, _ = resolve_tensor_type(tname, "override type")
        out.append((str(pattern), tname))
    return out


def output_name(model_path: str | Path, qtype: str, name: str | None = None) -> str:
    """``{name}-{TYPE}.gguf``; ``name`` defaults to the model's file stem without a -f32/-f16 suffix."""
    if not name:
        name = _DTYPE_SUFFIX.sub("", Path(model_path).stem) or Path(model_path).stem
    return f"{name}-{resolve_file_type(qtype)[0]}.gguf"


# -- results ------------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    """One output: where, which type, how big, how long it took, whether it was skipped."""

    path: str | None
    type: str
    size_bytes: int
    bits_per_weight: float
    seconds: float
    skipped: bool = False
    dry_run: bool = False
    recipe: str = ""
    imatrix_hash: str | None = None
    tensor_bytes: int = 0
    n_params: int = 0
    tensor_types: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def type_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for t in self.tensor_types.values():
            hist[t] = hist.get(t, 0) + 1
        return dict(sorted(hist.items()))


@dataclass
class _Plan:
    """What a dry run says one output will be."""

    tensor_types: dict[str, str]  # tensor name -> upper-case ggml type
    tensor_bytes: int
    n_params: int
    file_size: int


# -- the model's tensor table and metadata -------------------------------------------------------------
@dataclass
class _ModelTable:
    shapes: dict[str, list[int]]  # ggml order, ne[0] = row length
    types: dict[str, str]  # upper-case ggml type of each input tensor
    n_params: int
    meta_end: int  # bytes of header + KV + tensor infos, before padding
    kv_sizes: dict[str, int]  # encoded bytes of each KV pair
    alignment: int

    @classmethod
    def read(cls, path: Path) -> "_ModelTable":
        from ggufopt_ray.gguf.inspect import open_reader

        reader = open_reader(path)
        shapes, types, n_params, meta_end = {}, {}, 0, 0
        for t in reader.tensors:
            shapes[t.name] = [int(d) for d in t.shape]
            types[t.name] = t.tensor_type.name.upper()
            n_params += int(t.n_elements)
            meta_end = max(meta_end, int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts))
        kv_sizes = {k: sum(int(p.nbytes) for p in f.parts) for k, f in reader.fields.items()
                    if not k.startswith("GGUF.")}
        if not reader.tensors:
            raise UserError(f"{path} has no tensors: nothing to quantize")
        return cls(shapes, types, n_params, meta_end, kv_sizes, int(reader.alignment))


def _kv_bytes(text) -> bytes:
    """A KV-override key or string value as llama.cpp stores it: at most 127 bytes."""
    return str(text).encode()[:127]


def _kv_u32_size(key: str) -> int:
    return 8 + len(_kv_bytes(key)) + 4 + 4


def _kv_str_size(key: str, value) -> int:
    return 8 + len(_kv_bytes(key)) + 4 + 8 + len(_kv_bytes(value))


# -- the core ---------------------------------------------------------------------------------------
class _NativeParams:
    """A ``llama_model_quantize_params`` plus the C arrays it points to, kept alive together."""

    def __init__(self, ftype: int, threads: int, *, imatrix_data: dict | None, overrides: list[tuple[str, int]],
                 output_type: int | None, embd_type: int | None, pure: bool, allow_requantize: bool,
                 kv: list[tuple[str, object]], dry_run: bool):
        from ggufopt_ray.engine import native

        lib = native.llama()
        p = lib.llama_model_quantize_default_params()
        p.ftype = ftype
        p.nthread = threads
        p.pure = bool(pure)
        p.allow_requantize = bool(allow_requantize)
        p.dry_run = bool(dry_run)
        if output_type is not None:
            p.output_tensor_type = output_type
        if embd_type is not None:
            p.token_embedding_type = embd_type
        self._keep: list = []
        if imatrix_data:
            arr = (lib.llama_model_imatrix_data * (len(imatrix_data) + 1))()
            for i, (name, values) in enumerate(imatrix_data.items()):
                buf = (ctypes.c_float * values.size).from_buffer(values)
                self._keep += [values, buf]
                arr[i].name = name.encode()
                arr[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
                arr[i].size = values.size
            arr[len(imatrix_data)].name = None  # NULL terminator
            self._keep.append(arr)
            p.imatrix = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))
        if overrides:
            arr = (lib.llama_model_tensor_override * (len(overrides) + 1))()
            for i, (pattern, type_id) in enumerate(overrides):
                arr[i].pattern = pattern.encode()
                arr[i].type = type_id
            arr[len(overrides)].pattern = None
            self._keep.append(arr)
            p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_tensor_override))
        if kv:
            arr = (lib.llama_model_kv_override * (len(kv) + 1))()
            for i, (key, value) in enumerate(kv):
                arr[i].key = _kv_bytes(key)
                if isinstance(value, int):
                    arr[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_INT
                    arr[i].value.val_i64 = value
                else:
                    arr[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_STR
                    arr[i].value.val_str = _kv_bytes(value)
            arr[len(kv)].key = b""  # terminator: empty key
            self._keep.append(arr)
            p.kv_overrides = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_kv_override))
        self.params = p

    def run(self, inp: Path, out: Path | None) -> list[str]:
        """Call llama_model_quantize; return llama.cpp's log lines; raise on failure."""
        from ggufopt_ray.engine import native
        from ggufopt_ray.engine.native import capture_log, log_lines

        lib = native.llama()
        target = str(out) if out is not None else str(inp) + ".dry-run-never-written"
        with capture_log() as fragments:
            rc = lib.llama_model_quantize(str(inp).encode(), target.encode(), ctypes.byref(self.params))
        lines = log_lines(fragments)
        if rc != 0:
            reason = next((m.group(1).strip() for m in map(_FAILED.search, lines) if m), "no reason logged")
            if any(s in reason for s in ("requires an imatrix", "importance matrix", "requantizing",
                                         "imatrix size", "invalid output file type", "regex")):
                hint = " (pass allow_requantize / --allow-requantize)" if "requantizing" in reason else ""
                raise UserError(f"llama.cpp refused to quantize {inp.name}: {reason}{hint}")
            raise RuntimeError(f"llama_model_quantize failed on {inp}: {reason}")
        return lines


def _parse_dry_run(lines: list[str], table: _ModelTable) -> tuple[dict[str, str], float | None]:
    """Per-tensor target types (upper case) from a dry run's log, and its logged quant size in MiB."""
    types: dict[str, str] = {}
    for line in lines:
        m = _DRY_LINE.match(line.strip())
        if not m:
            continue
        name, cur, rest = m.group(1), m.group(3), m.group(4)
        new = re.search(r"\((\w+)\)\s*$", rest) if "->" in rest else None
        types[name] = (new.group(1) if new else cur).upper()
    mib = None
    for line in lines:
        m = _QUANT_SIZE.search(line)
        if m:
            mib = float(m.group(1))
    missing = set(table.shapes) - set(types)
    if missing:
        raise RuntimeError(f"could not read llama.cpp's dry-run plan for {len(missing)} tensors "
                           f"(e.g. {sorted(missing)[0]}); the log format changed?")
    return types, mib


def _plan(params: _NativeParams, model: Path, table: _ModelTable, extra_kv: list[tuple[str, object]]) -> _Plan:
    from ggufopt_ray.engine import ggml

    params.params.dry_run = True
    try:
        lines = params.run(model, None)
    finally:
        params.params.dry_run = False
    types, logged_mib = _parse_dry_run(lines, table)
    tensor_bytes = 0
    data_bytes = 0
    align = 32  # llama-quant pads every tensor to GGUF_DEFAULT_ALIGNMENT
    for name, ne in table.shapes.items():
        type_id = ggml.type_id_from_name(types[name])
        if type_id is None:
            raise RuntimeError(f"dry run chose type {types[name]} for {name}, unknown to ggml here")
        n = ggml.tensor_nbytes(type_id, ne)
        tensor_bytes += n
        data_bytes += -(-n // align) * align
    if logged_mib is not None and abs(tensor_bytes / 2**20 - logged_mib) > 0.0051:
        raise RuntimeError(f"dry-run size mismatch: llama.cpp logged {logged_mib} MiB of tensors, "
                           f"computed {tensor_bytes / 2**20:.4f} MiB")
    # metadata: the input's KV pairs, with general.quantization_version, general.file_type and the
    # overrides set (replacing same-named keys), then the same tensor infos (type changes keep size)
    kv = dict(table.kv_sizes)
    kv["general.quantization_version"] = _kv_u32_size("general.quantization_version")
    kv["general.file_type"] = _kv_u32_size("general.file_type")
    for key in ("split.no", "split.count", "split.tensors.count"):  # llama.cpp drops split keys
        kv.pop(key, None)
    for key, value in extra_kv:
        kv[_kv_bytes(key).decode(errors="replace")] = (_kv_u32_size(key) if isinstance(value, int)
                                                       else _kv_str_size(key, value))
    meta = table.meta_end + sum(kv.values()) - sum(table.kv_sizes.values())
    meta_padded = -(-meta // table.alignment) * table.alignment
    return _Plan(types, tensor_bytes, table.n_params, meta_padded + data_bytes)


def _content_sample(path: Path, span: int = 1 << 20) -> str:
    """Cheap identity of a (possibly huge) file: its size and hashes of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(span))
        fh.seek(max(0, size - span))
        h.update(fh.read(span))
    return h.hexdigest()[:16]


def _recipe(model: Path, qtype: str, imatrix_hash: str | None, overrides, output_type, embd_type, pure,
            allow_requantize) -> str:
    desc = {"model": model.name, "model_sample": _content_sample(model), "type": qtype, "imatrix": imatrix_hash,
            "overrides": overrides, "output_type": output_type, "embd_type": embd_type, "pure": bool(pure),
            "allow_requantize": bool(allow_requantize)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _check_imatrix(im, table: _ModelTable, source: str) -> dict:
    """Validate an imatrix against the model; return name -> float32 importance for llama.cpp."""
    unknown = [n for n in im.entries if n not in table.shapes]
    if unknown:
        raise UserError(f"imatrix {source} does not match the model: {len(unknown)} of its tensors are not in "
                        f"the model (e.g. {unknown[0]}); use an imatrix collected on this model")
    for name, e in im.entries.items():
        ne = table.shapes[name]
        expected = ne[0] * (ne[2] if len(ne) > 2 else 1)
        if e.size != expected and name != "token_embd.weight":
            raise UserError(f"imatrix {source} does not match the model: {name} has {e.size} values, the "
                            f"model's tensor needs {expected} (row length {ne[0]}); use an imatrix "
                            "collected on this model")
    data = {}
    for name, values in im.importance().items():
        if not np.isfinite(values).all():
            raise UserError(f"imatrix {source} has non-finite values for {name}; re-collect it")
        data[name] = values
    return data


def _load_imatrix_arg(imatrix):
    from ggufopt_ray.engine.imatrix import Imatrix

    if imatrix is None:
        return None, None
    if isinstance(imatrix, Imatrix):
        return imatrix, f"(in memory, hash {imatrix.hash()})"
    return Imatrix.load(imatrix), str(imatrix)


def needs_imatrix(file_type_name: str) -> bool:
    """Whether llama.cpp refuses this file type without an importance matrix (IQ1/IQ2-class,
    IQ3_XXS, Q2_K_S): known from the name, so a sweep can say so before any work starts."""
    name = file_type_name.upper()
    return name in _IMATRIX_TYPES or name == "Q2_K_S"


def _requires_imatrix(plan: _Plan, file_type_name: str) -> list[str]:
    need = []
    for name, t in plan.tensor_types.items():
        if name in ("token_embd.weight", "output.weight"):
            continue
        if t in _IMATRIX_TYPES or (t == "Q2_K" and file_type_name == "Q2_K_S"):
            need.append(name)
    return need


def quantize_types(model_path: str | Path, types: Sequence[str], *, out_dir: str | Path | None = None,
                   name: str | None = None, **options) -> list[QuantizeResult]:
    """Quantize ``model_path`` to each of ``types``; outputs ``{out_dir}/{name}-{TYPE}.gguf``.

    ``out_dir`` defaults to the model's folder and ``name`` to the model's file stem without a
    -f32/-f16/-bf16 suffix. Options:

    - ``imatrix``: an :class:`~ggufopt_ray.engine.imatrix.Imatrix`, or the path of a GGUF or
      legacy .dat imatrix;
    - ``tensor_types``: per-tensor overrides, ``["REGEX=TYPE", ...]`` or a mapping;
    - ``output_type`` / ``embd_type``: ggml types for ``output.weight`` / ``token_embd.weight``;
    - ``pure``: every quantizable tensor gets the file type's base type (no mixture rules);
    - ``dry_run``: plan only, write nothing; each result has the exact size and bits per weight
      the file would have;
    - ``threads`` (default: all CPUs), ``overwrite`` (replace existing outputs instead of
      skipping them), ``allow_requantize`` (accept an already-quantized input),
      ``progress`` (tqdm bar over types).

    Every input is checked for every type before the first file is written.
    """
    from ggufopt_ray.gguf.inspect import check_gguf_file

    model = check_gguf_file(model_path).resolve()
    if not types:
        raise UserError("no quantization types given; name at least one, e.g. Q4_K_M")
    outputs: list[tuple[str, Path]] = []
    folder = Path(out_dir) if out_dir is not None else model.parent
    for t in types:
        tname = resolve_file_type(t)[0]
        if tname not in [o[0] for o in outputs]:
            outputs.append((tname, folder / output_name(model, tname, name)))
    return _quantize(model, outputs, **options)


def quantize_model(model_path: str | Path, qtype: str, out_path: str | Path | None = None,
                   **options) -> QuantizeResult:
    """Quantize to one type, written to ``out_path`` (default ``{model dir}/{name}-{TYPE}.gguf``).

    Options as :func:`quantize_types`.
    """
    from ggufopt_ray.gguf.inspect import check_gguf_file

    if out_path is None:
        return quantize_types(model_path, [qtype], **options)[0]
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".gguf":
        raise UserError(f"output path {out_path} must end in .gguf")
    model = check_gguf_file(model_path).resolve()
    return _quantize(model, [(resolve_file_type(qtype)[0], out_path)], **options)[0]


def _quantize(model: Path, outputs: list[tuple[str, Path]], *, imatrix=None, tensor_types=None,
              output_type: str | None = None, embd_type: str | None = None, pure: bool = False,
              dry_run: bool = False, threads: int | None = None, overwrite: bool = False,
              allow_requantize: bool = False, progress: bool = False) -> list[QuantizeResult]:
    from ggufopt_ray.engine import native

    overrides = parse_tensor_overrides(tensor_types)
    override_ids = [(p, resolve_tensor_type(t)[1]) for p, t in overrides]
    out_t = resolve_tensor_type(output_type, "output tensor type") if output_type else None
    emb_t = resolve_tensor_type(embd_type, "token embedding type") if embd_type else None
    if threads is not None and int(threads) < 1:
        raise UserError(f"threads must be positive, not {threads}")
    n_threads = int(threads) if threads else native.default_threads()
    for _, out in outputs:
        if not dry_run and not out.parent.is_dir():
            raise UserError(f"output folder {out.parent} does not exist; create it first")
        if not dry_run and not os.access(out.parent, os.W_OK):
            raise UserError(f"output folder {out.parent} is not writable; pass --out-dir")
        if out.resolve() == model:
            raise UserError(f"output {out} would overwrite the input model; pick another name or folder")

    table = _ModelTable.read(model)
    im, im_source = _load_imatrix_arg(imatrix)
    im_data = _check_imatrix(im, table, im_source) if im is not None else None
    im_hash = im.hash() if im is not None else None
    kv: list[tuple[str, object]] = []
    if im is not None:
        # the provenance keys llama-quantize writes (the file entry names the hash when in memory)
        kv += [("quantize.imatrix.file", im_source if imatrix is not im else f"ggufopt:{im_hash}"),
               ("quantize.imatrix.dataset", (im.datasets or [f"ggufopt:{im.dataset_fingerprint or 'unknown'}"])[0]),
               ("quantize.imatrix.entries_count", len(im.entries))]
        if im.chunk_count > 0:
            kv.append(("quantize.imatrix.chunks_count", int(im.chunk_count)))

    # plan every output first: nothing is written unless every type is valid
    jobs = []
    for tname, out in outputs:
        ftype = file_types()[tname]
        recipe = _recipe(model, tname, im_hash, overrides, out_t and out_t[0], emb_t and emb_t[0], pure,
                         allow_requantize)
        job_kv = kv + [(RECIPE_KEY, recipe)]
        params = _NativeParams(ftype, n_threads, imatrix_data=im_data, overrides=override_ids,
                               output_type=out_t and out_t[1], embd_type=emb_t and emb_t[1], pure=pure,
                               allow_requantize=allow_requantize, kv=job_kv, dry_run=False)
        if out.exists() and not overwrite and not dry_run:
            _check_existing(out, recipe)
            jobs.append((tname, out, recipe, params, None))
            continue
        t0 = time.perf_counter()
        plan = _plan(params, model, table, job_kv)
        plan_seconds = time.perf_counter() - t0
        requant = [n for n, t in plan.tensor_types.items()
                   if t != table.types[n] and table.types[n] not in ("F32", "F16", "BF16")]
        if requant and not allow_requantize:
            raise UserError(f"{model.name} is already quantized ({requant[0]} is {table.types[requant[0]]}); "
                            "quantize the F32/F16/BF16 original, or pass allow_requantize / --allow-requantize")
        # ggml aborts the whole process (a Ray worker too) when an IQ1/IQ2-class type gets a tensor
        # without importance data; llama.cpp exempts token_embd/output from its own check.
        bare = [n for n in ("token_embd.weight", "output.weight")
                if plan.tensor_types.get(n) in _IMATRIX_TYPES and (im_data is None or n not in im_data)]
        if bare:
            raise UserError(f"{bare[0]} would be {plan.tensor_types[bare[0]]}, which needs importance data that "
                            f"{'the imatrix lacks' if im_data is not None else 'there is none of'}; give it another "
                            "type (e.g. Q4_K) with --tensor-type or --token-embedding-type/--output-tensor-type")
        need = _requires_imatrix(plan, tname)
        if need and im is None:
            raise UserError(f"{tname} needs an importance matrix (llama.cpp refuses IQ1/IQ2-class types, "
                            f"IQ3_XXS and Q2_K_S without one; first offending tensor {need[0]}); collect "
                            "one with `ggufopt imatrix` and pass --imatrix")
        missing = [n for n in need if n not in im_data] if im_data is not None else []
        if missing:
            raise UserError(f"{tname} needs importance data for {missing[0]} (and {len(missing) - 1} more), "
                            f"which imatrix {im_source} lacks; re-collect it on this model")
        jobs.append((tname, out, recipe, params, (plan, plan_seconds)))

    results = []
    bar = None
    if progress and len(jobs) > 1:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="quantize", unit="type", file=sys.stderr)
    try:
        for tname, out, recipe, params, planned in jobs:
            if planned is None:
                results.append(_skipped_result(out, tname, recipe, im_hash))
            elif dry_run:
                plan, secs = planned
                results.append(QuantizeResult(
                    path=str(out), type=tname, size_bytes=plan.file_size,
                    bits_per_weight=8.0 * plan.tensor_bytes / plan.n_params, seconds=secs, dry_run=True,
                    recipe=recipe, imatrix_hash=im_hash, tensor_bytes=plan.tensor_bytes,
                    n_params=plan.n_params, tensor_types=plan.tensor_types))
            else:
                results.append(_quantize_one(params, model, out, tname, recipe, im_hash))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _check_existing(out: Path, recipe: str) -> None:
    from ggufopt_ray.gguf.inspect import open_reader

    reader = open_reader(out)
    f = reader.fields.get(RECIPE_KEY)
    if f is not None and str(f.contents()) != recipe:
        raise UserError(f"{out} exists but was made with a different recipe (imatrix, overrides or options); "
                        "pass overwrite / --overwrite to replace it, or another --name / --out-dir")


def _skipped_result(out: Path, tname: str, recipe: str, im_hash) -> QuantizeResult:
    from ggufopt_ray.gguf.inspect import inspect_model

    info = inspect_model(out)
    return QuantizeResult(path=str(out), type=tname, size_bytes=info.file_size,
                          bits_per_weight=info.bits_per_weight, seconds=0.0, skipped=True, recipe=recipe,
                          imatrix_hash=im_hash, tensor_bytes=info.tensor_bytes, n_params=info.n_params,
                          tensor_types=dict(info.tensor_types))


def _quantize_one(params: _NativeParams, model: Path, out: Path, tname: str, recipe: str, im_hash) -> QuantizeResult:
    from ggufopt_ray.gguf.inspect import inspect_model

    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    try:
        params.run(model, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    tmp.replace(out)
    info = inspect_model(out)
    return QuantizeResult(path=str(out), type=tname, size_bytes=info.file_size,
                          bits_per_weight=info.bits_per_weight, seconds=seconds, recipe=recipe,
                          imatrix_hash=im_hash, tensor_bytes=info.tensor_bytes, n_params=info.n_params,
                          tensor_types=dict(info.tensor_types))


__all__ = ["QuantizeResult", "file_types", "resolve_file_type", "resolve_tensor_type",
           "parse_tensor_overrides", "output_name", "quantize_types", "quantize_model", "RECIPE_KEY"]
