"""Tensor groups for the allocator: tensor kind x layer band, plus each tensor outside the blocks.

Why finer than the nine groups of :mod:`ggufopt_ray.mixes`: sensitivity differs along the depth of
a model (llama.cpp's own mixes bump the first and last eighth of attn_v/ffn_down), and by tensor
kind; a group that lumps attn_q with attn_output, or the first layers with the middle ones, forces
one type on tensors that want different ones. Finer than per tensor would cost one measurement per
tensor and type (Thireus' suite: days of GPU), so layers are pooled into a few bands of
consecutive layers.

A kind is whatever sits between ``blk.N.`` and ``.weight`` (``attn_q``, ``ffn_down``,
``ffn_up_exps``, ``ffn_down_shexp``, ``attn_kv_a_mqa``...), so MoE experts, shared experts and
unusual architectures get their own kinds without a list to keep up to date. A tensor outside the
blocks (``token_embd``, ``output``, ``per_layer_token_embd``...) is a group of its own.

Every group's pattern is anchored (``^blk\\.(0|1|2)\\.attn_q\\.weight$``), so the groups are
disjoint and it does not matter whether llama-quantize lets the first or the last matching
pattern win (the vendored llama.cpp takes the first; older builds took the last). The patterns
survive llama-quantize's command-line parsing, which lower-cases the pattern and splits
``PATTERN=TYPE`` at the first ``=``: they contain neither upper-case letters nor ``=`` nor spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ggufopt_ray.errors import UserError

KEEP = "base"  # a group left to the base type's own rules: no override
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
_NAME_CHARS = re.compile(r"^[a-z0-9_.]+$")
# Substrings llama.cpp's quantizer never quantizes (tensor_allows_quantization in llama-quant.cpp).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
                    "indexer.k_proj.weight", "indexer.q_proj.weight")
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


def is_quantizable_weight(name: str, n_dims: int) -> bool:
    """Whether llama.cpp's quantizer may change this tensor's type (mirrors its name rules).

    For the exact answer on a given model, prefer the types of a dry run (a tensor the base type
    leaves at F32/F16 is not quantizable); this is for name lists without a model at hand.
    """
    return (n_dims >= 2 and name.endswith("weight") and name not in _NEVER_QUANTIZED_NAMES
            and not any(s in name for s in _NEVER_QUANTIZED))


@dataclass(frozen=True)
class TensorGroup:
    """Tensors that always get the same type: one kind in a band of layers, or one global tensor."""

    name: str  # e.g. "attn_v@0-7", "ffn_down_exps@24-31", "token_embd"
    kind: str  # "attn_v", "ffn_down_exps", "token_embd"
    layers: tuple[int, ...]  # the block indices present in the group; () for a global tensor
    tensors: tuple[str, ...]
    pattern: str  # llama-quantize --tensor-type regex that matches exactly ``tensors``

    def override(self, qtype: str) -> str:
        return f"{self.pattern}={qtype}"


def layer_bands(n_layer: int, n_bands: int = 4) -> list[tuple[int, int]]:
    """``n_bands`` runs of consecutive layers (inclusive ranges), sizes differing by at most one.

    The first bands get the extra layer when ``n_layer`` does not divide evenly; a model with
    fewer layers than ``n_bands`` gets one band per layer.
    """
    if n_layer < 1 or n_bands < 1:
        raise UserError(f"need n_layer >= 1 and n_bands >= 1, got n_layer={n_layer}, n_bands={n_bands}")
    n_bands = min(n_bands, n_layer)
    base, extra = divmod(n_layer, n_bands)
    bands, start = [], 0
    for b in range(n_bands):
        size = base + (1 if b < extra else 0)
        bands.append((start, start + size - 1))
        start += size
    return bands


def _check_name(name: str) -> None:
    if not _NAME_CHARS.match(name):
        raise UserError(f"tensor name {name!r} has characters other than a-z 0-9 _ . ; llama-quantize "
                        "lower-cases --tensor-type patterns, so no exact pattern can be written for it")


def _layer_alternation(layers: Sequence[int]) -> str:
    return "(" + "|".join(str(i) for i in layers) + ")"


def build_groups(tensor_names: Iterable[str], n_layer: int, n_bands: int = 4) -> list[TensorGroup]:
    """The groups of a model's quantizable tensors (pass only those: see :func:`is_quantizable_weight`).

    Order: global tensors first (token_embd, then others by name, output last), then block
    groups by kind in order of first appearance, band by band. Empty (kind, band) cells are
    skipped, so a MoE model whose first layers are dense has ``ffn_up`` groups only where dense
    layers are.
    """
    bands = layer_bands(n_layer, n_bands)
    band_of = {}
    for b, (lo, hi) in enumerate(bands):
        for i in range(lo, hi + 1):
            band_of[i] = b
    by_cell: dict[tuple[str, int], list[tuple[int, str]]] = {}
    kinds: list[str] = []
    globals_: list[str] = []
    seen = set()
    for name in tensor_names:
        if name in seen:
            raise UserError(f"tensor {name!r} listed twice")
        seen.add(name)
        _check_name(name)
        m = _BLOCK_TENSOR.match(name)
        if m is None:
            globals_.append(name)
            continue
        layer, kind = int(m.group(1)), m.group(2)
        if layer not in band_of:
            raise UserError(f"tensor {name!r} is in block {layer}, but the model has n_layer={n_layer}")
        if kind not in kinds:
            kinds.append(kind)
        by_cell.setdefault((kind, band_of[layer]), []).append((layer, name))

    def global_order(n: str):
        return (0 if n.startswith("token_embd") else 2 if n.startswith("output") else 1, n)

    groups = []
    for name in sorted(globals_, key=global_order):
        stem = name[:-len(".weight")] if name.endswith(".weight") else name
        groups.append(TensorGroup(name=stem, kind=stem, layers=(), tensors=(name,),
                                  pattern="^" + re.escape(name) + "$"))
    for kind in kinds:
        for b, (lo, hi) in enumerate(bands):
            members = sorted(by_cell.get((kind, b), []))
            if not members:
                continue
            layers = tuple(sorted({layer for layer, _ in members}))
            pattern = r"^blk\." + _layer_alternation(layers) + r"\." + re.escape(kind) + r"\.weight$"
            label = f"{kind}@{lo}-{hi}" if lo != hi else f"{kind}@{lo}"
            groups.append(TensorGroup(name=label, kind=kind, layers=layers,
                                      tensors=tuple(n for _, n in members), pattern=pattern))
    return groups


def overrides_for(groups: Sequence[TensorGroup], choice: Mapping[str, str]) -> list[str]:
    """``{group name: type}`` -> ``PATTERN=TYPE`` overrides in group order.

    A group missing from ``choice`` or set to :data:`KEEP` gets no override (the base type's rules
    decide its tensors). Unknown group names are an error, not silently dropped.
    """
    known = {g.name for g in groups}
    unknown = [name for name in choice if name not in known]
    if unknown:
        raise UserError(f"unknown tensor group(s) {unknown}; this model's groups are {sorted(known)}")
    out = []
    for g in groups:
        qtype = choice.get(g.name, KEEP)
        if qtype and qtype != KEEP:
            out.append(g.override(str(qtype).upper()))
    return out


def group_tensor_types(groups: Sequence[TensorGroup], choice: Mapping[str, str]) -> dict[str, str]:
    """Each tensor's type under a full choice (every group named): what the overrides ask for."""
    missing = [g.name for g in groups if choice.get(g.name, KEEP) in (KEEP, None, "")]
    if missing:
        raise UserError(f"choice leaves group(s) {missing} to the base type; name a type for each")
    return {t: str(choice[g.name]).upper() for g in groups for t in g.tensors}


def group_bytes(groups: Sequence[TensorGroup], types: Sequence[str], tensor_nbytes) -> list[list[int]]:
    """Bytes of every (group, type): the sum over the group's tensors of ``tensor_nbytes(name, type)``.

    ``tensor_nbytes`` is the caller's exact per-tensor size (from ggml's row sizes, or a dry run
    with ``.*=TYPE`` so that shape fallbacks are counted as llama.cpp applies them). Sizes of mixes
    in which every group is named are then exactly additive.
    """
    return [[int(sum(tensor_nbytes(t, qtype) for t in g.tensors)) for qtype in types] for g in groups]
