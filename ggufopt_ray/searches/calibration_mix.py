"""``search=calibration_mix``: which calibration data makes the importance matrix that protects
every language.

The calibration chunks of each language (or data source) are the ingredients. A trial is a
weighting of them (which languages, in which proportions, over how many chunks in total): its
importance matrix is combined from per-language collections (each made once, see
:mod:`ggufopt_ray.calibration`), ``search.base_type`` is quantized with it, and the candidate is
judged on the held-out evaluation chunks of every language. The objective is the mean KLD of the
*worst* language by default (``search.language_objective=mean``: the mean over languages;
``pooled``: all chunks together). No imatrix, English-only (or the first language) and the
uniform mix are always evaluated, so the gain of the best mix is visible against each.

Racing ranks candidates by the pooled statistic, which is not what this search optimises; with
the worst-language objective the trials stop by precision in every language instead.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from functools import partial

from ggufopt_ray.calibration import mix_label, normalize_mix
from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.engine.quantize import needs_imatrix
from ggufopt_ray.errors import UserError
from ggufopt_ray.searches.base import Search, TrialPlan, check_quant_types, register_search

LANGUAGE_OBJECTIVES = {"worst": "worst_language_kld", "mean": "language_mean_kld", "pooled": "kld_mean"}


@dataclass
class CalibrationMixConfig(SearchConfig):
    name: str = "calibration_mix"
    objectives: list[str] = field(default_factory=lambda: ["mean"])
    base_type: str = "Q3_K_S"  # a type that works without an imatrix (the no-imatrix reference)
    language_objective: str = "worst"  # worst | mean | pooled
    mix_levels: list[float] = field(default_factory=lambda: [0.0, 1.0])  # grid: weight levels per language
    mix_chunks: list[int] = field(default_factory=list)  # totals to try; empty: every calibration chunk


def space_calibration_mix(trial, langs: list[str], totals: list[int]):
    for lang in langs:
        trial.suggest_float(f"w_{lang}", 0.0, 1.0)
    trial.suggest_categorical("mix_chunks", list(totals))
    return None


@register_search
class CalibrationMix(Search):
    name = "calibration_mix"
    config_class = CalibrationMixConfig
    about = ("calibration mixes (weights of the calibration languages) for search.base_type's "
             "imatrix, judged per language; no imatrix, English-only and uniform as references")
    by_language = True

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        check_quant_types([c.base_type], imatrix=True, key="search.base_type")
        if needs_imatrix(c.base_type):
            raise UserError(f"search.base_type={c.base_type} cannot be built without an imatrix, so the "
                            "no-imatrix reference is impossible; choose a K-quant, e.g. Q3_K_S or Q4_K_M")
        if c.language_objective not in LANGUAGE_OBJECTIVES:
            raise UserError(f"search.language_objective must be one of {', '.join(LANGUAGE_OBJECTIVES)}, "
                            f"not {c.language_objective!r}")
        levels = list(c.mix_levels)
        if not levels or any(not math.isfinite(v) or v < 0 for v in levels) or max(levels) <= 0:
            raise UserError(f"search.mix_levels {levels} must be weights >= 0 with at least one > 0, "
                            "e.g. [0, 1] or [0, 1, 2]")
        if any(int(k) < 1 for k in c.mix_chunks):
            raise UserError(f"search.mix_chunks {list(c.mix_chunks)} must be positive chunk counts")

    def prepare(self, facts, log=print):
        super().prepare(facts, log)
        langs = sorted(set(facts.calib_langs))
        if facts.n_calib < 1 or not langs:
            raise UserError("search=calibration_mix needs calibration chunks: set dataset.calib_chunks > 0")
        if len(langs) < 2:
            raise UserError(f"search=calibration_mix needs calibration chunks of at least two languages or "
                            f"sources; this dataset has only {langs[0]!r} (list more in dataset.langs)")
        totals = self._totals()
        per_lang = {lang: list(facts.calib_langs).count(lang) for lang in langs}
        self.notes.update({"languages": langs, "calibration_chunks_per_language": per_lang, "mix_totals": totals})
        scarce = {lang: n for lang, n in per_lang.items() if n < max(totals)}
        if scarce:
            log(f"note     single-language mixes of {max(totals)} chunks weight each chunk of "
                f"{', '.join(f'{k} ({v})' for k, v in scarce.items())} more than once "
                "(the proportions are exact; raise dataset.calib_chunks for more distinct text)")
        return self

    # -- the candidates --------------------------------------------------------------------------
    @property
    def langs(self) -> list[str]:
        return sorted(set(self.facts.calib_langs))

    def _totals(self) -> list[int]:
        return sorted({int(k) for k in self.cfg.mix_chunks}) or [int(self.facts.n_calib)]

    def _reference_language(self) -> str:
        return "en" if "en" in self.langs else self.langs[0]

    def _point(self, weights: dict, total: int) -> dict:
        return {"ftype": self.cfg.base_type, "mix_chunks": int(total),
                **{f"w_{lang}": float(weights.get(lang, 0.0)) for lang in self.langs}}

    def references(self, total: int) -> list[dict]:
        """No imatrix, the reference language alone, and the uniform mix."""
        return [self._point({}, total), self._point({self._reference_language(): 1.0}, total),
                self._point({lang: 1.0 for lang in self.langs}, total)]

    def grid(self) -> list[dict]:
        points, seen = [], set()
        for total in self._totals():
            combos = itertools.product(sorted(set(float(v) for v in self.cfg.mix_levels)), repeat=len(self.langs))
            candidates = self.references(total) + [self._point(dict(zip(self.langs, w)), total) for w in combos]
            for point in candidates:
                key = self.plan(point).label
                if key not in seen:
                    seen.add(key)
                    points.append(point)
        return points

    def space(self):
        return partial(space_calibration_mix, langs=self.langs, totals=self._totals())

    def start_points(self) -> list[dict]:
        return [{k: v for k, v in p.items() if k != "ftype"} for p in self.references(self._totals()[-1])]

    def plan(self, config: dict) -> TrialPlan:
        weights = {lang: float(config.get(f"w_{lang}") or 0.0) for lang in self.langs}
        mix = normalize_mix(weights)
        total = int(config.get("mix_chunks") or self._totals()[-1])
        ftype = str(config.get("ftype") or self.cfg.base_type)
        if not mix:
            name = f"{ftype} (no imatrix)"
            return TrialPlan(Recipe(kind="quant", ftype=ftype), name, name=name)
        recipe = Recipe(kind="quant", ftype=ftype, imatrix_chunks=total, imatrix_mix=mix)
        name = f"{ftype} imatrix {mix_label(mix)} ({total} chunks)"
        return TrialPlan(recipe, name, name=name)

    # -- judging ---------------------------------------------------------------------------------
    def objective(self, summary: dict, bits_per_weight: float) -> float:
        key = LANGUAGE_OBJECTIVES[self.cfg.language_objective]
        value = summary.get(key)
        if value is None or not math.isfinite(float(value)):
            value = summary.get("kld_mean", math.nan)  # one language seen so far
        return float(value)

    def races(self) -> bool:
        return self.cfg.language_objective == "pooled"

    def stops_per_language(self) -> bool:
        return self.cfg.language_objective != "pooled"

    def value_of(self, row: dict) -> dict:
        """The objective of a finished row with its standard error (chunks as sampling units)."""
        key = LANGUAGE_OBJECTIVES[self.cfg.language_objective]
        langs = {d["lang"]: d for d in json.loads(row.get("languages") or "[]")}
        if key == "worst_language_kld":
            se = langs.get(row.get("worst_language"), {}).get("kld_mean_chunk_se", math.nan)
        elif key == "language_mean_kld":
            ses = [d.get("kld_mean_chunk_se", math.nan) for d in langs.values()]
            se = math.sqrt(sum(x * x for x in ses)) / len(ses) if ses else math.nan
        else:
            se = row.get("kld_mean_chunk_se", math.nan)
        return {"label": row["label"], "value": float(row[key]), "se": float(se),
                "worst_language": row.get("worst_language", "")}

    def finish(self, rows: list[dict], t0: float) -> dict:
        """The answer in sweep.json: each reference and the best mix, by the objective, with SEs."""
        key = LANGUAGE_OBJECTIVES[self.cfg.language_objective]
        done = [r for r in rows if r.get("stop_reason") not in ("error", "over_size_budget")
                and r.get(key) is not None and math.isfinite(float(r.get(key)))]
        if not done:
            return {}
        best = min(done, key=lambda r: float(r[key]))
        by_label = {r["label"]: r for r in done}
        total = self._totals()[-1]
        refs = {}
        for name, point in zip(("no_imatrix", "reference_language", "uniform"), self.references(total)):
            row = by_label.get(self.plan(point).label)
            if row is not None:
                refs[name] = self.value_of(row)
        single = {lang: self.value_of(by_label[label]) for lang in self.langs
                  if (label := self.plan(self._point({lang: 1.0}, total)).label) in by_label}
        out = {"objective": key, "best": self.value_of(best), "references": refs, "single_languages": single}
        uniform = refs.get("uniform")
        if uniform and uniform["value"] > 0:
            out["gain_vs_uniform"] = 1.0 - float(best[key]) / uniform["value"]
        return out

    def summary_lines(self, notes: dict) -> list[str]:
        if not notes.get("best"):
            return []
        what = {"worst_language_kld": "worst-language mean KLD", "language_mean_kld": "mean KLD over languages",
                "kld_mean": "mean KLD"}[notes["objective"]]
        b = notes["best"]
        lines = [f"calib    best mix {b['label']}: {what} {b['value']:.4g} ± {b['se']:.2g}"
                 + (f" ({b['worst_language']})" if b.get("worst_language") else "")]
        for name, ref in notes["references"].items():
            lines.append(f"calib    {name.replace('_', ' '):18} {ref['label']}: {ref['value']:.4g} ± {ref['se']:.2g}")
        if "gain_vs_uniform" in notes:
            gain = 100 * notes["gain_vs_uniform"]
            lines.append(f"calib    best vs uniform: {abs(gain):.1f}% {'lower' if gain >= 0 else 'higher'} {what}")
        return lines
