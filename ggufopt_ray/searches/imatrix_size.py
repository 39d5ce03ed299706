"""``search=imatrix_size``: how many calibration chunks the importance matrix needs.

Each size (and no imatrix, the reference) quantizes ``base_type`` and is judged on the held-out
evaluation chunks; the report recommends the size where growth stops paying
(``imatrix_gain_threshold``, judged among real imatrix sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.engine.quantize import needs_imatrix
from ggufopt_ray.errors import UserError
from ggufopt_ray.searches.base import Search, TrialPlan, check_quant_types, register_search


@dataclass
class ImatrixSizeConfig(SearchConfig):
    name: str = "imatrix_size"
    base_type: str = "IQ4_XS"
    imatrix_chunks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    imatrix_gain_threshold: float = 0.01


def space_imatrix_size(trial, base_type: str, sizes: list[int]):
    trial.suggest_categorical("imatrix_chunks", list(sizes))
    return {"ftype": base_type}


@register_search
class ImatrixSize(Search):
    name = "imatrix_size"
    config_class = ImatrixSizeConfig
    about = "imatrix sizes (search.imatrix_chunks) for search.base_type, with no imatrix as the reference"

    def validate(self) -> None:
        super().validate()
        check_quant_types([self.cfg.base_type], imatrix=True, key="search.base_type")
        bad = [k for k in self.cfg.imatrix_chunks if k < 1]
        if not self.cfg.imatrix_chunks or bad:
            raise UserError(f"search.imatrix_chunks must list positive chunk counts, got {list(self.cfg.imatrix_chunks)}")
        if not 0 <= self.cfg.imatrix_gain_threshold < 1:
            raise UserError(f"search.imatrix_gain_threshold must be in [0, 1), not {self.cfg.imatrix_gain_threshold}")

    def prepare(self, facts, log=print):
        super().prepare(facts, log)
        too_big = [k for k in self._sizes() if k > facts.n_calib]
        if too_big:
            raise UserError(f"imatrix sizes {too_big} exceed the {facts.n_calib} calibration chunks; "
                            "raise dataset.calib_chunks or lower search.imatrix_chunks")
        if needs_imatrix(self.cfg.base_type):
            # The no-imatrix reference cannot be built for such a type; it is left out.
            log(f"note     {self.cfg.base_type} needs an imatrix: no no-imatrix reference row")
        return self

    def _sizes(self) -> list[int]:
        sizes = [k for k in sorted(set(self.cfg.imatrix_chunks)) if k > 0]
        return sizes if needs_imatrix(self.cfg.base_type) else [0] + sizes

    def grid(self) -> list[dict]:
        return [{"ftype": self.cfg.base_type, "imatrix_chunks": k} for k in self._sizes()]

    def space(self):
        return partial(space_imatrix_size, base_type=self.cfg.base_type,
                       sizes=[k for k in self._sizes() if k <= self.facts.n_calib])

    def plan(self, config: dict) -> TrialPlan:
        recipe = Recipe(kind="quant", ftype=str(config.get("ftype") or self.cfg.base_type),
                        imatrix_chunks=int(config.get("imatrix_chunks") or 0))
        return TrialPlan(recipe, recipe.label())

    def finalize_options(self) -> dict:
        return {"imatrix_threshold": self.cfg.imatrix_gain_threshold}
