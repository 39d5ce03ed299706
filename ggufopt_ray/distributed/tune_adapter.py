"""The Tune adapter: a search's trials as Ray Tune trainables, and the Tuner that runs them.

**A trial** is a plain function (Tune's function API): config -> candidate -> chunk-by-chunk
evaluation -> reports. What to build comes from the search object (``ctx.search.plan(config)``,
see :mod:`ggufopt_ray.searches`); the candidate is built in the trial, or by a CPU task when that
work is pinned to a node group (:func:`ggufopt_ray.distributed.tasks.prepare_candidate`, cached by
model fingerprint + recipe + imatrix hash, so identical candidates are never built twice), and it
is evaluated by the same chunk loop as ``ggufopt bench``
(:func:`ggufopt_ray.evaluation.evaluate_candidate`) against the baseline payloads it reads
zero-copy from the object store. Running statistics are reported after every chunk, so a scheduler
or the statistical stopping rule can end it; every evaluated chunk is committed to a
per-candidate results store, so a retried or resumed trial continues where it stopped. The row a
trial reports last is the row of the results table.

**The Tuner** (:func:`run_trials`) runs them as a grid or an Optuna search, with schedulers,
retries and resume. Facts this relies on (Ray 2.60 / Optuna 5, see DESIGN.md): metric and mode go
to both OptunaSearch and TuneConfig; schedulers count ``training_iteration`` (one per chunk) rather
than wall time; ``fit()`` does not raise on failed trials, so errors are collected from the results;
an interrupted experiment resumes with ``Tuner.restore(..., resume_unfinished=True,
resume_errored=True)``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback

from ggufopt_ray.candidates import Candidate
from ggufopt_ray.config import ClusterConfig, MetricsConfig, SearchConfig
from ggufopt_ray.distributed.race import RaceRule
from ggufopt_ray.distributed.tasks import prepare_candidate, work_threads
from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.errors import UserError
from ggufopt_ray.evaluation import (EvaluationRun, chunk_id_text, chunk_kld_text, evaluate_candidate, every_language,
                                    never_stop, stop_decision, summarize)
from ggufopt_ray.metrics.languages import language_row_fields
from ggufopt_ray.metrics.racing import RacingConfig
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
    race = RaceRule(ctx.board, ctx.racing, plan.label, cand.bits_per_weight) if ctx.racing is not None else None
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
        lang_fields = language_row_fields(run.per_chunk, langs, 200 if run.done else 0) if by_language else {}
        row = {**base_row, **summary, "chunks": len(run.per_chunk), "chunk_ids": chunk_id_text(run.chunk_ids),
               "bits_per_weight": cand.bits_per_weight, "size_bytes": cand.size_bytes,
               "candidate_cached": cand.cached, "build_seconds": cand.build_seconds,
               "build_threads": build_threads,
               "imatrix_hash": cand.imatrix_hash or "", "imatrix_path": cand.imatrix_path,
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
            row["chunk_kld"] = chunk_kld_text(run.chunk_ids, run.per_chunk)
        tune.report(row)
        if not run.done:
            take_spare_cpus()

    run = evaluate_candidate(len(ctx.tokens), lambda i: ctx.tokens[i], payload_of, store, open_engine,
                             ctx.encoding, ctx.first, stop_rule=stop_rule, on_chunk=report, order=order)
    log_event(ctx, "trial_done", label=plan.label, chunks=len(run.per_chunk), computed=run.computed)


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


TRIALS = {"quality": quality_trial, "speed": speed_trial}  # by Search.trial_kind


def make_trainable(kind: str, ctx: TrialContext):
    """The trial function of a search's ``trial_kind`` with the sweep's context bound to it (Tune
    ships the context once through the object store, not with every trial)."""
    return tune.with_parameters(TRIALS[kind], ctx=ctx)


# -- the Tuner --------------------------------------------------------------------------------------

EXPERIMENT_NAME = "sweep"


@dataclass
class TuneOutcome:
    rows: list[dict]  # final reported metrics + config of every trial
    history: list[dict]  # every per-chunk report of every trial (for curves)
    errors: list[str] = field(default_factory=list)
    resumed: bool = False
    experiment_path: str = ""


def trial_resources(cluster: ClusterConfig):
    bundle = {"CPU": float(cluster.trial_cpus)}
    if cluster.worker_gpus:
        bundle["GPU"] = float(cluster.worker_gpus)
    bundle.update({k: float(v) for k, v in (cluster.worker_resources or {}).items()})
    return tune.PlacementGroupFactory([bundle])


def concurrency(cluster: ClusterConfig) -> int:
    if cluster.max_concurrent_trials:
        return int(cluster.max_concurrent_trials)
    res = ray.cluster_resources()
    n = math.floor(res.get("CPU", 1) / max(cluster.trial_cpus, 1e-9))
    if cluster.worker_gpus:
        n = min(n, math.floor(res.get("GPU", 0) / cluster.worker_gpus))
    return max(1, n)


def _scheduler(search: SearchConfig, n_chunks: int, min_chunks: int):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    if search.scheduler == "none":
        return None
    if search.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max(n_chunks, 1),
                             grace_period=max(1, min(min_chunks, n_chunks)), reduction_factor=2)
    if search.scheduler == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=max(1, min_chunks),
                                  min_samples_required=2)
    raise ValueError(f"unknown scheduler {search.scheduler!r}")  # Search.validate refuses it earlier


def damaged_tune_state(exp_path: Path) -> str | None:
    """What is wrong with the state Tune saved in ``exp_path`` (None when it looks whole).

    A driver killed while Tune copies its state into the run directory can leave a file cut short
    (seen: an empty ``basic-variant-state-*.json``); Tune then "restores" a searcher that knows no
    configs and runs one trial with an empty config. Read without unpickling anything: the newest
    experiment state must parse as JSON, the pickled files must end with pickle's STOP opcode."""
    def newest(pattern: str) -> Path | None:
        found = sorted(exp_path.glob(pattern))
        return found[-1] if found else None

    for pattern in ("tuner.pkl", "basic-variant-state-*.json", "search_gen_state-*.json"):
        path = newest(pattern)
        if path is not None and _last_byte(path) != b".":
            return f"{path.name} is cut short ({path.stat().st_size} bytes)"
    path = newest("experiment_state-*.json")
    if path is not None:
        try:
            json.loads(path.read_text())
        except ValueError:
            return f"{path.name} is not valid JSON"
    return None


def _last_byte(path: Path) -> bytes:
    """The file's last byte (b"" for an empty file), without reading the rest (an Optuna study's
    state can be large)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return b""
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def set_damaged_state_aside(exp_path: Path, problem: str, log: Callable[[str], None] | None) -> None:
    """Move a damaged experiment out of Tune's way; its trials start again from the results stores."""
    aside = exp_path.with_name(f"{exp_path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    exp_path.rename(aside)
    if log is not None:
        log(f"resume   Tune's saved state of {exp_path.name!r} is damaged ({problem}; moved to {aside.name}): "
            f"its trials start again, and read the chunks they had committed back from the results stores")


def run_trials(trainable, *, search: Search, cluster: ClusterConfig, storage_path: Path, n_chunks: int,
               min_chunks: int, callbacks: list | None = None, resume: bool = True,
               configs: list[dict] | None = None, name: str = EXPERIMENT_NAME,
               log: Callable[[str], None] | None = None) -> TuneOutcome:
    """Run ``trainable`` over the search's grid (every config) or its Optuna space (``num_samples``).

    ``configs`` runs exactly these configs as a grid instead (a search's later rounds), as the
    experiment ``name`` under ``storage_path`` (each round resumes on its own). An experiment
    whose saved state is damaged (:func:`damaged_tune_state`) is set aside and run again: nothing
    is lost, since each candidate's evaluated chunks are in its results store."""
    storage_path = Path(storage_path).resolve()
    exp_path = storage_path / name
    wrapped = tune.with_resources(trainable, trial_resources(cluster))
    cfg = search.cfg
    resumed = False
    if resume and tune.Tuner.can_restore(str(exp_path)):
        problem = damaged_tune_state(exp_path)
        if problem is not None:
            set_damaged_state_aside(exp_path, problem, log)
            resumed = True
    if resume and tune.Tuner.can_restore(str(exp_path)):
        tuner = tune.Tuner.restore(str(exp_path), trainable=wrapped, resume_unfinished=True,
                                   resume_errored=True)
        resumed = True
    else:
        run_config = tune.RunConfig(
            name=name, storage_path=str(storage_path), verbose=0,
            failure_config=tune.FailureConfig(max_failures=cluster.max_failures),
            # The CSV logger keeps every per-chunk report on disk (curves survive a resume).
            callbacks=[CSVLoggerCallback(), *(callbacks or [])])
        if cfg.mode == "grid" or configs is not None:
            tune_config = tune.TuneConfig(metric="objective", mode="min", num_samples=1, reuse_actors=True,
                                          max_concurrent_trials=concurrency(cluster),
                                          scheduler=_scheduler(cfg, n_chunks, min_chunks))
            param_space = {"cfg": tune.grid_search(configs if configs is not None else search.grid())}
        else:
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            # Several objectives: Optuna's multi-objective TPE over (objective, bits per weight),
            # the front of which is the Pareto set written with the results.
            multi = len(cfg.objectives) > 1
            metric = ["objective", "bits_per_weight"] if multi else "objective"
            mode = ["min", "min"] if multi else "min"
            searcher = OptunaSearch(space=search.space(), metric=metric, mode=mode, seed=cfg.seed,
                                    points_to_evaluate=search.start_points(),
                                    sampler=optuna.samplers.TPESampler(seed=cfg.seed,
                                                                       n_startup_trials=min(4, cfg.num_samples)))
            tune_config = tune.TuneConfig(metric=None if multi else "objective", mode=None if multi else "min",
                                          reuse_actors=True,
                                          search_alg=searcher,
                                          num_samples=cfg.num_samples,
                                          max_concurrent_trials=concurrency(cluster),
                                          scheduler=_scheduler(cfg, n_chunks, min_chunks))
            param_space = None
        tuner = tune.Tuner(wrapped, tune_config=tune_config, run_config=run_config,
                           **({"param_space": param_space} if param_space is not None else {}))
    results = tuner.fit()
    rows, history, errors = [], [], []
    for r in results:
        config = dict(r.config.get("cfg", r.config)) if r.config else {}
        if r.error is not None:
            lines = [ln for ln in str(r.error).splitlines() if ln.strip()]
            errors.append(f"{config}: {lines[-1] if lines else type(r.error).__name__}")
        metrics = dict(r.metrics or {})
        if metrics.get("stop_reason") == "error":  # a deterministic error the trial reported itself
            errors.append(f"{metrics.get('label', config)}: {metrics.get('error', 'failed')}")
            continue
        if "label" not in metrics:  # failed before its first report
            continue
        if metrics.get("stop_reason") == "running":
            metrics["stop_reason"] = "scheduler"
        metrics["trial_id"] = metrics.get("trial_id") or (r.path and Path(r.path).name)
        rows.append({**{f"config.{k}": v for k, v in config.items()}, **metrics})
        df = r.metrics_dataframe
        if df is not None and len(df):
            for rec in df.to_dict("records"):
                rec["trial_id"] = metrics["trial_id"]
                history.append(rec)
    return TuneOutcome(rows=rows, history=history, errors=errors, resumed=resumed, experiment_path=str(exp_path))
