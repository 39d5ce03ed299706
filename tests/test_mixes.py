"""Mix sizes by arithmetic equal llama.cpp's dry runs; over-budget mixes are fitted, not wasted."""

from __future__ import annotations

import random

import pytest

from ggufopt_ray.mixes import mix_overrides
from ggufopt_ray.engine.quantize import quantize_model
from ggufopt_ray.mixes import KEEP, MixSizer, fit_mix

GROUPS = ["attn_v", "attn_k", "attn_qo", "ffn_down", "ffn_up_gate", "output", "token_embd",
          "first_layers", "last_layers"]
TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q3_K", "Q4_0"]


@pytest.fixture(scope="module")
def sizer(tiny_model):
    return MixSizer.for_model(tiny_model, "Q4_K_M")


def test_sizes_equal_llama_cpp_dry_runs(tiny_model, sizer):
    rng = random.Random(0)
    for _ in range(8):
        choice = {f"mix_{g}": rng.choice([KEEP, *TYPES]) for g in GROUPS}
        overrides = list(mix_overrides(choice, 2))
        plan = quantize_model(tiny_model, "Q4_K_M", dry_run=True, threads=1, tensor_types=overrides or None)
        assert sizer.tensor_types(overrides) == plan.tensor_types
        assert sizer.bits_per_weight(overrides) == pytest.approx(plan.bits_per_weight, rel=1e-12)
    assert sizer.bits_per_weight(()) == pytest.approx(
        quantize_model(tiny_model, "Q4_K_M", dry_run=True, threads=1).bits_per_weight, rel=1e-12)


def test_fit_steps_a_mix_down_until_it_fits(sizer):
    def size(choice):
        return sizer.bits_per_weight(mix_overrides({f"mix_{g}": t for g, t in choice.items()}, 2))

    base = size({g: KEEP for g in GROUPS})
    rich = {g: "Q8_0" for g in GROUPS}
    assert size(rich) > base + 1
    for target in (base + 1.0, base + 0.3, base):
        fitted = fit_mix(rich, ["Q4_K", "Q5_K", "Q6_K", "Q8_0"], size, target)
        assert fitted is not None and size(fitted) <= target
        # nearest: no single step back up toward the sampled mix would still fit
        for g in GROUPS:
            if fitted[g] != rich[g]:
                assert size({**fitted, g: rich[g]}) > target
    small = {g: "Q4_K" for g in GROUPS}
    assert fit_mix(small, ["Q4_K"], size, size(small)) == small  # fits: unchanged
    smallest = min(size({g: t for g in GROUPS}) for t in ["Q4_K", KEEP])
    assert fit_mix(rich, ["Q4_K", "Q8_0"], size, smallest - 0.01) is None  # nothing fits
