"""Search spaces: grids of configs and Optuna define-by-run functions, and config -> recipe.

Optuna's define-by-run functions must be module-level (Tune pickles the searcher), so the
search settings reach them through ``functools.partial``. Conditional bounds such as
``n_ubatch <= n_batch`` are integer exponents with a dynamic upper bound, the form Optuna accepts.
A trial config is a flat dict of JSON values; ``recipe_from_config`` turns it into a Recipe.
"""

from __future__ import annotations

import itertools
from functools import partial

from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.errors import UserError

SEARCHES = ("quant_types", "quant_mix", "imatrix_size", "zfp", "bub", "combined")

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
KEEP = "base"  # a group left to the base type's own rules


LAYER_GROUPS = ("first_layers", "last_layers")


def mix_groups(search: SearchConfig) -> list[str]:
    groups = list(search.mix_groups)
    unknown = [g for g in groups if g not in MIX_GROUPS and g not in LAYER_GROUPS]
    if unknown:
        raise UserError(f"unknown tensor group(s) {unknown} in search.mix_groups; "
                        f"use {', '.join(list(MIX_GROUPS) + list(LAYER_GROUPS))}")
    return groups


def layer_range_pattern(layers: list[int]) -> str:
    return r"blk\.(" + "|".join(str(i) for i in layers) + r")\."


def mix_overrides(config: dict, n_layer: int) -> tuple[str, ...]:
    """Config values ``mix_<group>`` -> ordered overrides; layer ranges first (first match wins)."""
    out = []
    edge = max(1, n_layer // 4)
    for key, layers in (("mix_first_layers", list(range(edge))),
                        ("mix_last_layers", list(range(n_layer - edge, n_layer)))):
        t = config.get(key, KEEP)
        if t and t != KEEP:
            out.append(f"{layer_range_pattern(layers)}.*(attn_v|ffn_down)\\.weight={t}")
    for group, pattern in MIX_GROUPS.items():
        t = config.get(f"mix_{group}", KEEP)
        if t and t != KEEP:
            out.append(f"{pattern}={t}")
    return tuple(out)


def recipe_from_config(config: dict, search: SearchConfig) -> Recipe:
    if "zfp_mode" in config:
        return Recipe(kind="zfp", zfp_mode=str(config["zfp_mode"]),
                      zfp_value=None if config.get("zfp_value") is None else float(config["zfp_value"]),
                      zfp_dims=int(config.get("zfp_dims", 2)))
    if config.get("kind") == "base":
        return Recipe(kind="base")
    ftype = config.get("ftype") or search.base_type
    overrides = mix_overrides(config, int(config.get("n_layer", 0))) if any(
        k.startswith("mix_") for k in config) else ()
    return Recipe(kind="quant", ftype=str(ftype), overrides=overrides,
                  imatrix_chunks=int(config.get("imatrix_chunks", 0) or 0))


# -- grids --------------------------------------------------------------------------------------
def grid_configs(search: SearchConfig, n_layer: int, n_ctx: int, n_calib: int) -> list[dict]:
    name = search.name
    imx = n_calib if search.imatrix else 0
    if name == "quant_types":
        return [{"ftype": t, "imatrix_chunks": imx} for t in search.types]
    if name == "imatrix_size":
        sizes = [0] + [k for k in sorted(set(search.imatrix_chunks)) if k > 0]
        too_big = [k for k in sizes if k > n_calib]
        if too_big:
            raise UserError(f"imatrix sizes {too_big} exceed the {n_calib} calibration chunks; "
                            "raise dataset.calib_chunks or lower search.imatrix_chunks")
        return [{"ftype": search.base_type, "imatrix_chunks": k} for k in sizes]
    if name == "zfp":
        out = []
        for mode, value, dims in itertools.product(search.zfp_modes, search.zfp_rates, search.zfp_dims):
            out.append({"zfp_mode": mode, "zfp_value": None if mode == "reversible" else value, "zfp_dims": dims})
        # reversible has no parameter: keep one per dims
        seen, unique = set(), []
        for c in out:
            key = (c["zfp_mode"], c["zfp_value"], c["zfp_dims"])
            if key not in seen:
                seen.add(key)
                unique.append(c)
        return unique
    if name == "bub":
        hi = min(search.bub_max_log2, n_ctx.bit_length() - 1)
        lo = min(search.bub_min_log2, hi)
        return [{"n_batch": 2 ** b, "n_ubatch": 2 ** u} for b in range(lo, hi + 1) for u in range(lo, b + 1)]
    if name == "quant_mix":
        # The plain base type, then each tensor group raised to each higher type on its own.
        out = [{"ftype": search.base_type, "n_layer": n_layer, "imatrix_chunks": imx}]
        for group in mix_groups(search):
            for t in search.mix_types:
                out.append({"ftype": search.base_type, "n_layer": n_layer, f"mix_{group}": t, "imatrix_chunks": imx})
        return out
    if name == "combined":
        return [{"ftype": t, "imatrix_chunks": k} for t in search.types for k in sorted({0, n_calib})]
    raise UserError(f"unknown search {name!r}; choose one of {', '.join(SEARCHES)}")


# -- Optuna define-by-run spaces (module level: they are pickled) ---------------------------------------
def space_quant_types(trial, types: list[str], imatrix_chunks: int):
    trial.suggest_categorical("ftype", list(types))
    return {"imatrix_chunks": imatrix_chunks}


def space_quant_mix(trial, base_type: str, mix_types: list[str], n_layer: int, imatrix_chunks: int,
                    groups: list[str]):
    choices = [KEEP] + list(mix_types)
    for group in groups:
        trial.suggest_categorical(f"mix_{group}", choices)
    return {"ftype": base_type, "n_layer": n_layer, "imatrix_chunks": imatrix_chunks}


def space_imatrix_size(trial, base_type: str, sizes: list[int]):
    trial.suggest_categorical("imatrix_chunks", list(sizes))
    return {"ftype": base_type}


def space_zfp(trial, modes: list[str], rates: list[float], dims: list[int]):
    mode = trial.suggest_categorical("zfp_mode", list(modes))
    trial.suggest_categorical("zfp_dims", list(dims))
    if mode == "reversible":
        return {"zfp_value": None}
    trial.suggest_float("zfp_value", min(rates), max(rates))
    return {}


def space_bub(trial, lo: int, hi: int):
    b = trial.suggest_int("n_batch_log2", lo, hi)
    u = trial.suggest_int("n_ubatch_log2", lo, b)  # dynamic bound: n_ubatch <= n_batch
    return {"n_batch": 2 ** b, "n_ubatch": 2 ** u}


def space_combined(trial, types: list[str], n_calib: int):
    trial.suggest_categorical("ftype", list(types))
    trial.suggest_categorical("imatrix_chunks", sorted({0, n_calib}))
    return {}


def optuna_space(search: SearchConfig, n_layer: int, n_ctx: int, n_calib: int):
    imx = n_calib if search.imatrix else 0
    name = search.name
    if name == "quant_types":
        return partial(space_quant_types, types=list(search.types), imatrix_chunks=imx)
    if name == "quant_mix":
        return partial(space_quant_mix, base_type=search.base_type, mix_types=list(search.mix_types),
                       n_layer=n_layer, imatrix_chunks=imx, groups=mix_groups(search))
    if name == "imatrix_size":
        return partial(space_imatrix_size, base_type=search.base_type,
                       sizes=[0] + [k for k in search.imatrix_chunks if 0 < k <= n_calib])
    if name == "zfp":
        return partial(space_zfp, modes=list(search.zfp_modes), rates=list(search.zfp_rates),
                       dims=list(search.zfp_dims))
    if name == "bub":
        hi = min(search.bub_max_log2, n_ctx.bit_length() - 1)
        return partial(space_bub, lo=min(search.bub_min_log2, hi), hi=hi)
    if name == "combined":
        return partial(space_combined, types=list(search.types), n_calib=n_calib)
    raise UserError(f"unknown search {name!r}; choose one of {', '.join(SEARCHES)}")
