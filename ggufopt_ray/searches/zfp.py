"""``search=zfp``: ZFP compression of the weights instead of quantization, rate x dims x mode."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial

from ggufopt_ray.candidates import Recipe, zfp_config
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.errors import UserError
from ggufopt_ray.searches.base import Search, TrialPlan, register_search


@dataclass
class ZfpSearchConfig(SearchConfig):
    name: str = "zfp"
    zfp_modes: list[str] = field(default_factory=lambda: ["rate"])
    zfp_rates: list[float] = field(default_factory=lambda: [4.0, 6.0, 8.0, 12.0])
    zfp_dims: list[int] = field(default_factory=lambda: [1, 2])


def space_zfp(trial, modes: list[str], rates: list[float], dims: list[int]):
    mode = trial.suggest_categorical("zfp_mode", list(modes))
    trial.suggest_categorical("zfp_dims", list(dims))
    if mode == "reversible":
        return {"zfp_value": None}
    trial.suggest_float("zfp_value", min(rates), max(rates))
    return {}


@register_search
class Zfp(Search):
    name = "zfp"
    config_class = ZfpSearchConfig
    about = "ZFP-compressed weights: search.zfp_modes x search.zfp_rates x search.zfp_dims"

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        if not c.zfp_modes or not c.zfp_dims or (not c.zfp_rates and set(c.zfp_modes) != {"reversible"}):
            raise UserError("search.zfp_modes, search.zfp_rates and search.zfp_dims must not be empty")
        bad_dims = [d for d in c.zfp_dims if d not in (1, 2, 3, 4)]
        if bad_dims:
            raise UserError(f"search.zfp_dims {bad_dims} are not ZFP layouts; use 1, 2, 3 or 4")
        # Every point of the grid (and, for Optuna, both ends of the rate range) must be a valid
        # ZFP setting: otherwise each trial would fail in the compressor, one after another.
        points = self._points() if c.mode == "grid" else [
            {"zfp_mode": m, "zfp_value": None if m == "reversible" else v, "zfp_dims": d}
            for m in c.zfp_modes for v in (min(c.zfp_rates or [0]), max(c.zfp_rates or [0])) for d in c.zfp_dims]
        for point in points:
            try:
                zfp_config(self.plan(point).recipe).validate()
            except UserError as exc:
                raise UserError(f"search.zfp_*: {exc}") from None

    def _points(self) -> list[dict]:
        c = self.cfg
        out, seen = [], set()
        for mode, value, dims in itertools.product(c.zfp_modes, c.zfp_rates or [None], c.zfp_dims):
            point = {"zfp_mode": mode, "zfp_value": None if mode == "reversible" else value, "zfp_dims": dims}
            key = (point["zfp_mode"], point["zfp_value"], point["zfp_dims"])
            if key not in seen:  # reversible has no parameter: one per dims
                seen.add(key)
                out.append(point)
        return out

    def grid(self) -> list[dict]:
        return self._points()

    def space(self):
        return partial(space_zfp, modes=list(self.cfg.zfp_modes), rates=list(self.cfg.zfp_rates),
                       dims=list(self.cfg.zfp_dims))

    def plan(self, config: dict) -> TrialPlan:
        value = config.get("zfp_value")
        recipe = Recipe(kind="zfp", zfp_mode=str(config["zfp_mode"]),
                        zfp_value=None if value is None else float(value), zfp_dims=int(config.get("zfp_dims", 2)))
        return TrialPlan(recipe, recipe.label())
