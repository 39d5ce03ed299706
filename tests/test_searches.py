"""Searches as objects: registry, Hydra schemas, validation before Ray, and what each search makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ggufopt_ray.errors import UserError
from ggufopt_ray.searches import SEARCHES, SearchFacts, make_search, search_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "search"


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_every_search_has_one_yaml_naming_its_schema(name):
    doc = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert doc["defaults"] == [f"{name}_schema"]
    cfg = search_config(name)
    assert type(make_search(cfg)) is SEARCHES[name]
    # Every key of the YAML is a field of that search's typed config (nothing shared by accident).
    fields = set(type(cfg).__dataclass_fields__)
    assert set(doc) - {"defaults"} <= fields


@pytest.mark.parametrize("name, values, message", [
    ("quant_types", {"types": []}, "search.types is empty"),
    ("quant_types", {"types": ["Q4_K_M", "Q9_Z"]}, "Q9_Z"),
    ("quant_types", {"types": ["IQ2_XS"]}, r"need an importance matrix.*search.imatrix=true"),
    ("quant_types", {"mode": "random"}, "search.mode must be grid or optuna"),
    ("quant_types", {"scheduler": "hyperband"}, "search.scheduler must be none, asha or median"),
    ("quant_types", {"objectives": ["speed"]}, "search.objectives"),
    ("quant_types", {"objectives": ["composite", "bits_per_weight"], "scheduler": "asha"}, "schedulers rank"),
    ("quant_types", {"mode": "optuna", "num_samples": 0}, "search.num_samples must be at least 1"),
    ("combined", {"types": ["IQ1_S"]}, "need an importance matrix"),
    ("imatrix_size", {"imatrix_chunks": [0, 2]}, "positive chunk counts"),
    ("imatrix_size", {"imatrix_gain_threshold": 1.5}, "imatrix_gain_threshold"),
    ("quant_mix", {"mix_groups": ["attn_z"]}, r"unknown tensor group\(s\) \['attn_z'\]"),
    ("quant_mix", {"mix_types": ["Q5_K", "Q7_K"]}, "Q7_K"),
    ("quant_mix", {"base_type": "IQ2_XXS"}, "need an importance matrix"),
    ("quant_mix", {"target_bpw": -1.0}, "search.target_bpw must be a positive"),
    ("zfp", {"zfp_dims": [9]}, r"search.zfp_dims \[9\]"),
    ("zfp", {"zfp_rates": [0.0]}, "rate must be a positive number"),
    ("zfp", {"zfp_modes": ["lossy"]}, "unknown ZFP mode"),
    ("bub", {"bub_min_log2": 8, "bub_max_log2": 5}, "search.bub_min_log2 .8. must be between 0 and"),
    ("bub", {"bub_chunks": 0}, "search.bub_chunks must be at least 1"),
])
def test_bad_search_settings_are_refused_before_any_work(name, values, message):
    search = make_search(search_config(name, **values))
    with pytest.raises(UserError, match=message):
        search.validate()


def test_grids_are_what_each_search_promises(tiny_model):
    facts = SearchFacts(model_path=str(tiny_model), n_layer=2, n_ctx=128, n_calib=3)
    quiet = dict(log=lambda _: None)
    qt = make_search(search_config("quant_types", types=["Q8_0", "Q4_0"], imatrix=True)).prepare(facts, **quiet)
    assert qt.grid() == [{"ftype": "Q8_0", "imatrix_chunks": 3}, {"ftype": "Q4_0", "imatrix_chunks": 3}]
    im = make_search(search_config("imatrix_size", imatrix_chunks=[2, 1, 2])).prepare(facts, **quiet)
    assert [c["imatrix_chunks"] for c in im.grid()] == [0, 1, 2]
    with pytest.raises(UserError, match=r"imatrix sizes \[8\] exceed the 3 calibration chunks"):
        make_search(search_config("imatrix_size", imatrix_chunks=[8])).prepare(facts, **quiet)
    z = make_search(search_config("zfp", zfp_modes=["rate", "reversible"], zfp_rates=[4.0, 8.0], zfp_dims=[1, 2]))
    pts = {(p["zfp_mode"], p["zfp_value"], p["zfp_dims"]) for p in z.prepare(facts, **quiet).grid()}
    assert pts == {("rate", 4.0, 1), ("rate", 8.0, 1), ("rate", 4.0, 2), ("rate", 8.0, 2),
                   ("reversible", None, 1), ("reversible", None, 2)}
    # bub: powers of two from 2**5 up to n_ctx=128, ubatch <= batch (all fit the memory guard here)
    b = make_search(search_config("bub", bub_min_log2=5, bub_max_log2=9)).prepare(facts, **quiet)
    sizes = [32, 64, 128]
    assert [(c["n_batch"], c["n_ubatch"]) for c in b.grid()] == [(x, u) for x in sizes for u in sizes if u <= x]
    assert b.start_points() == [{"batch_level": 2, "ubatch_level": 2}]  # llama.cpp's default at n_ctx 128


def test_a_mix_over_the_budget_is_planned_down_to_one_that_fits(tiny_model):
    from ggufopt_ray.engine.quantize import quantize_model

    facts = SearchFacts(model_path=str(tiny_model), n_layer=2, n_ctx=128, n_calib=0)
    mix = make_search(search_config("quant_mix", base_type="Q4_K_M", mix_types=["Q5_K", "Q8_0"],
                                    target_bpw_over_base=0.3)).prepare(facts, log=lambda _: None)
    base = quantize_model(tiny_model, "Q4_K_M", dry_run=True, threads=1).bits_per_weight
    assert mix.target_bpw == pytest.approx(round(base + 0.3, 4))
    greedy = {f"mix_{g}": "Q8_0" for g in mix.cfg.mix_groups}
    plan = mix.plan({"ftype": "Q4_K_M", "n_layer": 2, "imatrix_chunks": 0, **greedy})
    assert plan.fitted and plan.sampled_label != plan.label
    # the fitted mix fits by llama.cpp's own dry run, the sampled one did not
    real = quantize_model(tiny_model, "Q4_K_M", dry_run=True, threads=1, tensor_types=list(plan.recipe.overrides))
    assert real.bits_per_weight <= mix.target_bpw
    assert mix.over_budget(plan) is None
    sampled = make_search(search_config("quant_mix", base_type="Q4_K_M", mix_types=["Q5_K", "Q8_0"]))
    unfitted = sampled.prepare(facts, log=lambda _: None).plan(
        {"ftype": "Q4_K_M", "n_layer": 2, "imatrix_chunks": 0, **greedy}).recipe
    over = quantize_model(tiny_model, "Q4_K_M", dry_run=True, threads=1, tensor_types=list(unfitted.overrides))
    assert over.bits_per_weight > mix.target_bpw
