"""``search=allocate``: every size class's best per-tensor mix, from measured sensitivities.

Round 0 measures, as parallel trials, the stock types of the size classes and every tensor group
(tensor kind x band of layers, ``token_embd``, ``output``; MoE experts are kinds of their own) at
every candidate type, one group at a time, on top of ``base_type`` — down as well as up. The
measured change of mean KLD per (group, type) makes an additive predictor of any mix's KLD; sizes
are exact (one dry run, :class:`~ggufopt_ray.mixes.MixSizer`). The multiple-choice knapsack is
solved exactly for every budget at once (:mod:`ggufopt_ray.allocate.knapsack`), the most
promising frontier points are measured for real, the predictor is corrected with what was
measured (:mod:`ggufopt_ray.allocate.predictor` says how interactions are modelled), and rounds
repeat until the measured frontier stops improving (:mod:`ggufopt_ray.allocate.loop`).

What comes out: per size class (the stock types' sizes on this model, or bits per weight), the
best *measured* candidate that fits, its ``--tensor-type-file`` and the llama-quantize command
that reproduces it, a model-card table, and predicted-vs-measured agreement (Spearman, relative
error) in ``allocation.json``. Measurements are cached like every candidate's (results stores per
baseline and recipe), so a second run measures nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggufopt_ray.allocate.groups import KEEP, build_groups, overrides_for
from ggufopt_ray.allocate.loop import allocate_loop
from ggufopt_ray.allocate.predictor import MixTable
from ggufopt_ray.allocate.recommend import (Candidate, SizeClass, llama_quantize_command, model_card_table,
                                            recommend, tensor_type_file_text)
from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.engine.quantize import resolve_file_type, resolve_tensor_type
from ggufopt_ray.errors import UserError
from ggufopt_ray.mixes import MixSizer
from ggufopt_ray.searches.base import Search, TrialPlan, check_quant_types, register_search

_NOT_QUANTIZED = {"F32", "F16", "BF16"}
_NEEDS_DATA = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}  # per-tensor importance data required


@dataclass
class AllocateConfig(SearchConfig):
    name: str = "allocate"
    base_type: str = "Q4_K_M"  # the stock type the mixes start from (the reference of every ΔKLD)
    types: list[str] = field(default_factory=lambda: ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"])
    sizes: list[str] = field(default_factory=lambda: ["Q3_K_M", "Q4_K_M", "Q5_K_M"])  # stock types or bpw
    size_tolerance: float = 0.005  # a mix may be this much larger than its size class
    n_bands: int = 4  # bands of consecutive layers per tensor kind
    imatrix: bool = False  # every candidate with the importance matrix of all calibration chunks
    max_measurements: int = 12  # mixes the allocation loop measures after the sensitivities
    per_round: int = 0  # mixes per round (0: one per size class plus two spread along the frontier)


@register_search
class Allocate(Search):
    name = "allocate"
    config_class = AllocateConfig
    about = "per-group sensitivities, then exact knapsack allocation for every size class, checked by measurement"

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        if c.mode != "grid":
            raise UserError("search=allocate chooses its own candidates; use search.mode=grid")
        check_quant_types([c.base_type], imatrix=c.imatrix, key="search.base_type")
        if not c.types:
            raise UserError("search.types is empty; list the tensor types a group may take, e.g. [Q3_K,Q5_K,Q8_0]")
        for t in c.types:
            name, _ = resolve_tensor_type(t, "search.types entry")
            if name.startswith("IQ") and not c.imatrix:
                raise UserError(f"search.types has {name}, which needs an importance matrix; set search.imatrix=true")
        if not c.sizes:
            raise UserError("search.sizes is empty; name stock types (Q4_K_M) or bits per weight (4.5)")
        for s in c.sizes:
            _size_spec(s)
        if not 0 <= c.size_tolerance < 0.2:
            raise UserError(f"search.size_tolerance must be in [0, 0.2), not {c.size_tolerance}")
        if c.n_bands < 1 or c.max_measurements < 0 or c.per_round < 0:
            raise UserError("search.n_bands must be >= 1, search.max_measurements and search.per_round >= 0")

    # -- preparation -----------------------------------------------------------------------------
    def prepare(self, facts, log=print):
        super().prepare(facts, log)
        c = self.cfg
        if c.imatrix and facts.n_calib < 1:
            raise UserError("search.imatrix=true needs calibration chunks; set dataset.calib_chunks > 0")
        self.sizer = MixSizer.for_model(facts.model_path, c.base_type)
        quantizable = [n for n, t in self.sizer.base_types.items() if t not in _NOT_QUANTIZED]
        self.groups = build_groups(quantizable, facts.n_layer, c.n_bands)
        self.types = [resolve_tensor_type(t)[0] for t in c.types]
        grouped = {t for g in self.groups for t in g.tensors}
        self.fixed_bytes = sum(self.sizer.tensor_bytes(n, t) for n, t in self.sizer.base_types.items()
                               if n not in grouped)
        self.columns = [KEEP] + self.types
        self.nbytes = np.zeros((len(self.groups), len(self.columns)), dtype=np.int64)
        self.same_as_base: set[tuple[str, str]] = set()
        self.not_allowed: set[tuple[str, str]] = set()
        for gi, g in enumerate(self.groups):
            for ti, t in enumerate(self.columns):
                chosen = self.sizer.base_types if t == KEEP else self.sizer.tensor_types([g.override(t)])
                self.nbytes[gi, ti] = sum(self.sizer.tensor_bytes(n, chosen[n]) for n in g.tensors)
                if t != KEEP and all(chosen[n] == self.sizer.base_types[n] for n in g.tensors):
                    self.same_as_base.add((g.name, t))  # the reference itself: nothing to measure
                if t in _NEEDS_DATA and g.kind in ("token_embd", "output"):
                    self.same_as_base.discard((g.name, t))
                    self.not_allowed.add((g.name, t))  # never has importance data: llama.cpp would abort
        self.size_classes = []
        for s in c.sizes:
            kind, value = _size_spec(s)
            if kind == "type":
                stock = MixSizer.for_model(facts.model_path, value).total_bytes(())
                name = f"{value}-sized"
            else:
                stock = int(value * self.sizer.n_params / 8)
                name = f"{value:g} bpw"
            self.size_classes.append(SizeClass(name, int(stock * (1 + c.size_tolerance))))
        self.stock_types = list(dict.fromkeys([c.base_type] + [v for k, v in map(_size_spec, c.sizes) if k == "type"]))
        n_single = len(self.groups) * len(self.types) - len(self.same_as_base) - len(self.not_allowed)
        self.notes["allocate"] = {"groups": [g.name for g in self.groups], "types": self.types,
                                  "size_classes": [{"name": s.name, "max_bytes": s.max_bytes} for s in self.size_classes],
                                  "single_group_candidates": n_single}
        log(f"allocate {len(self.groups)} tensor groups x {len(self.types)} types: {n_single} sensitivity "
            f"candidates, then up to {c.max_measurements} mixes for {len(self.size_classes)} size classes")
        return self

    def _imatrix_chunks(self) -> int:
        return self.facts.n_calib if self.cfg.imatrix else 0

    # -- candidates ------------------------------------------------------------------------------
    def grid(self) -> list[dict]:
        out = [{"kind": "stock", "ftype": t} for t in self.stock_types]
        for g in self.groups:
            for t in self.types:
                if (g.name, t) not in self.same_as_base and (g.name, t) not in self.not_allowed:
                    out.append({"kind": "single", "group": g.name, "type": t})
        return out

    def space(self):
        raise UserError("search=allocate has no Optuna space; use search.mode=grid")

    def plan(self, config: dict) -> TrialPlan:
        imx = self._imatrix_chunks()
        kind = config.get("kind")
        if kind == "stock":
            recipe = Recipe(kind="quant", ftype=str(config["ftype"]), imatrix_chunks=imx)
            return TrialPlan(recipe, recipe.label(), recipe.label())
        if kind == "single":
            choice = {str(config["group"]): str(config["type"])}
            name = f"{self.cfg.base_type}[{config['group']}={config['type']}]"
        elif kind == "mix":
            choice = {g: t for g, t in json.loads(config["mix"]).items() if t != KEEP}
            name = mix_label(self.cfg.base_type, choice, self.bits_per_weight(choice))
        else:
            raise UserError(f"search=allocate cannot run a trial config of kind {kind!r}")
        recipe = Recipe(kind="quant", ftype=self.cfg.base_type, overrides=tuple(overrides_for(self.groups, choice)),
                        imatrix_chunks=imx)
        return TrialPlan(recipe, name, name)

    def bits_per_weight(self, choice: dict) -> float:
        cols = {t: i for i, t in enumerate(self.columns)}
        total = self.fixed_bytes + sum(int(self.nbytes[gi, cols[choice.get(g.name, KEEP)]])
                                       for gi, g in enumerate(self.groups))
        return 8.0 * total / self.sizer.n_params

    def objective(self, summary: dict, bits_per_weight: float) -> float:
        return float(summary.get("kld_mean", math.nan))

    # -- the allocation rounds -------------------------------------------------------------------
    def follow_up(self, rows, run_round, output_dir, log=print) -> None:
        c = self.cfg
        by_label = {r["label"]: r for r in rows if "label" in r}
        base_label = Recipe(kind="quant", ftype=c.base_type, imatrix_chunks=self._imatrix_chunks()).label()
        if base_label not in by_label:
            log(f"allocate the reference {base_label} was not measured; no allocation")
            return
        ref_kld = measured_mean(by_label[base_label])
        singles = {}
        for g in self.groups:
            for t in self.types:
                if (g.name, t) in self.same_as_base:
                    singles[(g.name, t)] = ref_kld
                    continue
                row = by_label.get(f"{c.base_type}[{g.name}={t}]")
                if row is not None and math.isfinite(measured_mean(row)):
                    singles[(g.name, t)] = measured_mean(row)
        table = MixTable.from_measurements([g.name for g in self.groups], self.columns, self.nbytes,
                                           {g.name: KEEP for g in self.groups}, ref_kld, singles, self.fixed_bytes)
        budgets = [s.max_bytes for s in self.size_classes]
        counter = [0]
        every_row = list(rows)

        def measure_batch(mixes: list[dict]) -> list[float]:
            counter[0] += 1
            configs = [{"kind": "mix", "mix": json.dumps({g: t for g, t in m.items() if t != KEEP}, sort_keys=True)}
                       for m in mixes]
            log(f"allocate round {counter[0]}: measuring {len(configs)} mixes")
            more = run_round(configs, f"allocate-{counter[0]}")
            every_row.extend(more)
            got = {r.get("config.mix"): r for r in more}
            return [measured_mean(got[cfg["mix"]]) if cfg["mix"] in got else math.nan for cfg in configs]

        result = allocate_loop(table, budgets, measure_batch=measure_batch, max_measurements=c.max_measurements,
                               per_round=c.per_round or None)
        self.notes["allocate"].update(self._summary(result, table))
        self._recommend(every_row, output_dir, log)

    def _summary(self, result, table) -> dict:
        f = result.frontier
        keep = np.unique(np.linspace(0, len(f) - 1, num=min(len(f), 300)).astype(int)) if len(f) else []
        return {
            "stop_reason": result.stop_reason,
            "reference_kld": table.reference_kld,
            "spearman_predicted_vs_measured": result.overall.spearman,
            "prediction": result.overall.to_dict(), "prediction_additive": result.overall_additive.to_dict(),
            "rounds": [{"round": r.round, "measured": r.n_new, "improved": r.improved,
                        "vs_measured": r.vs_measured.to_dict()} for r in result.rounds],
            "predicted_frontier": [{"bytes": int(f.nbytes[i]), "bits_per_weight": 8.0 * int(f.nbytes[i]) / self.sizer.n_params,
                                    "predicted_kld": float(f.value[i] + table.reference_kld)} for i in keep],
            "measured": [{"mix": m.mix, "bytes": m.nbytes, "bits_per_weight": 8.0 * m.nbytes / self.sizer.n_params,
                          "predicted": m.predicted, "predicted_additive": m.predicted_additive,
                          "measured": m.measured, "round": m.round, "why": m.reason} for m in result.measurements],
        }

    def _recommend(self, rows, output_dir, log) -> None:
        """Per size class the best measured candidate that fits, with its recipe files."""
        model = self.facts.model_path
        cands = []
        for r in rows:
            if not math.isfinite(measured_mean(r)) or not r.get("recipe") or not r.get("bits_per_weight"):
                continue
            recipe = json.loads(r["recipe"])
            # Tensor bytes, as the size classes count them (the file adds its metadata).
            nbytes = int(round(float(r["bits_per_weight"]) * self.sizer.n_params / 8))
            summary = {**r, "kld_mean": measured_mean(r), "kld_mean_se": measured_se(r)}
            cands.append(Candidate.from_summary(r["label"], nbytes, self.sizer.n_params, summary,
                                                overrides=tuple(recipe.get("overrides") or ()),
                                                base_type=recipe.get("ftype") or ""))
        recs = recommend(cands, self.size_classes)
        out = Path(output_dir) / "recipes"
        out.mkdir(parents=True, exist_ok=True)
        listing = []
        for rec in recs:
            cand = rec.candidate
            if cand is None:
                log(f"recommend {rec.size_class.name}: nothing measured fits")
                continue
            entry = {"size_class": rec.size_class.name, "label": cand.label, "bits_per_weight": cand.bits_per_weight,
                     "kld_mean": cand.kld_mean, "kld_mean_se": cand.kld_mean_se}
            stem = rec.size_class.name.replace(" ", "_")
            if cand.overrides:
                path = out / f"{stem}.tensor-types.txt"
                path.write_text(tensor_type_file_text(list(cand.overrides)))
                entry["tensor_type_file"] = str(path)
                entry["command"] = llama_quantize_command(model, f"{Path(model).stem}-{stem}.gguf", cand.base_type,
                                                          tensor_type_file=str(path))
            else:
                entry["command"] = llama_quantize_command(model, f"{Path(model).stem}-{stem}.gguf", cand.base_type)
            listing.append(entry)
            log(f"recommend {rec.size_class.name}: {cand.label} at {cand.bits_per_weight:.3f} bpw, "
                f"mean KLD {cand.kld_mean:.4g}")
        card = model_card_table(recs)
        (out / "model-card.md").write_text(card + "\n")
        self.notes["allocate"]["recommendations"] = listing
        self.notes["allocate"]["model_card"] = card


def measured_mean(row: dict) -> float:
    """A row's mean KLD: the borrowed-strength estimate when the row has one."""
    v = row.get("kld_mean_adj")
    if v is not None and isinstance(v, (int, float)) and math.isfinite(v) and row.get("kld_mean_adj_control"):
        return float(v)
    v = row.get("kld_mean")
    return float(v) if isinstance(v, (int, float)) else math.nan


def measured_se(row: dict) -> float:
    v = row.get("kld_mean_adj_se") if row.get("kld_mean_adj_control") else row.get("kld_mean_se")
    return float(v) if isinstance(v, (int, float)) else math.nan


def mix_label(base_type: str, choice: dict, bpw: float) -> str:
    """A short, unique name for a mix: its size and a hash of its choices."""
    digest = hashlib.sha1(json.dumps(choice, sort_keys=True).encode()).hexdigest()[:6]
    return f"{base_type}-mix{bpw:.3f}-{digest}"


def _size_spec(text) -> tuple[str, object]:
    """``Q4_K_M`` -> ("type", "Q4_K_M"); ``4.5`` -> ("bpw", 4.5)."""
    s = str(text).strip()
    try:
        value = float(s)
    except ValueError:
        return "type", resolve_file_type(s)[0]
    if not 1.0 < value < 33.0:
        raise UserError(f"search.sizes entry {s} is not a plausible size in bits per weight; use e.g. 4.5")
    return "bpw", value
