"""Per-tensor mixes under a size budget: exact sizes without quantizing, and the repair that turns
a sampled mix over the budget into the nearest one that fits.

A llama-quantize ``--tensor-type PATTERN=TYPE`` override gives every tensor it matches exactly that
type (the first matching pattern wins), and every other tensor keeps the type the base type's own
rules choose. So one dry run of the base type plus the tensor shapes gives the size of any mix by
arithmetic, in microseconds, where a dry run per mix costs ~0.3 s on a 7M-parameter model and more
on big ones.

Why repair instead of reject: with nine tensor groups and five choices each, most random mixes
upgrade so much that they overshoot any sensible budget (15 of 16 Optuna trials on the trained
model in ../shared/models), and a rejected trial teaches the sampler nothing. A repaired trial is
still a deterministic function of the sampled parameters, so the sampler's model stays valid, and
every trial measures a candidate that fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ggufopt_ray.errors import UserError

KEEP = "base"  # a group left to the base type's own rules
_NOT_QUANTIZED = {"F32", "F16", "BF16"}

# Tensor groups of a per-tensor mix, as llama-quantize --tensor-type regexes.
MIX_GROUPS = {
    "attn_v": r"attn_v\.weight",
    "attn_k": r"attn_k\.weight",
    "attn_qo": r"attn_(q|output)\.weight",
    "ffn_down": r"ffn_down\.weight",
    "ffn_up_gate": r"ffn_(up|gate)\.weight",
    "output": r"^output\.weight",
    "token_embd": r"token_embd\.weight",
}
# Layer-band groups: attn_v and ffn_down of the first / last quarter of the blocks.
LAYER_GROUPS = ("first_layers", "last_layers")


def check_mix_groups(groups) -> list[str]:
    """``groups`` as a list, or a one-line error naming the unknown ones and the valid names."""
    groups = list(groups)
    unknown = [g for g in groups if g not in MIX_GROUPS and g not in LAYER_GROUPS]
    if unknown:
        raise UserError(f"unknown tensor group(s) {unknown} in search.mix_groups; "
                        f"use {', '.join(list(MIX_GROUPS) + list(LAYER_GROUPS))}")
    return groups


def layer_range_pattern(layers: list[int]) -> str:
    return r"blk\.(" + "|".join(str(i) for i in layers) + r")\."


def mix_overrides(choice: dict, n_layer: int) -> tuple[str, ...]:
    """Values ``mix_<group>`` -> ordered llama-quantize overrides; layer bands first (first match wins)."""
    out = []
    edge = max(1, n_layer // 4)
    for key, layers in (("mix_first_layers", list(range(edge))),
                        ("mix_last_layers", list(range(n_layer - edge, n_layer)))):
        t = choice.get(key, KEEP)
        if t and t != KEEP:
            out.append(f"{layer_range_pattern(layers)}.*(attn_v|ffn_down)\\.weight={t}")
    for group, pattern in MIX_GROUPS.items():
        t = choice.get(f"mix_{group}", KEEP)
        if t and t != KEEP:
            out.append(f"{pattern}={t}")
    return tuple(out)


@dataclass
class MixSizer:
    """Sizes of mixes of one base type on one model."""

    shapes: dict[str, list[int]]  # ggml order, ne[0] = row length
    base_types: dict[str, str]  # what the base type's rules choose for each tensor
    n_params: int
    _nbytes: dict = field(default_factory=dict, repr=False)
    _patterns: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_model(cls, model_path: str | Path, base_type: str) -> "MixSizer":
        from ggufopt_ray.engine.quantize import quantize_model
        from ggufopt_ray.gguf.inspect import open_reader

        plan = quantize_model(model_path, base_type, dry_run=True, threads=1)
        shapes = {t.name: [int(d) for d in t.shape] for t in open_reader(model_path).tensors}
        return cls(shapes=shapes, base_types=dict(plan.tensor_types), n_params=plan.n_params)

    def tensor_types(self, overrides: tuple[str, ...] | list[str]) -> dict[str, str]:
        """Each tensor's type under ``overrides`` (``PATTERN=TYPE`` strings, first match wins)."""
        rules = []
        for o in overrides:
            pattern, _, qtype = o.rpartition("=")
            if pattern not in self._patterns:
                self._patterns[pattern] = re.compile(pattern)
            rules.append((self._patterns[pattern], qtype.upper()))
        out = {}
        for name, base in self.base_types.items():
            if base in _NOT_QUANTIZED:  # norms and the like: llama.cpp never overrides them
                out[name] = base
                continue
            rule = next(((p, t) for p, t in rules if p.search(name)), None)  # first match wins
            out[name] = rule[1] if rule is not None and self._fits(name, rule[1]) else base
        return out

    def bits_per_weight(self, overrides: tuple[str, ...] | list[str]) -> float:
        """Tensor bits per weight, as the quantizer's dry run reports them."""
        types = self.tensor_types(overrides)
        return 8.0 * sum(self._bytes(n, t) for n, t in types.items()) / self.n_params

    def tensor_bytes(self, name: str, qtype: str) -> int:
        """Exact bytes of tensor ``name`` stored as ``qtype``."""
        return self._bytes(name, qtype)

    def total_bytes(self, overrides: tuple[str, ...] | list[str] = ()) -> int:
        """Tensor bytes of the whole model under ``overrides`` (what the dry run counts)."""
        return sum(self._bytes(n, t) for n, t in self.tensor_types(overrides).items())

    def _fits(self, name: str, qtype: str) -> bool:
        # A type whose block does not divide the row cannot apply as given (llama.cpp falls back
        # to another type); the verifying dry run of the final mix has the last word there.
        from ggufopt_ray.engine import ggml

        type_id = ggml.type_id_from_name(qtype)
        return type_id is not None and self.shapes[name][0] % int(ggml.lib().ggml_blck_size(type_id)) == 0

    def _bytes(self, name: str, qtype: str) -> int:
        key = (name, qtype)
        if key not in self._nbytes:
            from ggufopt_ray.engine import ggml

            self._nbytes[key] = ggml.tensor_nbytes(ggml.type_id_from_name(qtype), self.shapes[name])
        return self._nbytes[key]


def fit_mix(choice: dict[str, str], options: list[str], size_of, target: float) -> dict[str, str] | None:
    """The nearest mix to ``choice`` (group -> type or ``KEEP``) whose ``size_of`` is <= ``target``.

    Greedy: while over the budget, make the single change (one group to another of ``options`` or
    back to ``KEEP``) that shrinks the mix the least among those that shrink it at all, so the mix
    gives up as little as it must; then give back sampled choices that fit again. Returns
    ``choice`` unchanged when it fits, None when no sequence of changes gets under ``target``.
    """
    current = dict(choice)
    size = size_of(current)
    moves = list(dict.fromkeys([KEEP, *options]))
    while size > target:
        best = None
        for group in current:
            for option in moves:
                if option == current[group]:
                    continue
                trial = {**current, group: option}
                s = size_of(trial)
                if s < size and (best is None or s > best[0]):
                    best = (s, trial)
        if best is None:
            return None
        size, current = best
    # Steps taken early may have become unnecessary once later ones freed room: give groups
    # back what was sampled for them, the largest that still fits first, while any fits.
    while True:
        best = None
        for group, wanted in choice.items():
            if current[group] == wanted:
                continue
            trial = {**current, group: wanted}
            s = size_of(trial)
            if s <= target and (best is None or s > best[0]):
                best = (s, trial)
        if best is None:
            return current
        size, current = best
