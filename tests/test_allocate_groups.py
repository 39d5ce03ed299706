"""Allocator groups: every quantizable weight in exactly one group, whose regex matches exactly it.

Pure checks on name lists (a llama model and a made-up DeepSeek-style MoE), and the decisive one
against llama.cpp itself: a dry run with one distinct type per group gives every tensor its
group's type, and the per-(group, type) bytes add up to the dry run's total.
"""

from __future__ import annotations

import re

import pytest

from ggufopt_ray.allocate.groups import (KEEP, build_groups, group_bytes, group_tensor_types, is_quantizable_weight,
                                         layer_bands, overrides_for)
from ggufopt_ray.errors import UserError


def llama_names(n_layer: int) -> dict[str, int]:
    """name -> n_dims of a llama-architecture GGUF."""
    names = {"token_embd.weight": 2, "output_norm.weight": 1, "output.weight": 2, "rope_freqs.weight": 1}
    for i in range(n_layer):
        for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            names[f"blk.{i}.{k}.weight"] = 2
        names[f"blk.{i}.attn_norm.weight"] = 1
        names[f"blk.{i}.ffn_norm.weight"] = 1
    return names


def moe_names(n_layer: int = 8, n_dense: int = 1) -> dict[str, int]:
    """A made-up DeepSeek-style MoE: MLA attention, dense first layers, routed and shared experts."""
    names = {"token_embd.weight": 2, "output_norm.weight": 1, "output.weight": 2}
    for i in range(n_layer):
        p = f"blk.{i}."
        for k in ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b", "attn_output"):
            names[p + k + ".weight"] = 2
        for k in ("attn_norm", "attn_q_a_norm", "attn_kv_a_norm", "ffn_norm"):
            names[p + k + ".weight"] = 1
        if i < n_dense:
            for k in ("ffn_gate", "ffn_up", "ffn_down"):
                names[p + k + ".weight"] = 2
        else:
            names[p + "ffn_gate_inp.weight"] = 2  # the router: llama.cpp never quantizes it
            names[p + "exp_probs_b.bias"] = 1
            for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
                names[p + k + ".weight"] = 3
            for k in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
                names[p + k + ".weight"] = 2
    return names


def check_partition(names: dict[str, int], groups) -> None:
    quantizable = {n for n, d in names.items() if is_quantizable_weight(n, d)}
    owner = {}
    for g in groups:
        rx = re.compile(g.pattern)
        matched = {n for n in names if rx.search(n)}
        assert matched == set(g.tensors), g.name  # the regex matches exactly the group's tensors
        for n in matched:
            assert n not in owner, f"{n} in {owner.get(n)} and {g.name}"
            owner[n] = g.name
        assert g.pattern == g.pattern.lower() and "=" not in g.pattern and " " not in g.pattern
    assert set(owner) == quantizable


@pytest.mark.parametrize("n_layer,n_bands", [(1, 4), (2, 4), (6, 4), (10, 3), (32, 4), (13, 5)])
def test_llama_names_are_partitioned(n_layer, n_bands):
    names = llama_names(n_layer)
    groups = build_groups([n for n, d in names.items() if is_quantizable_weight(n, d)], n_layer, n_bands)
    check_partition(names, groups)
    assert [g.name for g in groups][:2] == ["token_embd", "output"]
    n_b = min(n_bands, n_layer)
    assert len(groups) == 2 + 7 * n_b
    # 10 layers in 3 bands: 4 + 3 + 3, kinds kept apart (attn_q never matches attn_q_b etc.)
    if (n_layer, n_bands) == (10, 3):
        v = [g for g in groups if g.kind == "attn_v"]
        assert [g.layers for g in v] == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
        assert [g.name for g in v] == ["attn_v@0-3", "attn_v@4-6", "attn_v@7-9"]


def test_moe_names_are_partitioned_with_experts_as_their_own_kinds():
    names = moe_names(n_layer=8, n_dense=1)
    quantizable = [n for n, d in names.items() if is_quantizable_weight(n, d)]
    assert "blk.1.ffn_gate_inp.weight" not in quantizable and "blk.1.attn_q_a_norm.weight" not in quantizable
    groups = build_groups(quantizable, n_layer=8, n_bands=4)
    check_partition(names, groups)
    kinds = {g.kind for g in groups}
    assert {"ffn_up", "ffn_up_exps", "ffn_up_shexp", "ffn_down_exps", "attn_kv_a_mqa", "attn_q_b"} <= kinds
    # dense ffn only in layer 0: one group, not one per band
    assert [g.layers for g in groups if g.kind == "ffn_up"] == [(0,)]
    assert [g.layers for g in groups if g.kind == "ffn_up_exps"] == [(1,), (2, 3), (4, 5), (6, 7)]


def test_layer_bands_cover_every_layer_once_in_order():
    for n_layer in range(1, 40):
        for n_bands in range(1, 7):
            bands = layer_bands(n_layer, n_bands)
            layers = [i for lo, hi in bands for i in range(lo, hi + 1)]
            assert layers == list(range(n_layer))
            sizes = [hi - lo + 1 for lo, hi in bands]
            assert len(bands) == min(n_bands, n_layer) and max(sizes) - min(sizes) <= 1


def test_overrides_in_group_order_keep_skips_unknown_fails():
    names = [n for n, d in llama_names(4).items() if is_quantizable_weight(n, d)]
    groups = build_groups(names, 4, 2)
    choice = {"ffn_down@2-3": "q6_k", "token_embd": "Q8_0", "attn_v@0-1": KEEP}
    assert overrides_for(groups, choice) == [r"^token_embd\.weight$=Q8_0", r"^blk\.(2|3)\.ffn_down\.weight$=Q6_K"]
    with pytest.raises(UserError, match="unknown tensor group"):
        overrides_for(groups, {"attn_qkv@0-1": "Q8_0"})
    with pytest.raises(UserError, match="name a type for each"):
        group_tensor_types(groups, choice)
    full = {g.name: "Q4_K" for g in groups}
    assert set(group_tensor_types(groups, full)) == set(names)


def test_bad_names_are_refused():
    with pytest.raises(UserError, match="characters"):
        build_groups(["blk.0.Attn_Q.weight"], 1)
    with pytest.raises(UserError, match="n_layer"):
        build_groups(["blk.5.attn_q.weight"], 2)


# -- against llama.cpp ---------------------------------------------------------------------------------
TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "Q5_1", "Q4_1"]


@pytest.fixture(scope="module")
def six_layer_model(tmp_path_factory):
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("alloc") / "six.gguf", SynthSpec(seed=1, n_layer=6))


def test_llama_cpp_gives_each_tensor_its_groups_type_and_sizes_add_up(six_layer_model):
    from ggufopt_ray.engine import ggml
    from ggufopt_ray.engine.quantize import quantize_model
    from ggufopt_ray.gguf.inspect import open_reader

    shapes = {t.name: [int(d) for d in t.shape] for t in open_reader(six_layer_model).tensors}
    base = quantize_model(six_layer_model, "Q4_K_M", dry_run=True, threads=1)
    quantizable = [n for n, t in base.tensor_types.items() if t not in ("F32", "F16", "BF16")]
    # the name rules agree with llama.cpp's own choice on this model
    assert sorted(quantizable) == sorted(n for n in shapes if is_quantizable_weight(n, len(shapes[n])))
    groups = build_groups(quantizable, n_layer=6, n_bands=3)
    assert len(groups) == 2 + 7 * 3
    table = group_bytes(groups, TYPES, lambda n, t: ggml.tensor_nbytes(ggml.type_id_from_name(t), shapes[n]))
    fixed = sum(ggml.tensor_nbytes(ggml.type_id_from_name(base.tensor_types[n]), shapes[n])
                for n in shapes if n not in quantizable)
    for shift in (0, 3):  # two different assignments, neighbouring groups always differ
        choice = {g.name: TYPES[(i + shift) % len(TYPES)] for i, g in enumerate(groups)}
        plan = quantize_model(six_layer_model, "Q4_K_M", dry_run=True, threads=1,
                              tensor_types=overrides_for(groups, choice))
        expected = group_tensor_types(groups, choice)
        assert {n: plan.tensor_types[n] for n in quantizable} == expected
        predicted = fixed + sum(table[i][TYPES.index(choice[g.name])] for i, g in enumerate(groups))
        assert predicted == plan.tensor_bytes
