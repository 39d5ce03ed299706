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
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggufopt_ray.allocate.groups import KEEP, build_groups, overrides_for
from ggufopt_ray.allocate.knapsack import cells_of_best, pareto_frontier
from ggufopt_ray.allocate.loop import allocate_loop
from ggufopt_ray.allocate.paired import chunk_means, paired_mean, reference_mean
from ggufopt_ray.allocate.predictor import Correction, MixTable, compare
from ggufopt_ray.allocate.recommend import (Candidate, SizeClass, llama_quantize_command, model_card_table,
                                            quantize_script, recommend, tensor_type_file_text)
from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.engine.quantize import resolve_file_type, resolve_tensor_type
from ggufopt_ray.errors import UserError
from ggufopt_ray.mixes import MixSizer
from ggufopt_ray.searches.base import Search, TrialPlan, check_quant_types, register_search, superseded

_NOT_QUANTIZED = {"F32", "F16", "BF16"}
_SCALES = {1.0: "KLDs", 0.5: "square roots of KLDs", 0.0: "log KLDs"}  # link power -> what adds
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
    # local_bases: a size class named by a stock type (Q5_K_M) is also allocated around that type:
    # each group's neighbouring types (local_steps below and above) are measured on top of it, so
    # the prediction near that size is a local one, not an extrapolation from base_type. Off by
    # default for its cost: on tinycode-a (30 groups, 7 types) about twice the evaluated chunks
    # (3,070 against ~1,400), for a Q5_K_M-sized file at 0.81x stock's KLD (0.83x held out) where
    # base_type alone found none better than stock. Two steps, because one step each side found
    # 0.88-0.89x: the best mixes take IQ4_XS (two below Q5_K) for some FFN groups.
    local_bases: bool = False
    local_steps: int = 2
    # refine_rounds: before the loop, the singles that the predicted best mix of each size class
    # uses are measured again on every chunk (racing had stopped them after a few), and the
    # knapsack solved again; up to this many times, while it picks cells not yet on every chunk.
    refine_rounds: int = 2
    # link_powers: the Box-Cox scales on which single-group changes may add (allocate/predictor.py);
    # the first until enough mixes are measured, then the one that fits them best.
    link_powers: list[float] = field(default_factory=lambda: [0.5, 1.0, 0.0])
    # confirm: the best this many measured files of each size class are measured on every chunk
    # before the recommendation (0: recommend from the measurements as they stopped)
    confirm: int = 3


@dataclass
class BaseTable:
    """One base type's view of the groups: exact bytes per (group, type), and which cells to measure.

    ``allowed[g]`` are the types group ``g`` may take on this base: all of the search's types on
    ``base_type``; on a size class's own stock type, the ``local_steps`` nearest by bytes below and
    above the group's size in that type (a local table: the knapsack near that size moves each
    group a step or two, and those steps are measured, not extrapolated)."""

    base: str
    sizer: MixSizer
    groups: list
    nbytes: np.ndarray  # int64 [G, 1 + types]: KEEP (the base's own choice), then each type
    fixed_bytes: int
    allowed: dict[str, list[str]]
    same_as_base: set = field(default_factory=set)  # (group, type) cells equal to the base: not measured

    @classmethod
    def build(cls, model_path: str, base: str, types: list[str], n_layer: int, n_bands: int,
              local_steps: int | None = None) -> "BaseTable":
        sizer = MixSizer.for_model(model_path, base)
        quantizable = [n for n, t in sizer.base_types.items() if t not in _NOT_QUANTIZED]
        groups = build_groups(quantizable, n_layer, n_bands)
        grouped = {t for g in groups for t in g.tensors}
        fixed = sum(sizer.tensor_bytes(n, t) for n, t in sizer.base_types.items() if n not in grouped)
        columns = [KEEP] + list(types)
        nbytes = np.zeros((len(groups), len(columns)), dtype=np.int64)
        same, allowed = set(), {}
        for gi, g in enumerate(groups):
            for ti, t in enumerate(columns):
                chosen = sizer.base_types if t == KEEP else sizer.tensor_types([g.override(t)])
                nbytes[gi, ti] = sum(sizer.tensor_bytes(n, chosen[n]) for n in g.tensors)
                if t != KEEP and all(chosen[n] == sizer.base_types[n] for n in g.tensors):
                    same.add((g.name, t))  # the base itself: nothing to measure
            ok = [t for t in types if not (t in _NEEDS_DATA and g.kind in ("token_embd", "output"))]
            if local_steps is not None:
                keep = int(nbytes[gi, 0])
                by_size = sorted(ok, key=lambda t: int(nbytes[gi, columns.index(t)]))
                below = [t for t in by_size if int(nbytes[gi, columns.index(t)]) < keep and (g.name, t) not in same]
                above = [t for t in by_size if int(nbytes[gi, columns.index(t)]) > keep and (g.name, t) not in same]
                ok = below[-local_steps:] + [t for t in by_size if (g.name, t) in same] + above[:local_steps]
            allowed[g.name] = ok
        return cls(base, sizer, groups, nbytes, fixed, allowed, same)

    def singles(self) -> list[tuple[str, str]]:
        """The (group, type) cells to measure on this base, in group order."""
        return [(g.name, t) for g in self.groups for t in self.allowed[g.name] if (g.name, t) not in self.same_as_base]


@register_search
class Allocate(Search):
    name = "allocate"
    config_class = AllocateConfig
    about = "per-group sensitivities, then exact knapsack allocation for every size class, checked by measurement"
    chunk_values = True  # every KLD the allocator uses is paired with its reference's (allocate/paired.py)

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
        if c.n_bands < 1 or c.max_measurements < 0 or c.per_round < 0 or c.local_steps < 1 or c.refine_rounds < 0 \
                or c.confirm < 0:
            raise UserError("search.n_bands and search.local_steps must be >= 1, search.max_measurements, "
                            "search.per_round, search.refine_rounds and search.confirm >= 0")
        if not c.link_powers or any(not 0.0 <= float(x) <= 1.0 for x in c.link_powers):
            raise UserError(f"search.link_powers must list numbers in [0, 1] (1: KLDs add, 0: log KLDs add), "
                            f"not {list(c.link_powers)}")

    # -- preparation -----------------------------------------------------------------------------
    def prepare(self, facts, log=print):
        super().prepare(facts, log)
        c = self.cfg
        if c.imatrix and facts.n_calib < 1:
            raise UserError("search.imatrix=true needs calibration chunks; set dataset.calib_chunks > 0")
        self.types = [resolve_tensor_type(t)[0] for t in c.types]
        self.link_powers = tuple(float(x) for x in c.link_powers)
        self.columns = [KEEP] + self.types
        primary = BaseTable.build(facts.model_path, c.base_type, self.types, facts.n_layer, c.n_bands)
        self.groups, self.sizer = primary.groups, primary.sizer
        self.size_classes, owners = [], []
        for s in c.sizes:
            kind, value = _size_spec(s)
            if kind == "type":
                stock = MixSizer.for_model(facts.model_path, value).total_bytes(())
                name = f"{value}-sized"
            else:
                stock = int(value * self.sizer.n_params / 8)
                name = f"{value:g} bpw"
            self.size_classes.append(SizeClass(name, int(stock * (1 + c.size_tolerance))))
            owners.append(value if kind == "type" and c.local_bases else c.base_type)
        # One table per base: base_type (every type of every group), and each stock type a size
        # class names (the neighbouring types of each group only). base_type's loop serves every
        # size class; a local base's loop serves its own; the recommendation is the best measured.
        self.bases = {c.base_type: primary}
        for base in dict.fromkeys(owners):
            if base not in self.bases:
                self.bases[base] = BaseTable.build(facts.model_path, base, self.types, facts.n_layer, c.n_bands,
                                                   local_steps=c.local_steps)
        self.budget_owner = owners
        self.stock_types = list(dict.fromkeys([c.base_type] + [v for k, v in map(_size_spec, c.sizes) if k == "type"]))
        n_single = sum(len(b.singles()) for b in self.bases.values())
        self.notes["allocate"] = {"groups": [g.name for g in self.groups], "types": self.types,
                                  "bases": list(self.bases),
                                  "size_classes": [{"name": s.name, "max_bytes": s.max_bytes, "base": o}
                                                   for s, o in zip(self.size_classes, owners)],
                                  "single_group_candidates": n_single}
        log(f"allocate {len(self.groups)} tensor groups x {len(self.types)} types on {', '.join(self.bases)}: "
            f"{n_single} sensitivity candidates, then up to {c.max_measurements} mixes per base for "
            f"{len(self.size_classes)} size classes")
        return self

    def _imatrix_chunks(self) -> int:
        return self.facts.n_calib if self.cfg.imatrix else 0

    # -- candidates ------------------------------------------------------------------------------
    def grid(self) -> list[dict]:
        out = [{"kind": "stock", "ftype": t} for t in self.stock_types]
        for base, table in self.bases.items():
            out += [{"kind": "single", "base": base, "group": g, "type": t} for g, t in table.singles()]
        return out

    def space(self):
        raise UserError("search=allocate has no Optuna space; use search.mode=grid")

    def plan(self, config: dict) -> TrialPlan:
        imx = self._imatrix_chunks()
        kind = config.get("kind")
        if kind == "stock":
            recipe = Recipe(kind="quant", ftype=str(config["ftype"]), imatrix_chunks=imx)
            # A base is the reference its singles and mixes are paired with: it sees every chunk.
            return TrialPlan(recipe, recipe.label(), recipe.label(),
                             every_chunk=recipe.ftype in self.bases or bool(config.get("every_chunk")))
        base = str(config.get("base") or self.cfg.base_type)
        if kind == "single":
            choice = {str(config["group"]): str(config["type"])}
            name = f"{base}[{config['group']}={config['type']}]"
        elif kind == "mix":
            choice = {g: t for g, t in json.loads(config["mix"]).items() if t != KEEP}
            name = mix_label(base, choice, self.bits_per_weight(choice, base))
        else:
            raise UserError(f"search=allocate cannot run a trial config of kind {kind!r}")
        recipe = Recipe(kind="quant", ftype=base, overrides=tuple(overrides_for(self.groups, choice)),
                        imatrix_chunks=imx)
        return TrialPlan(recipe, name, name, every_chunk=bool(config.get("every_chunk")))

    def bits_per_weight(self, choice: dict, base: str | None = None) -> float:
        table = self.bases[base or self.cfg.base_type]
        cols = {t: i for i, t in enumerate(self.columns)}
        total = table.fixed_bytes + sum(int(table.nbytes[gi, cols[choice.get(g.name, KEEP)]])
                                        for gi, g in enumerate(self.groups))
        return 8.0 * total / self.sizer.n_params

    def objective(self, summary: dict, bits_per_weight: float) -> float:
        return float(summary.get("kld_mean", math.nan))

    # -- the allocation rounds -------------------------------------------------------------------
    def follow_up(self, rows, run_round, output_dir, log=print) -> None:
        c = self.cfg
        by_label = {r["label"]: r for r in rows if "label" in r}
        every_row = list(rows)
        counter = [0]
        summaries, refined = {}, {}

        def stock_label(ftype: str) -> str:
            return Recipe(kind="quant", ftype=ftype, imatrix_chunks=self._imatrix_chunks()).label()

        primary_chunks = chunk_means(by_label.get(stock_label(c.base_type), {}))
        for base, bt in self.bases.items():
            # base_type's table spans every size (as without local bases); a local base adds its
            # own size class, where its local prediction is the sharper one.
            budgets = [s.max_bytes for s, o in zip(self.size_classes, self.budget_owner)
                       if o == base or base == c.base_type]
            if not budgets:
                continue
            base_label = stock_label(base)
            if base_label not in by_label:
                log(f"allocate the reference {base_label} was not measured; no allocation from it")
                continue
            reference = chunk_means(by_label[base_label])
            ref_kld = reference_mean(reference) if reference else measured_mean(by_label[base_label])
            table = self._table(bt, by_label, reference, ref_kld)
            for rnd in range(1, c.refine_rounds + 1):
                todo = self._cells_to_refine(table, bt, budgets, by_label, len(reference))
                if not todo:
                    break
                log(f"allocate refine {rnd} ({base}): {len(todo)} single-group candidates the predicted frontier "
                    f"uses at the size classes, now on every chunk")
                refined.setdefault(base, []).extend([g, t] for g, t in todo)
                more = run_round([{"kind": "single", "base": base, "group": g, "type": t, "every_chunk": True}
                                  for g, t in todo], f"allocate-refine-{base}-{rnd}")
                every_row = superseded(every_row, more)
                by_label.update({r["label"]: r for r in more if "label" in r})
                table = self._table(bt, by_label, reference, ref_kld)

            def measure_batch(mixes: list[dict], base=base, reference=reference) -> list[float]:
                counter[0] += 1
                configs = [{"kind": "mix", "base": base,
                            "mix": json.dumps({g: t for g, t in m.items() if t != KEEP}, sort_keys=True)}
                           for m in mixes]
                log(f"allocate round {counter[0]} ({base}): measuring {len(configs)} mixes")
                more = run_round(configs, f"allocate-{counter[0]}")
                every_row.extend(more)
                got = {r.get("config.mix"): r for r in more}
                return [paired_kld(got.get(cfg["mix"]), reference) for cfg in configs]

            result = allocate_loop(table, budgets, measure_batch=measure_batch, max_measurements=c.max_measurements,
                                   per_round=c.per_round or None, fit_options={"link_powers": self.link_powers})
            summaries[base] = (result, table)
        self.notes["allocate"].update(self._summary(summaries))
        self.notes["allocate"]["refined"] = refined
        every_row = self._confirm(every_row, run_round, primary_chunks, log)
        self._recommend(every_row, output_dir, log, primary_chunks)

    def _table(self, bt: BaseTable, by_label: dict, reference: dict, ref_kld: float) -> MixTable:
        """The base's (group, type) table from its singles' rows, each paired with the reference."""
        singles = {}
        for g, t in bt.same_as_base:
            if t in bt.allowed[g]:
                singles[(g, t)] = ref_kld
        for g, t in bt.singles():
            kld = paired_kld(by_label.get(f"{bt.base}[{g}={t}]"), reference)
            if math.isfinite(kld):
                singles[(g, t)] = kld
        return MixTable.from_measurements([g.name for g in self.groups], self.columns, bt.nbytes,
                                          {g.name: KEEP for g in self.groups}, ref_kld, singles, bt.fixed_bytes)

    def _cells_to_refine(self, table: MixTable, bt: BaseTable, budgets: list[int], by_label: dict,
                         n_chunks: int) -> list[tuple[str, str]]:
        """The measured cells the predicted best mix under each budget changes, that are not yet on
        every chunk. Why: a single stopped after a few chunks is noisy, and the knapsack picks
        exactly the cells whose noise made them look best (a winner's curse: on tinycode-a with 30
        groups, over half of the singles were within 2 standard errors of no change)."""
        frontier = pareto_frontier(table.nbytes, Correction(link_power=self.link_powers[0]).delta_table(table),
                                   table.fixed_bytes)
        cells = {(table.groups[g], table.types[t])
                 for g, t in cells_of_best(frontier, budgets, table.reference_index())}
        order = {cell: i for i, cell in enumerate(bt.singles())}
        return sorted((cell for cell in cells if cell in order
                       and len(chunk_means(by_label.get(f"{bt.base}[{cell[0]}={cell[1]}]", {}))) < n_chunks),
                      key=order.get)

    def _summary(self, summaries: dict) -> dict:
        """Every base's loop, and predicted vs measured over all of them (out of sample)."""
        out: dict = {"per_base": {}, "measured": []}
        loop_ms, frontier = [], []
        for base, (result, table) in summaries.items():
            f = result.frontier
            keep = np.unique(np.linspace(0, len(f) - 1, num=min(len(f), 300)).astype(int)) if len(f) else []
            points = [{"bytes": int(f.nbytes[i]), "bits_per_weight": 8.0 * int(f.nbytes[i]) / self.sizer.n_params,
                       "predicted_kld": float(result.correction.transform(f.value[i], table.reference_kld)),
                       "base": base} for i in keep]
            frontier += points
            rows = [{"mix": m.mix, "bytes": m.nbytes, "bits_per_weight": 8.0 * m.nbytes / self.sizer.n_params,
                     "predicted": m.predicted, "predicted_additive": m.predicted_additive, "base": base,
                     "measured": m.measured, "round": m.round, "why": m.reason} for m in result.measurements]
            out["per_base"][base] = {
                "stop_reason": result.stop_reason, "reference_kld": table.reference_kld,
                "correction": {"link_power": result.correction.link_power, "exponent": result.correction.exponent,
                               "log_scale": result.correction.log_scale, "mixes": result.correction.n_points},
                "spearman_predicted_vs_measured": result.overall.spearman, "prediction": result.overall.to_dict(),
                "rounds": [{"round": r.round, "measured": r.n_new, "improved": r.improved,
                            "vs_measured": r.vs_measured.to_dict()} for r in result.rounds]}
            out["measured"].extend(rows)
            loop_ms += [m for m in result.measurements if m.round >= 0]  # as LoopResult.overall counts them
        primary = summaries.get(self.cfg.base_type) or next(iter(summaries.values()), None)
        measured = [m.measured for m in loop_ms]
        overall = compare([m.predicted for m in loop_ms], measured)
        additive = compare([m.predicted_additive for m in loop_ms], measured)
        out.update({
            "stop_reason": "; ".join(f"{b}: {r.stop_reason}" for b, (r, _) in summaries.items()),
            "reference_kld": primary[1].reference_kld if primary else math.nan,
            "spearman_predicted_vs_measured": overall.spearman,
            "prediction": overall.to_dict(), "prediction_additive": additive.to_dict(),
            "rounds": [rd for b in out["per_base"].values() for rd in b["rounds"]],
            "predicted_frontier": sorted(frontier, key=lambda p: p["bytes"]),
        })
        return out

    def summary_lines(self, notes: dict) -> list[str]:
        """How well the predictor did, and on which scale the single-group changes were found to add."""
        a = notes.get("allocate") or {}
        p, add = a.get("prediction") or {}, a.get("prediction_additive") or {}
        if not p.get("n"):
            return []
        lines = [f"allocate predicted vs measured over {p['n']} mixes: Spearman {p['spearman']:.2f}, median "
                 f"relative error {p['median_abs_rel_error']:.1%} (plain sum of the singles: "
                 f"{add.get('median_abs_rel_error', math.nan):.1%})"]
        for base, b in (a.get("per_base") or {}).items():
            c = b.get("correction") or {}
            if "link_power" in c:
                lines.append(f"allocate {base}: single-group changes add as {_SCALES.get(c['link_power'], 'Box-Cox')} "
                             f"(link power {c['link_power']:g}), exponent {c['exponent']:.2f}; {b['stop_reason']}")
        return lines

    def table_rows(self, rows: list[dict]) -> tuple[list[dict], str]:
        """The stock types and the mixes; the single-group measurements (most of the rows, one per
        group and type) are the sensitivity table behind them, left to the results files."""
        shown = [r for r in rows if r.get("config.kind") != "single"]
        n = len(rows) - len(shown)
        return shown, (f"{n} single-group measurements not shown (every row is in results.csv and "
                       f"results.parquet)" if n else "")

    def _candidates(self, rows, reference: dict) -> list[tuple[Candidate, dict]]:
        """Every measured file as a recommendable candidate (its mean KLD paired with ``reference``,
        the base type's ``{chunk: mean KLD}``), with its row."""
        out = []
        for r in rows:
            if not math.isfinite(measured_mean(r)) or not r.get("recipe") or not r.get("bits_per_weight"):
                continue
            recipe = json.loads(r["recipe"])
            # Tensor bytes, as the size classes count them (the file adds its metadata).
            nbytes = int(round(float(r["bits_per_weight"]) * self.sizer.n_params / 8))
            summary = {**r, "kld_mean": paired_kld(r, reference), "kld_mean_se": measured_se(r)}
            out.append((Candidate.from_summary(r["label"], nbytes, self.sizer.n_params, summary,
                                               overrides=tuple(recipe.get("overrides") or ()),
                                               base_type=recipe.get("ftype") or ""), r))
        return out

    def _confirm(self, rows: list[dict], run_round, reference: dict, log) -> list[dict]:
        """The best ``search.confirm`` measured candidates of each size class, on every chunk.

        Why: the loop's mixes stop after a few chunks, and near the top of a size class several
        are within noise of each other; the recommendation (and the KLD a publisher quotes) should
        not be the luckiest of them. Returns ``rows`` with the confirmed rows in place of theirs."""
        n = len(reference)
        if self.cfg.confirm <= 0 or n == 0:
            return rows
        pairs = self._candidates(rows, reference)
        todo = {}
        for sc in self.size_classes:
            fits = sorted((p for p in pairs if p[0].nbytes <= sc.max_bytes), key=lambda p: p[0].kld_mean)
            for cand, row in fits[:self.cfg.confirm]:
                if len(chunk_means(row)) < n:
                    todo[cand.label] = row
        if not todo:
            return rows
        log(f"allocate confirm: {len(todo)} files (the best {self.cfg.confirm} measured of each size class) "
            f"now on every chunk")
        more = run_round([{**{k[len("config."):]: v for k, v in row.items() if k.startswith("config.")},
                           "every_chunk": True} for row in todo.values()], "allocate-confirm")
        self.notes["allocate"]["confirmed"] = sorted(todo)
        return superseded(rows, more)

    def _recommend(self, rows, output_dir, log, reference: dict | None = None) -> None:
        """Per size class the best measured candidate that fits, with its recipe files; means on
        the ``reference``'s chunks (``{chunk: mean KLD}`` of base_type) where a row shares them.

        ``recipes/`` then holds what a publisher needs to write the files again with llama.cpp:
        each file's tensor-type file, the importance matrix it was quantized with (copied from the
        cache), ``quantize.sh`` with one llama-quantize command per file, and the model-card table."""
        model = self.facts.model_path
        pairs = self._candidates(rows, reference or {})
        row_of = {cand.label: row for cand, row in pairs}
        recs = recommend([cand for cand, _ in pairs], self.size_classes)
        out = Path(output_dir) / "recipes"
        out.mkdir(parents=True, exist_ok=True)
        listing = []
        for rec in recs:
            cand = rec.candidate
            if cand is None:
                log(f"recommend {rec.size_class.name}: nothing measured fits")
                continue
            entry = {"size_class": rec.size_class.name, "label": cand.label, "bits_per_weight": cand.bits_per_weight,
                     "kld_mean": cand.kld_mean, "kld_mean_se": cand.kld_mean_se, "base_type": cand.base_type}
            stem = rec.size_class.name.replace(" ", "_")
            type_file = None
            if cand.overrides:
                type_file = out / f"{stem}.tensor-types.txt"
                type_file.write_text(tensor_type_file_text(list(cand.overrides)))
                entry["tensor_type_file"] = str(type_file)
            imatrix = recipe_imatrix(row_of[cand.label], out)
            if imatrix:
                entry["imatrix"] = imatrix
            entry["command"] = llama_quantize_command(model, f"{Path(model).stem}-{stem}.gguf", cand.base_type,
                                                      tensor_type_file=str(type_file) if type_file else None,
                                                      imatrix=imatrix or None)
            listing.append(entry)
            log(f"recommend {rec.size_class.name}: {cand.label} at {cand.bits_per_weight:.3f} bpw, "
                f"mean KLD {cand.kld_mean:.4g}")
        card = model_card_table(recs)
        (out / "model-card.md").write_text(card + "\n")
        script = out / "quantize.sh"
        script.write_text(quantize_script([(f"{e['size_class']}: {e['label']}, {e['bits_per_weight']:.3f} bpw, "
                                            f"mean KLD {e['kld_mean']:.4g}", e["command"]) for e in listing]))
        script.chmod(0o755)
        log(f"recipes  {out}: quantize.sh writes the recommended files with llama-quantize (their tensor-type "
            f"files and importance matrix beside it); model-card.md")
        self.notes["allocate"]["recommendations"] = listing
        self.notes["allocate"]["model_card"] = card


def recipe_imatrix(row: dict, recipes: Path) -> str:
    """The importance matrix a recommended file was quantized with, as ``recipes/`` holds it
    (copied from the cache, named by its hash), or "" when the file used none. When the cache
    file is not on this machine (a trial on a node that shares no disk) the path names it there."""
    src = str(row.get("imatrix_path") or "")
    if not src:
        return ""
    dest = recipes / f"imatrix-{str(row.get('imatrix_hash') or '')[:12]}.gguf"
    if not dest.exists() and Path(src).is_file():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    return str(dest) if dest.exists() else src


def measured_mean(row: dict) -> float:
    """A row's mean KLD: the borrowed-strength estimate when the row has one."""
    v = row.get("kld_mean_adj")
    if v is not None and isinstance(v, (int, float)) and math.isfinite(v) and row.get("kld_mean_adj_control"):
        return float(v)
    v = row.get("kld_mean")
    return float(v) if isinstance(v, (int, float)) else math.nan


def paired_kld(row: dict | None, reference: dict) -> float:
    """A row's mean KLD on the ``reference``'s chunks when they share enough (allocate/paired.py),
    else its own (``measured_mean``); NaN for no row."""
    if row is None:
        return math.nan
    paired = paired_mean(chunk_means(row), reference)
    return measured_mean(row) if paired is None else paired


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
