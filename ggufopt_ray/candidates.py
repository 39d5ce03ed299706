"""Candidates: a recipe (quant type, per-tensor mix, imatrix size, ZFP setting) -> a cached GGUF.

A sweep asks for many candidates and often the same one twice (a retried trial, a resumed sweep,
two searches sharing a point). Every candidate file is therefore content-addressed by the base
model's fingerprint, the recipe and the imatrix hash, and built at most once: the build writes to
a temporary name and renames, so a crash never leaves a half file under the final name, and
under a per-file lock (``store.locks``), so that processes sharing a cache build each file once.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ggufopt_ray.calibration import mix_file_label
from ggufopt_ray.errors import UserError
from ggufopt_ray.store.locks import file_lock


@dataclass(frozen=True)
class Recipe:
    """What to do to the base model. ``kind`` is base | quant | zfp."""

    kind: str = "quant"
    ftype: Optional[str] = None  # quant: llama.cpp file type, e.g. Q4_K_M
    overrides: tuple[str, ...] = ()  # quant: llama-quantize --tensor-type style "REGEX=TYPE"
    output_type: Optional[str] = None
    embd_type: Optional[str] = None
    pure: bool = False
    imatrix_chunks: int = 0  # quant: calibration chunks in the importance matrix (0 = none)
    # quant: a calibration mix, ((language, share), ...) over imatrix_chunks chunks (see
    # ggufopt_ray.calibration); empty = the first imatrix_chunks chunks of the calibration set
    imatrix_mix: tuple[tuple[str, float], ...] = ()
    zfp_mode: Optional[str] = None  # zfp: rate | precision | accuracy | reversible
    zfp_value: Optional[float] = None  # zfp: the rate, precision or tolerance
    zfp_dims: int = 2

    def label(self) -> str:
        """Readable name for tables: the type, then each override as group=TYPE."""
        if self.kind != "quant" or not self.overrides:
            return self.file_label()
        base = self.file_label().replace(
            "-mix" + hashlib.sha1("|".join(self.overrides).encode()).hexdigest()[:6], "")
        return base + "[" + ", ".join(describe_override(o) for o in self.overrides) + "]"

    def file_label(self) -> str:
        """Short name safe in file names (overrides appear as a hash)."""
        if self.kind == "base":
            return "base"
        if self.kind == "zfp":
            v = "" if self.zfp_value is None else f"{self.zfp_value:g}"
            return f"zfp-{self.zfp_mode}{v}-d{self.zfp_dims}"
        parts = [str(self.ftype)]
        if self.overrides:
            parts.append("mix" + hashlib.sha1("|".join(self.overrides).encode()).hexdigest()[:6])
        if self.output_type:
            parts.append(f"out{self.output_type}")
        if self.embd_type:
            parts.append(f"emb{self.embd_type}")
        if self.pure:
            parts.append("pure")
        if self.imatrix_chunks:
            parts.append(f"imx{self.imatrix_chunks}")
        if self.imatrix_mix:
            parts.append(mix_file_label(self.imatrix_mix))
        return "-".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overrides"] = list(self.overrides)
        if self.imatrix_mix:
            d["imatrix_mix"] = [[lang, share] for lang, share in self.imatrix_mix]
        else:
            del d["imatrix_mix"]  # keeps the keys (and caches) of recipes made before mixes existed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["overrides"] = tuple(d.get("overrides") or ())
        d["imatrix_mix"] = tuple((str(lang), float(share)) for lang, share in d.get("imatrix_mix") or ())
        return cls(**d)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        if self.kind not in ("base", "quant", "zfp"):
            raise UserError(f"recipe kind must be base, quant or zfp, not {self.kind!r}")
        if self.kind == "quant" and not self.ftype:
            raise UserError("a quant recipe needs a file type, e.g. Q4_K_M")
        if self.imatrix_mix and not self.imatrix_chunks:
            raise UserError("a calibration mix needs a total number of chunks (imatrix_chunks > 0)")
        if self.kind == "zfp" and not self.zfp_mode:
            raise UserError("a zfp recipe needs a mode: rate, precision, accuracy or reversible")


def describe_override(override: str) -> str:
    """``blk\\.(0)\\..*(attn_v|ffn_down)\\.weight=Q6_K`` -> ``blk0:attn_v|ffn_down=Q6_K``."""
    pattern, _, qtype = override.rpartition("=")
    text = pattern.replace("\\.weight", "").replace("^", "").replace("\\.", ".")
    m = re.match(r"blk\.\(([\d|]+)\)\.\.\*(.*)$", text)
    if m:
        text = f"blk{m.group(1)}:{m.group(2)}"
    text = re.sub(r"\((.*)\)", r"\1", text).replace("attn_q|output", "attn_q|attn_output")
    return f"{text}={qtype}"


@dataclass
class Candidate:
    recipe: Recipe
    path: str
    size_bytes: int
    bits_per_weight: float
    build_seconds: float
    cached: bool
    imatrix_hash: Optional[str] = None
    extra: dict = field(default_factory=dict)  # e.g. ZFP error statistics
    node_id: str = ""  # the Ray node that built it (where the file is when nodes share no disk)
    imatrix_path: str = ""  # the importance matrix it was quantized with, as the trial that asked holds it

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


def candidate_path(cache_dir: str | Path, model_fp: str, recipe: Recipe, imatrix_hash: str | None) -> Path:
    ident = hashlib.sha256(f"{model_fp}|{recipe.key()}|{imatrix_hash or ''}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "candidates" / model_fp / f"{recipe.file_label()}-{ident}.gguf"


def zfp_config(recipe: Recipe):
    """The ZFP settings a zfp recipe stands for."""
    from ggufopt_ray.compress import ZfpConfig

    param = {"rate": "rate", "precision": "precision", "accuracy": "tolerance", "reversible": None}.get(recipe.zfp_mode)
    kwargs = {"mode": recipe.zfp_mode, "dims": int(recipe.zfp_dims)}
    if param == "precision":
        kwargs[param] = int(recipe.zfp_value)
    elif param:
        kwargs[param] = float(recipe.zfp_value)
    return ZfpConfig(**kwargs)


def build_candidate(recipe: Recipe, base_model: str | Path, cache_dir: str | Path, model_fp: str,
                    imatrix=None, threads: int | None = None) -> Candidate:
    """Make (or find in the cache) the GGUF for ``recipe``; ``imatrix`` is an Imatrix or None."""
    from ggufopt_ray.gguf.inspect import inspect_model

    recipe.validate()
    if recipe.kind == "base":
        info = inspect_model(base_model)
        return Candidate(recipe, str(base_model), info.file_size, info.bits_per_weight, 0.0, True)
    if recipe.imatrix_chunks and imatrix is None:
        raise UserError(f"recipe {recipe.label()} needs an importance matrix of {recipe.imatrix_chunks} chunks")
    im_hash = imatrix.hash() if (imatrix is not None and recipe.imatrix_chunks) else None
    out = candidate_path(cache_dir, model_fp, recipe, im_hash)
    cached = _cached_candidate(recipe, out, im_hash)
    if cached is not None:
        return cached
    # Another process (a concurrent sweep on the same cache, a retried trial) may be building this
    # very file: wait for it under a lock, then look again, instead of building it twice.
    with file_lock(out, on_wait=lambda lock: print(f"waiting for another process building {out.name}",
                                                   file=sys.stderr, flush=True)):
        cached = _cached_candidate(recipe, out, im_hash)
        if cached is not None:
            return cached
        return _build_locked(recipe, base_model, out, im_hash, imatrix, threads)


def _cached_candidate(recipe: Recipe, out: Path, im_hash: str | None) -> Candidate | None:
    """The finished candidate at ``out`` (its metadata is written last), or None."""
    meta_path = out.with_suffix(".json")
    if out.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Candidate(recipe, str(out), int(meta["size_bytes"]), meta["bits_per_weight"], 0.0, True,
                         im_hash, meta.get("extra", {}))
    return None


def _build_locked(recipe: Recipe, base_model: str | Path, out: Path, im_hash: str | None, imatrix,
                  threads: int | None) -> Candidate:
    """Build ``out`` for ``recipe``; the caller holds its lock."""
    from ggufopt_ray.gguf.inspect import inspect_model

    meta_path = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra: dict = {}
    if recipe.kind == "quant" and recipe.overrides and not (recipe.pure or recipe.output_type or recipe.embd_type):
        # A per-tensor mix is assembled from one quantization of the model per type (made once,
        # kept beside the cache), byte-identical to llama-quantize's file: it costs I/O, not a
        # quantization per candidate. The sources folder is locked while a mix is built from it.
        from ggufopt_ray.gguf.assemble import build_mix

        cache_dir, model_fp = out.parent.parent.parent, out.parent.name  # see candidate_path
        sources = cache_dir / "sources" / model_fp / (im_hash or "no-imatrix")
        with file_lock(sources):
            build_mix(base_model, out, recipe.ftype, list(recipe.overrides), imatrix=imatrix if im_hash else None,
                      sources_dir=sources, threads=threads)
    elif recipe.kind == "quant":
        from ggufopt_ray.engine.quantize import quantize_model

        quantize_model(base_model, recipe.ftype, out, imatrix=imatrix if im_hash else None,
                       tensor_types=list(recipe.overrides) or None, output_type=recipe.output_type,
                       embd_type=recipe.embd_type, pure=recipe.pure, threads=threads, overwrite=True)
    else:
        from ggufopt_ray.compress import compress_model

        report = compress_model(base_model, zfp_config(recipe), out)
        extra = {"zfp_bits_per_weight": report.bits_per_weight, "zfp_rmse": report.rmse,
                 "zfp_snr_db": report.snr_db, "zfp_max_abs_error": report.max_abs_error,
                 "zfp_compressed_bytes": report.compressed_bytes,
                 "zfp_model_bits_per_weight": report.model_bits_per_weight}
    seconds = time.perf_counter() - t0
    info = inspect_model(out)
    # A ZFP candidate's real size is its compressed size; the GGUF holds decompressed floats.
    bpw = extra.get("zfp_model_bits_per_weight", info.bits_per_weight)
    size = int(round(bpw * info.n_params / 8)) if recipe.kind == "zfp" else info.file_size
    tmp = meta_path.with_name(meta_path.name + ".partial")
    tmp.write_text(json.dumps({"recipe": recipe.to_dict(), "bits_per_weight": bpw, "size_bytes": size,
                               "imatrix_hash": im_hash, "extra": extra}, indent=2))
    tmp.replace(meta_path)
    return Candidate(recipe, str(out), size, bpw, seconds, False, im_hash, extra)
