"""``search=quant_mix``: per-tensor mixes on top of a base type, under a size budget.

A trial config holds one choice per tensor group (``mix_<group>``: a type or ``base``). The budget
is fixed (``target_bpw``) or relative to the base type's own size on this model
(``target_bpw_over_base``), resolved once in :meth:`QuantMix.prepare` by dry runs; a sampled mix
over it is stepped down to the nearest mix that fits (see :mod:`ggufopt_ray.mixes` for why
repair beats rejection), and the final mix is checked by a real dry run before any quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.engine.quantize import quantize_model, resolve_tensor_type
from ggufopt_ray.errors import UserError
from ggufopt_ray.mixes import KEEP, MixSizer, check_mix_groups, fit_mix, mix_overrides
from ggufopt_ray.searches.base import Search, TrialPlan, check_quant_types, register_search

OVER_BUDGET_PENALTY = 1e3  # added to the objective of a candidate over the budget: never preferred


@dataclass
class QuantMixConfig(SearchConfig):
    name: str = "quant_mix"
    base_type: str = "Q4_K_M"  # the plain type the mixes start from
    mix_types: list[str] = field(default_factory=lambda: ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
    mix_groups: list[str] = field(default_factory=lambda: [  # tensor groups a mix may change
        "attn_v", "attn_k", "attn_qo", "ffn_down", "ffn_up_gate", "output", "token_embd",
        "first_layers", "last_layers"])
    target_bpw: Optional[float] = None  # size budget in bits per weight
    # with target_bpw null: the base type's own size on this model plus this many bits per weight
    target_bpw_over_base: Optional[float] = None
    imatrix: bool = False


def space_quant_mix(trial, base_type: str, mix_types: list[str], n_layer: int, imatrix_chunks: int,
                    groups: list[str]):
    choices = [KEEP] + list(mix_types)
    for group in groups:
        trial.suggest_categorical(f"mix_{group}", choices)
    return {"ftype": base_type, "n_layer": n_layer, "imatrix_chunks": imatrix_chunks}


@register_search
class QuantMix(Search):
    name = "quant_mix"
    config_class = QuantMixConfig
    about = "per-tensor mixes (search.mix_groups x search.mix_types) on search.base_type under a size budget"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.target_bpw: float | None = cfg.target_bpw
        self.sizer: MixSizer | None = None

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        check_mix_groups(c.mix_groups)
        check_quant_types([c.base_type], imatrix=c.imatrix, key="search.base_type")
        if not c.mix_types:
            raise UserError("search.mix_types is empty; list the tensor types a mix may use, e.g. [Q5_K,Q6_K]")
        for t in c.mix_types:
            resolve_tensor_type(t, "search.mix_types entry")
        if c.target_bpw is not None and not c.target_bpw > 0:
            raise UserError(f"search.target_bpw must be a positive number of bits per weight, not {c.target_bpw}")

    # -- budget --------------------------------------------------------------------------------------
    def prepare(self, facts, log=print):
        super().prepare(facts, log)
        if self.cfg.imatrix and facts.n_calib < 1:
            raise UserError("search.imatrix=true needs calibration chunks; set dataset.calib_chunks > 0")
        self.sizer = MixSizer.for_model(facts.model_path, self.cfg.base_type)
        budget = self._resolve_budget()
        if budget is not None:
            self.target_bpw = budget["target_bpw"]
            self.notes["size_budget"] = budget
            log(f"budget   {self.cfg.base_type} is {budget['base_bpw']:.3f} bpw on this model; "
                f"mixes up to {budget['target_bpw']:.3f} bpw")
        return self

    def _resolve_budget(self) -> dict | None:
        """The size budget on this model in bits per weight (``None`` without one).

        A plain type's size depends on the model (output and embedding matrices weigh more in
        small models: Q4_K_M is 5.0 bpw on the tiny model, 5.23 on a 7M-parameter one), so the
        budget can be given relative to the base type. A budget that no mix can meet is refused
        here, by exact sizes that take milliseconds, rather than after every trial was rejected.
        """
        c = self.cfg
        if c.target_bpw is None and c.target_bpw_over_base is None:
            return None
        base = self._dry_bpw(())
        target = float(c.target_bpw if c.target_bpw is not None else round(base + float(c.target_bpw_over_base), 4))
        if target < base:
            smallest = min([base] + [self._dry_bpw(mix_overrides({f"mix_{g}": t for g in c.mix_groups},
                                                                 self.facts.n_layer))
                                     for t in c.mix_types])
            if target < smallest:
                raise UserError(f"search.target_bpw={target:g} is below the smallest mix of {c.base_type} with "
                                f"{list(c.mix_types)} on this model ({smallest:.3f} bpw; the base type alone is "
                                f"{base:.3f}); raise search.target_bpw, or add smaller search.mix_types, or pick a "
                                "smaller search.base_type")
        return {"base_type": c.base_type, "base_bpw": round(base, 4), "target_bpw": target}

    def _dry_bpw(self, overrides) -> float:
        return quantize_model(self.facts.model_path, self.cfg.base_type, dry_run=True, threads=1,
                              tensor_types=list(overrides) or None).bits_per_weight

    # -- configs -------------------------------------------------------------------------------------
    def _imatrix_chunks(self) -> int:
        return self.facts.n_calib if self.cfg.imatrix else 0

    def grid(self) -> list[dict]:
        """The plain base type, then each tensor group raised to each of the mix types on its own."""
        c, n_layer, imx = self.cfg, self.facts.n_layer, self._imatrix_chunks()
        out = [{"ftype": c.base_type, "n_layer": n_layer, "imatrix_chunks": imx}]
        for group in c.mix_groups:
            for t in c.mix_types:
                out.append({"ftype": c.base_type, "n_layer": n_layer, f"mix_{group}": t, "imatrix_chunks": imx})
        return out

    def space(self):
        c = self.cfg
        return partial(space_quant_mix, base_type=c.base_type, mix_types=list(c.mix_types),
                       n_layer=self.facts.n_layer, imatrix_chunks=self._imatrix_chunks(), groups=list(c.mix_groups))

    def start_points(self) -> list[dict]:
        """The plain base type first: the reference every mix must beat."""
        return [{f"mix_{g}": KEEP for g in self.cfg.mix_groups}]

    # -- one trial -----------------------------------------------------------------------------------
    def _recipe(self, config: dict) -> Recipe:
        return Recipe(kind="quant", ftype=str(config.get("ftype") or self.cfg.base_type),
                      overrides=mix_overrides(config, int(config.get("n_layer", self.facts.n_layer))),
                      imatrix_chunks=int(config.get("imatrix_chunks") or 0))

    def plan(self, config: dict) -> TrialPlan:
        """The sampled mix, stepped down to the nearest one that fits the budget when it is over."""
        sampled = self._recipe(config).label()
        choice = {k: v for k, v in config.items() if k.startswith("mix_")}
        if self.target_bpw is not None and choice:
            n_layer = int(config.get("n_layer", self.facts.n_layer))
            fitted = fit_mix(choice, list(self.cfg.mix_types),
                             lambda ch: self.sizer.bits_per_weight(mix_overrides(ch, n_layer)), float(self.target_bpw))
            if fitted is not None:
                config = {**config, **fitted}
        return TrialPlan(self._recipe(config), sampled)

    def over_budget(self, plan: TrialPlan) -> dict | None:
        """A real dry run of the final mix has the last word on its size (before any quantization)."""
        r = plan.recipe
        if self.target_bpw is None or r.imatrix_chunks:
            return None
        dry = quantize_model(self.facts.model_path, r.ftype, dry_run=True, tensor_types=list(r.overrides) or None,
                             output_type=r.output_type, embd_type=r.embd_type, pure=r.pure, threads=1)
        if dry.bits_per_weight > self.target_bpw:
            return {"bits_per_weight": dry.bits_per_weight, "size_bytes": dry.size_bytes}
        return None

    def objective(self, summary: dict, bits_per_weight: float) -> float:
        value = super().objective(summary, bits_per_weight)
        if self.target_bpw is not None and bits_per_weight > self.target_bpw:
            value += OVER_BUDGET_PENALTY
        return value
