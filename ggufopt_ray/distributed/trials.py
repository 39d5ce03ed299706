"""Ray Tune trials: a search's trial config -> candidate -> chunk-by-chunk evaluation -> reports.

A trial is a plain function (Tune's function API). What to build comes from the search object
(``ctx.search.plan(config)``, see :mod:`ggufopt_ray.searches`); the candidate is built in the
trial, or by a CPU task when that work is pinned to a node group (cached by model fingerprint +
recipe + imatrix hash, so identical candidates are never built twice) and evaluated by the same
chunk loop as ``ggufopt bench`` (:func:`ggufopt_ray.evaluation.evaluate_candidate`) against the
baseline payloads it reads zero-copy from the object store. Running statistics are reported after
every chunk, so a scheduler or the statistical stopping rule can end it; every evaluated chunk is
committed to a per-candidate results store, so a retried or resumed trial continues where it
stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
from ray import tune

from ggufopt_ray.calibration import combine_parts, mix_file_label, mix_label, mix_parts
from ggufopt_ray.candidates import Candidate, Recipe
from ggufopt_ray.config import ClusterConfig, MetricsConfig
from ggufopt_ray.distributed.race import board_entries
from ggufopt_ray.distributed.tasks import (build_candidate_here, build_imatrix_here, build_imatrix_prefixes_here,
                                           fetch_to_local, on_this_node, run_cpu_work, work_threads)
from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.engine.imatrix import load_imatrix
from ggufopt_ray.errors import UserError
from ggufopt_ray.evaluation import EvaluationRun, chunk_id_text, evaluate_candidate, stop_decision, summarize
from ggufopt_ray.metrics.languages import group_by_language, summarize_languages
from ggufopt_ray.metrics.racing import (RaceDecision, RaceEntry, RacingConfig, chunk_order, per_chunk_values,
                                        race_decision)
from ggufopt_ray.searches import Search
from ggufopt_ray.store.results import ResultsStore


@dataclass
class TrialContext:
    """Everything a trial needs besides its config; shipped once through the object store."""

    base_model: str
    model_fp: str
    settings: RuntimeSettings  # the sweep's runtime settings (threads are set per trial)
    tokens: list  # evaluation chunks (int32 arrays)
    baseline_refs: list  # [[ObjectRef]] per chunk
    baseline_id: str
    encoding: str
    first: int
    metrics: MetricsConfig
    search: Search  # prepared: budgets, sizers, ladders resolved on the driver
    cluster: ClusterConfig
    cache_dir: str
    calib_tokens: list = field(default_factory=list)
    calib_fingerprint: str = ""
    calib_langs: list = field(default_factory=list)  # language (or source) of each calibration chunk
    versions: dict = field(default_factory=dict)
    trial_cpus: float = 1.0
    events_path: str = ""  # append-only journal of what ran where (JSON lines)
    langs: list = field(default_factory=list)  # language (or source) of each evaluation chunk
    racing: RacingConfig | None = None  # the racing rule (None: the plain stopping rule, or none)
    board: object = None  # the sweep's RaceBoard actor when racing
    cpu_share: object = None  # the sweep's CpuShare actor when the last trials may take spare CPUs

    def trial_settings(self) -> RuntimeSettings:
        return replace(self.settings, n_threads=max(1, int(self.trial_cpus)))


def log_event(ctx: TrialContext, event: str, **fields) -> None:
    """Append one JSON line to the sweep's event journal (O_APPEND: safe across processes)."""
    if not ctx.events_path:
        return
    rec = {"t": time.time(), "event": event, "pid": os.getpid(), **fields}
    line = (json.dumps(rec, default=str) + "\n").encode()
    fd = os.open(ctx.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _imatrix_path(ctx: TrialContext, n_chunks: int, part: str = "") -> str:
    name = f"{ctx.calib_fingerprint}-{part + '-' if part else ''}{n_chunks}.gguf"
    return str(Path(ctx.cache_dir) / "imatrix" / ctx.model_fp / name)


def _collect(ctx: TrialContext, chunks: list, path: str, name: str, threads: int) -> str:
    """Collect (or find in the cache) the imatrix of ``chunks`` (in this trial or on a CPU task);
    its local path."""
    im = run_cpu_work(ctx.cluster, name, build_imatrix_here, ctx.base_model, chunks, path, ctx.settings.n_ctx,
                      work_threads(ctx.cluster, threads))
    return fetch_to_local(im["path"], im["node_id"])


def _language_prefix(ctx: TrialContext, lang: str, n: int, threads: int) -> str:
    """The local path of the imatrix of ``lang``'s first ``n`` calibration chunks. Every prefix of
    the language is collected in one pass the first time any is asked for (see
    :func:`~ggufopt_ray.distributed.tasks.build_imatrix_prefixes_here`), and cached."""
    chunks = [c for c, label in zip(ctx.calib_tokens, ctx.calib_langs) if label == lang]
    stem = "lang-" + mix_file_label([(lang, 1.0)])
    out = run_cpu_work(ctx.cluster, f"imatrix-{lang}", build_imatrix_prefixes_here, ctx.base_model, chunks,
                       [_imatrix_path(ctx, j, stem) for j in range(1, len(chunks) + 1)], ctx.settings.n_ctx,
                       work_threads(ctx.cluster, threads))
    return fetch_to_local(out["paths"][n - 1], out["node_id"])


def prepare_imatrix(recipe: Recipe, ctx: TrialContext, threads: int) -> str | None:
    """The local path of the importance matrix ``recipe`` asks for (None when it needs none);
    ``threads``: the trial's threads (see :func:`~ggufopt_ray.distributed.tasks.work_threads`).

    A plain recipe takes the first ``imatrix_chunks`` calibration chunks. A calibration mix is
    combined from per-language collections (each language's chunk prefix collected once, shared
    by every mix that needs it; see :mod:`ggufopt_ray.calibration`)."""
    k = int(recipe.imatrix_chunks)
    if not k:
        return None
    if not recipe.imatrix_mix:
        if k > len(ctx.calib_tokens):
            raise UserError(f"an imatrix of {k} chunks needs {k} calibration chunks; the dataset has "
                            f"{len(ctx.calib_tokens)} (raise dataset.calib_chunks)")
        return _collect(ctx, ctx.calib_tokens[:k], _imatrix_path(ctx, k), f"imatrix-{k}", threads)
    parts = mix_parts(recipe.imatrix_mix, k, ctx.calib_langs)
    out = Path(on_this_node(_imatrix_path(ctx, k, "mix" + recipe.key())))  # this node's cache root
    if out.exists():
        return str(out)
    paths = [_language_prefix(ctx, p.lang, len(p.indices), threads) for p in parts]
    mixed = combine_parts(parts, [load_imatrix(p) for p in paths], label="mix:" + mix_label(recipe.imatrix_mix))
    out.parent.mkdir(parents=True, exist_ok=True)
    mixed.save(out)
    return str(out)


def prepare_candidate(recipe: Recipe, ctx: TrialContext, threads: int) -> Candidate:
    """Build (or fetch from the cache) the candidate file (in this trial or on a CPU task, see
    :func:`~ggufopt_ray.distributed.tasks.runs_in_trial`), local to this trial. ``threads``: the
    trial's threads, which its own quantize and imatrix work use."""
    im_path = prepare_imatrix(recipe, ctx, threads)
    cand = run_cpu_work(ctx.cluster, f"build-{recipe.label()}", build_candidate_here, recipe, ctx.base_model,
                        ctx.cache_dir, ctx.model_fp, im_path, work_threads(ctx.cluster, threads),
                        # the imatrix is on this (the trial's) node; a build task on another node fetches it
                        imatrix_node_id=ray.get_runtime_context().get_node_id() if im_path else None)
    cand.path = fetch_to_local(cand.path, cand.node_id)
    return cand


def _results_root(ctx: TrialContext, cand: Candidate) -> Path:
    return Path(ctx.cache_dir) / "results" / ctx.baseline_id / (cand.recipe.key() + (cand.imatrix_hash or ""))


def quality_trial(config: dict, ctx: TrialContext) -> None:
    """Tune trainable: evaluate one candidate against the baseline, reporting after each chunk."""
    t_start = time.perf_counter()
    plan = ctx.search.plan(config.get("cfg", config))  # grid trials carry their point under "cfg"
    recipe = plan.recipe
    base_row = {"label": plan.label, "recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                "sampled_label": plan.sampled_label, "fitted_to_budget": plan.fitted,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    log_event(ctx, "trial_start", label=plan.label)
    try:
        _evaluate(plan, base_row, ctx, t_start)
    except UserError as exc:
        # A bad setting or input fails the same way on every retry: report it once, as a result,
        # instead of raising into Tune's retries (cluster.max_failures).
        log_event(ctx, "trial_error", label=plan.label, error=str(exc))
        tune.report({**base_row, "stop_reason": "error", "error": str(exc), "chunks": 0, "objective": 1e9,
                     "done_eval": True})


def _evaluate(plan, base_row: dict, ctx: TrialContext, t_start: float) -> None:
    recipe = plan.recipe
    over = ctx.search.over_budget(plan)
    if over is not None:
        tune.report({**base_row, **over, "stop_reason": "over_size_budget", "chunks": 0,
                     "objective": 1e9, "done_eval": True})
        return
    trial_id = tune.get_context().get_trial_id() if ctx.cpu_share is not None else None
    # The candidate is built on the threads the trial holds now: its own CPUs, or more when the
    # sweep's last trials may take the CPUs others left (distributed/cpu_share.py).
    held = ctx.trial_settings().resolved_threads()
    if ctx.cpu_share is not None:
        held = max(held, ray.get(ctx.cpu_share.threads_for.remote(trial_id)))
    cand = prepare_candidate(recipe, ctx, held)
    build_threads = 0 if cand.cached else work_threads(ctx.cluster, held)  # 0: found in the cache
    log_event(ctx, "candidate", label=plan.label, cached=bool(cand.cached), node_id=cand.node_id,
              threads=build_threads)
    t_built = time.perf_counter()
    store = ResultsStore.create_or_open(_results_root(ctx, cand), {
        "baseline_id": ctx.baseline_id, "candidate": recipe.to_dict(), "imatrix_hash": cand.imatrix_hash,
        "model_fingerprint": ctx.model_fp, "encoding": ctx.encoding, "first": ctx.first,
        "settings": asdict(ctx.settings), "langs": list(ctx.langs)})
    for path, why in store.discard_damaged():  # a damaged chunk is evaluated again
        log_event(ctx, "damaged_chunk", label=plan.label, path=str(path), problem=why)
    fetched = [0]
    race = RaceRule(ctx, plan.label, cand.bits_per_weight) if ctx.racing is not None else None
    order = race.order if race is not None else list(range(len(ctx.tokens)))
    langs = [ctx.langs[i] for i in order] if ctx.langs else []  # each evaluated chunk's language, in order
    stop_rule = race if race is not None else (lambda per_chunk: stop_decision(per_chunk, ctx.metrics))
    if (ctx.metrics.per_language or ctx.search.stops_per_language()) and len(set(ctx.langs)) > 1:
        stop_rule = every_language(stop_rule, ctx.metrics, langs)
    if plan.every_chunk:
        stop_rule = never_stop(stop_rule)

    engines: list = []  # the candidate's engine once the chunk loop has opened it
    threads = [ctx.trial_settings().resolved_threads()]  # most threads any chunk ran on

    def open_engine() -> LogitsEngine:
        engines.append(LogitsEngine(cand.path, ctx.trial_settings()))
        return engines[-1]

    def take_spare_cpus() -> None:
        """Before the next chunk: the threads the sweep gives this trial now (more once no trial
        is waiting for a CPU; distributed/cpu_share.py)."""
        if ctx.cpu_share is not None and engines:
            n = ray.get(ctx.cpu_share.threads_for.remote(trial_id))
            engines[-1].set_threads(n)
            threads[0] = max(threads[0], n)

    def payload_of(i: int) -> dict:
        fetched[0] += 1
        return ray.get(ctx.baseline_refs[i][0])

    def report(i: int, run: EvaluationRun) -> None:
        if run.last_computed:
            log_event(ctx, "chunk", label=plan.label, chunk=i)
        # Running reports need a rough interval only; the final row gets the full bootstrap.
        summary = summarize(run.per_chunk, n_boot=1000 if run.done else 200)
        # Per-language statistics: in the final row, and in every row of a search that optimises
        # a language's number (its objective needs them while the trial runs).
        by_language = len(set(ctx.langs)) > 1 and (run.done or ctx.search.by_language)
        lang_fields = language_fields(run.per_chunk, langs, 200 if run.done else 0) if by_language else {}
        row = {**base_row, **summary, "chunks": len(run.per_chunk), "chunk_ids": chunk_id_text(run.chunk_ids),
               "bits_per_weight": cand.bits_per_weight, "size_bytes": cand.size_bytes,
               "candidate_cached": cand.cached, "build_seconds": cand.build_seconds,
               "build_threads": build_threads,
               "imatrix_hash": cand.imatrix_hash or "",
               "baseline_chunks_from_object_store": fetched[0], "chunks_computed": run.computed,
               "candidate_path": cand.path, "build_node_id": cand.node_id, "results_store": str(store.root),
               "eval_seconds": time.perf_counter() - t_built, "trial_seconds": time.perf_counter() - t_start,
               "eval_tokens_per_s": run.tokens_per_s, "eval_threads": threads[0],
               "stop_reason": run.reason if run.done else "running", "done_eval": run.done,
               "objective": ctx.search.objective({**summary, **lang_fields}, cand.bits_per_weight)}
        row.update({k: v for k, v in cand.extra.items() if isinstance(v, (int, float))})
        if race is not None:
            row.update(race.row_fields())
        row.update(lang_fields)
        if run.done and ctx.search.chunk_values:
            row["chunk_kld"] = chunk_kld_text(run)
        tune.report(row)
        if not run.done:
            take_spare_cpus()

    run = evaluate_candidate(len(ctx.tokens), lambda i: ctx.tokens[i], payload_of, store, open_engine,
                             ctx.encoding, ctx.first, stop_rule=stop_rule, on_chunk=report, order=order)
    log_event(ctx, "trial_done", label=plan.label, chunks=len(run.per_chunk), computed=run.computed)


def language_fields(per_chunk: list[dict], langs: list[str], n_boot: int = 200) -> dict:
    """The worst language, the mean over languages, and every language's statistics (for
    languages.parquet). ``langs``: the language of each entry of ``per_chunk``."""
    breakdown = summarize_languages(per_chunk, list(langs)[:len(per_chunk)], n_boot=n_boot)
    means = [s.kld_mean for s in breakdown.languages.values()]
    return {"worst_language": breakdown.worst_language or "", "worst_language_kld": breakdown.worst_language_kld,
            "language_mean_kld": float(np.mean(means)) if means else math.nan,
            "languages": json.dumps(breakdown.rows(), default=float)}


def never_stop(rule):
    """``rule`` asked after every chunk (racing posts the values to the board), its stop ignored."""

    def decide(per_chunk: list[dict]) -> tuple[bool, str]:
        rule(per_chunk)
        return False, "all_chunks"

    return decide


def chunk_kld_text(run: EvaluationRun) -> str:
    """``{chunk index: mean KLD}`` of the evaluated chunks as JSON (a results row stays flat)."""
    return json.dumps({str(i): v for i, v in zip(run.chunk_ids, per_chunk_values(run.per_chunk, "mean"))})


def every_language(rule, metrics, langs: list[str]):
    """``metrics.per_language``: a precision stop must hold in every language's own chunks (a
    candidate fine on average may be poor on the smallest language); dominance stops as it is.
    ``langs``: the language of each chunk in evaluation order."""
    def decide(per_chunk: list[dict]) -> tuple[bool, str]:
        stop, why = rule(per_chunk)
        if not stop or why.startswith("dominated_by"):
            return stop, why
        groups = group_by_language(per_chunk, list(langs)[:len(per_chunk)])
        if len(groups) < len(set(langs)):
            return False, "running"  # a language not seen yet cannot be precise
        ok = all(stop_decision([{"kld": m.kld} for m in chunks], metrics)[0] for chunks in groups.values())
        return (True, why) if ok else (False, "running")
    return decide


class RaceRule:
    """The racing stop rule of one trial: post each chunk's value to the board, decide with
    everyone's values (:func:`ggufopt_ray.metrics.racing.race_decision`, a pure function)."""

    def __init__(self, ctx: TrialContext, label: str, size: float):
        self.ctx, self.label, self.size = ctx, label, float(size)
        self.values: list[float] = []
        self.decision: RaceDecision | None = None
        cfg = ctx.racing
        self.race_index = ray.get(ctx.board.join.remote(label, self.size))
        # The chunks this candidate evaluates, in order (staggered: its own offset after the
        # shared anchor chunks; racing.chunk_order).
        self.order = (chunk_order(self.race_index, cfg.max_chunks, cfg.anchor) if cfg.order == "staggered"
                      else list(range(cfg.max_chunks)))

    def __call__(self, per_chunk: list[dict]) -> tuple[bool, str]:
        cfg = self.ctx.racing
        self.values.extend(per_chunk_values(per_chunk[len(self.values):], cfg.target))
        k = len(self.values)
        state = ray.get(self.ctx.board.post.remote(self.label, self.size, self.order[k - 1], self.values[-1]))
        others = board_entries(state, exclude=self.label)
        me = RaceEntry(self.label, self.size, list(self.values), chunks=per_chunk if cfg.target != "mean" else None,
                       chunk_ids=self.order[:k])
        self.decision = race_decision([me, *others], self.label, cfg)
        return self.decision.stop, self.decision.reason

    def row_fields(self) -> dict:
        """The decision in the results row: who dominated, and the borrowed-strength mean."""
        d = self.decision
        if d is None:
            return {}
        out = {"dominated_by": d.dominated_by or ""}
        adj = d.adjusted or {}
        if self.ctx.racing.target == "mean" and adj:
            out.update({"kld_mean_adj": adj.get("estimate"), "kld_mean_adj_se": adj.get("se"),
                        "kld_mean_adj_lo": adj.get("lo"), "kld_mean_adj_hi": adj.get("hi"),
                        "kld_mean_adj_control": adj.get("control") or ""})
        return out


def speed_trial(config: dict, ctx: TrialContext) -> None:
    """Tune trainable for batch/ubatch: logits throughput of the base model (``search=bub``)."""
    config = config.get("cfg", config)
    n_batch, n_ubatch = int(config["n_batch"]), int(config["n_ubatch"])
    head = {"label": f"b{n_batch}-u{n_ubatch}", "n_batch": n_batch, "n_ubatch": n_ubatch}
    rates: list[float] = []

    def running(step: int, tokens_per_s: float) -> bool:
        rates.append(tokens_per_s)
        median = float(np.median(rates))
        tune.report({**head, "tokens_per_s": median, "chunks": step + 1, "objective": -median,
                     "stop_reason": "running", "done_eval": False})
        return False  # Tune's scheduler, not this loop, decides about stopping

    m, from_cache = ctx.search.measure(n_batch, n_ubatch, running)
    ok = m.status == "complete" and math.isfinite(m.tokens_per_s)
    tune.report({**head, "tokens_per_s": m.tokens_per_s, "tokens_per_s_mean": m.mean_tokens_per_s,
                 "chunks": len(m.chunk_tokens_per_s), "objective": -m.tokens_per_s if ok else 1e9,
                 "stop_reason": "all_chunks" if ok else m.status, "done_eval": True, "from_cache": from_cache,
                 "measurement": json.dumps(m.to_dict())})


TRIALS = {"quality": quality_trial, "speed": speed_trial}
