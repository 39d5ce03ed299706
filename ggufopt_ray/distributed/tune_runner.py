"""Run the trials of a sweep with Ray Tune: grid or Optuna search, schedulers, retries, resume.

Facts this relies on (Ray 2.60 / Optuna 5, see DESIGN.md): metric and mode go to both
OptunaSearch and TuneConfig; schedulers count ``training_iteration`` (one per chunk) rather than
wall time; ``fit()`` does not raise on failed trials, so errors are collected from the results;
an interrupted experiment resumes with ``Tuner.restore(..., resume_unfinished=True,
resume_errored=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback

from ggufopt_ray.config import ClusterConfig, SearchConfig
from ggufopt_ray.searches import Search

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


def run_trials(trainable, *, search: Search, cluster: ClusterConfig, storage_path: Path, n_chunks: int,
               min_chunks: int, callbacks: list | None = None, resume: bool = True,
               configs: list[dict] | None = None, name: str = EXPERIMENT_NAME) -> TuneOutcome:
    """Run ``trainable`` over the search's grid (every config) or its Optuna space (``num_samples``).

    ``configs`` runs exactly these configs as a grid instead (a search's later rounds), as the
    experiment ``name`` under ``storage_path`` (each round resumes on its own)."""
    storage_path = Path(storage_path).resolve()
    exp_path = storage_path / name
    wrapped = tune.with_resources(trainable, trial_resources(cluster))
    cfg = search.cfg
    resumed = False
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
