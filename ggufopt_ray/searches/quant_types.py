"""``search=quant_types``: every listed llama.cpp file type, judged against the baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.errors import UserError
from ggufopt_ray.searches.base import Search, TrialPlan, check_quant_types, register_search


@dataclass
class QuantTypesConfig(SearchConfig):
    name: str = "quant_types"
    types: list[str] = field(default_factory=lambda: ["Q8_0", "Q6_K", "Q4_K_M", "Q4_0"])
    imatrix: bool = False  # quantize with an importance matrix from all calibration chunks


def space_quant_types(trial, types: list[str], imatrix_chunks: int):
    trial.suggest_categorical("ftype", list(types))
    return {"imatrix_chunks": imatrix_chunks}


@register_search
class QuantTypes(Search):
    name = "quant_types"
    config_class = QuantTypesConfig
    about = "every listed quant type (search.types), optionally with an importance matrix"

    def validate(self) -> None:
        super().validate()
        if not self.cfg.types:
            raise UserError("search.types is empty; list quant types, e.g. search.types=[Q8_0,Q4_K_M]")
        check_quant_types(self.cfg.types, imatrix=self.cfg.imatrix)

    def prepare(self, facts, log=print):
        super().prepare(facts, log)
        if self.cfg.imatrix and facts.n_calib < 1:
            raise UserError("search.imatrix=true needs calibration chunks; set dataset.calib_chunks > 0")
        return self

    def _imatrix_chunks(self) -> int:
        return self.facts.n_calib if self.cfg.imatrix else 0

    def grid(self) -> list[dict]:
        return [{"ftype": t, "imatrix_chunks": self._imatrix_chunks()} for t in self.cfg.types]

    def space(self):
        return partial(space_quant_types, types=list(self.cfg.types), imatrix_chunks=self._imatrix_chunks())

    def plan(self, config: dict) -> TrialPlan:
        recipe = Recipe(kind="quant", ftype=str(config["ftype"]),
                        imatrix_chunks=int(config.get("imatrix_chunks") or 0))
        return TrialPlan(recipe, recipe.label())
