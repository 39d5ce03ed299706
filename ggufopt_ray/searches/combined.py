"""``search=combined``: quant types with and without an importance matrix, searched together."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.errors import UserError
from ggufopt_ray.searches.base import Search, TrialPlan, check_quant_types, register_search


@dataclass
class CombinedConfig(SearchConfig):
    name: str = "combined"
    types: list[str] = field(default_factory=lambda: ["Q6_K", "Q4_K_M", "IQ4_XS", "Q3_K_M"])


def space_combined(trial, types: list[str], n_calib: int):
    trial.suggest_categorical("ftype", list(types))
    trial.suggest_categorical("imatrix_chunks", sorted({0, n_calib}))
    return {}


@register_search
class Combined(Search):
    name = "combined"
    config_class = CombinedConfig
    about = "each of search.types without and with an importance matrix of all calibration chunks"

    def validate(self) -> None:
        super().validate()
        if not self.cfg.types:
            raise UserError("search.types is empty; list quant types, e.g. search.types=[Q6_K,IQ4_XS]")
        # The no-imatrix half of the grid must be buildable too.
        check_quant_types(self.cfg.types, imatrix=False)

    def grid(self) -> list[dict]:
        return [{"ftype": t, "imatrix_chunks": k} for t in self.cfg.types for k in sorted({0, self.facts.n_calib})]

    def space(self):
        return partial(space_combined, types=list(self.cfg.types), n_calib=self.facts.n_calib)

    def plan(self, config: dict) -> TrialPlan:
        recipe = Recipe(kind="quant", ftype=str(config["ftype"]),
                        imatrix_chunks=int(config.get("imatrix_chunks") or 0))
        return TrialPlan(recipe, recipe.label())
