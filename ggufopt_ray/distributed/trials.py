"""Ray Tune trials: prepare a candidate, compare it chunk by chunk with the baseline refs, report.

A trial is a plain function (Tune's function API). It turns its config into a recipe, has the
candidate built by a CPU task (cached by model fingerprint + recipe + imatrix hash, so identical
candidates are never built twice), evaluates it on its own logits engine chunk after chunk
against the baseline payloads it reads zero-copy from the object store, and reports running
statistics after every chunk so that a scheduler or the statistical stopping rule can end it.
Every evaluated chunk is committed to a per-candidate results store, so a retried or resumed
trial continues where it stopped instead of recomputing.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray import tune

from ggufopt_ray.config import ClusterConfig, MetricsConfig, SearchConfig


@dataclass
class TrialContext:
    """Everything a trial needs besides its config; shipped once through the object store."""

    base_model: str
    model_fp: str
    settings: dict  # RuntimeSettings fields for candidate engines
    tokens: list  # evaluation chunks (int32 arrays)
    baseline_refs: list  # [[ObjectRef]] per chunk
    baseline_id: str
    encoding: str
    first: int
    metrics: MetricsConfig
    search: SearchConfig
    cluster: ClusterConfig
    cache_dir: str
    calib_tokens: list = field(default_factory=list)
    calib_fingerprint: str = ""
    versions: dict = field(default_factory=dict)
    trial_cpus: float = 1.0
    events_path: str = ""  # append-only journal of what ran where (JSON lines)


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


def _imatrix_path(ctx: TrialContext, n_chunks: int) -> str:
    return str(Path(ctx.cache_dir) / "imatrix" / ctx.model_fp / f"{ctx.calib_fingerprint}-{n_chunks}.gguf")


def prepare_candidate(recipe, ctx: TrialContext) -> dict:
    """Build (or fetch from the cache) the candidate file on a CPU task; returns Candidate dict."""
    from ggufopt_ray.distributed.tasks import (build_candidate_task, build_imatrix_task, fetch_to_local,
                                               task_options)

    im_path = None
    if recipe.imatrix_chunks:
        k = int(recipe.imatrix_chunks)
        if k > len(ctx.calib_tokens):
            from ggufopt_ray.errors import UserError

            raise UserError(f"an imatrix of {k} chunks needs {k} calibration chunks; the dataset has "
                            f"{len(ctx.calib_tokens)} (raise dataset.calib_chunks)")
        im = ray.get(build_imatrix_task.options(**task_options(ctx.cluster, f"imatrix-{k}")).remote(
            ctx.base_model, ctx.calib_tokens[:k], _imatrix_path(ctx, k), ctx.settings["n_ctx"], 1))
        im_path = fetch_to_local(im["path"], im["node_id"])
    cand = ray.get(build_candidate_task.options(**task_options(ctx.cluster, f"build-{recipe.label()}")).remote(
        recipe.to_dict(), ctx.base_model, ctx.cache_dir, ctx.model_fp, im_path, 1))
    cand["path"] = fetch_to_local(cand["path"], cand["node_id"])
    return cand


def _results_root(ctx: TrialContext, cand: dict) -> Path:
    from ggufopt_ray.candidates import Recipe

    key = Recipe.from_dict(cand["recipe"]).key() + (cand.get("imatrix_hash") or "")
    return Path(ctx.cache_dir) / "results" / ctx.baseline_id / key


def quality_trial(config: dict, ctx: TrialContext) -> None:
    """Tune trainable: evaluate one candidate against the baseline, reporting after each chunk."""
    from ggufopt_ray.distributed.spaces import recipe_from_config
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.evaluation import compare_chunk, summarize, stop_decision
    from ggufopt_ray.store.results import ResultsStore

    t_start = time.perf_counter()
    config = config.get("cfg", config)  # grid trials carry their point under "cfg"
    sampled = recipe_from_config(config, ctx.search).label()
    config = _fit_to_budget(config, ctx)
    recipe = recipe_from_config(config, ctx.search)
    base_row = {"label": recipe.label(), "recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                "sampled_label": sampled, "fitted_to_budget": recipe.label() != sampled,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    log_event(ctx, "trial_start", label=recipe.label())
    over = _over_budget(recipe, ctx)
    if over is not None:
        tune.report({**base_row, **over, "stop_reason": "over_size_budget", "chunks": 0,
                     "objective": 1e9, "done_eval": True})
        return
    cand = prepare_candidate(recipe, ctx)
    log_event(ctx, "candidate", label=recipe.label(), cached=bool(cand["cached"]), node_id=cand.get("node_id"))
    t_built = time.perf_counter()
    store = ResultsStore.create_or_open(_results_root(ctx, cand), {
        "baseline_id": ctx.baseline_id, "candidate": cand["recipe"], "imatrix_hash": cand.get("imatrix_hash"),
        "model_fingerprint": ctx.model_fp, "encoding": ctx.encoding, "first": ctx.first,
        "settings": ctx.settings})
    settings = RuntimeSettings(**{**ctx.settings, "n_threads": max(1, int(ctx.trial_cpus))})
    engine = None
    per_chunk: list[dict] = []
    from_object_store = 0
    computed = 0
    eval_compute_s = 0.0
    reason = "all_chunks"
    try:
        for i, tokens in enumerate(ctx.tokens):
            if store.has(i):
                metrics = store.read(i)
            else:
                if engine is None:
                    engine = LogitsEngine(cand["path"], settings)
                payload = ray.get(ctx.baseline_refs[i][0])
                from_object_store += 1
                t_chunk = time.perf_counter()
                metrics = compare_chunk(engine, tokens, payload, ctx.encoding, ctx.first)
                eval_compute_s += time.perf_counter() - t_chunk
                store.write(i, metrics)
                computed += 1
                log_event(ctx, "chunk", label=recipe.label(), chunk=i)
            per_chunk.append(metrics)
            stop, why = stop_decision(per_chunk, ctx.metrics)
            last = i == len(ctx.tokens) - 1
            # Running reports need a rough interval only; the final row gets the full bootstrap.
            summary = summarize(per_chunk, n_boot=1000 if (stop or last) else 200)
            if stop and not last:
                reason = why
            row = {**base_row, **summary, "chunks": i + 1,
                   "bits_per_weight": cand["bits_per_weight"], "size_bytes": cand["size_bytes"],
                   "candidate_cached": cand["cached"], "build_seconds": cand["build_seconds"],
                   "imatrix_hash": cand.get("imatrix_hash") or "",
                   "baseline_chunks_from_object_store": from_object_store, "chunks_computed": computed,
                   "candidate_path": cand["path"], "build_node_id": cand.get("node_id", ""),
                   "results_store": str(store.root),
                   "eval_seconds": time.perf_counter() - t_built, "trial_seconds": time.perf_counter() - t_start,
                   "eval_tokens_per_s": (computed * len(tokens) / eval_compute_s) if eval_compute_s > 0 else math.nan,
                   "stop_reason": reason if (stop or last) else "running", "done_eval": bool(stop or last),
                   "objective": _objective(summary, cand, ctx)}
            row.update({k: v for k, v in (cand.get("extra") or {}).items() if isinstance(v, (int, float))})
            tune.report(row)
            if stop:
                break
        log_event(ctx, "trial_done", label=recipe.label(), chunks=len(per_chunk), computed=computed)
    finally:
        if engine is not None:
            engine.close()


def _objective(summary: dict, cand: dict, ctx: TrialContext) -> float:
    target = ctx.search.objectives[0] if ctx.search.objectives else "composite"
    key = {"composite": "composite", "mean": "kld_mean", "median": "kld_median", "p99": "kld_p99"}.get(target, target)
    value = float(summary.get(key, math.nan))
    if ctx.search.target_bpw is not None and cand["bits_per_weight"] > ctx.search.target_bpw:
        value += 1e3  # over the size budget: never preferred to a candidate that fits
    return value


_SIZERS: dict = {}  # (model, base type) -> MixSizer; trial actors are reused, so this persists


def _fit_to_budget(config: dict, ctx: TrialContext) -> dict:
    """A per-tensor mix over the size budget, stepped down to the nearest mix that fits.

    Sizes come from one dry run of the base type (see :mod:`ggufopt_ray.mixes`); the final mix is
    still checked by a real dry run in :func:`_over_budget`. Configs that are not mixes, and mixes
    no change can fit, come back unchanged (the latter are then reported over budget).
    """
    from ggufopt_ray.distributed.spaces import mix_overrides
    from ggufopt_ray.mixes import MixSizer, fit_mix

    groups = {k: v for k, v in config.items() if k.startswith("mix_")}
    if ctx.search.target_bpw is None or not groups:
        return config
    base_type = str(config.get("ftype") or ctx.search.base_type)
    key = (ctx.base_model, base_type)
    if key not in _SIZERS:
        _SIZERS[key] = MixSizer.for_model(ctx.base_model, base_type)
    sizer, n_layer = _SIZERS[key], int(config.get("n_layer", 0))
    fitted = fit_mix(groups, list(ctx.search.mix_types),
                     lambda choice: sizer.bits_per_weight(mix_overrides(choice, n_layer)), float(ctx.search.target_bpw))
    return config if fitted is None else {**config, **fitted}


def _over_budget(recipe, ctx: TrialContext) -> dict | None:
    """For a size budget, a dry run tells the exact size before any quantization work."""
    if ctx.search.target_bpw is None or recipe.kind != "quant" or recipe.imatrix_chunks:
        return None
    from ggufopt_ray.engine.quantize import quantize_model

    plan = quantize_model(ctx.base_model, recipe.ftype, dry_run=True, tensor_types=list(recipe.overrides) or None,
                          output_type=recipe.output_type, embd_type=recipe.embd_type, pure=recipe.pure,
                          threads=1)
    if plan.bits_per_weight > ctx.search.target_bpw:
        return {"bits_per_weight": plan.bits_per_weight, "size_bytes": plan.size_bytes}
    return None


def bub_trial(config: dict, ctx: TrialContext) -> None:
    """Tune trainable for batch/ubatch: logits throughput of the base model, per chunk."""
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings

    config = config.get("cfg", config)
    n_batch, n_ubatch = int(config["n_batch"]), int(config["n_ubatch"])
    settings = RuntimeSettings(**{**ctx.settings, "n_batch": n_batch, "n_ubatch": n_ubatch,
                                  "n_threads": max(1, int(ctx.trial_cpus))})
    rates = []
    with LogitsEngine(ctx.base_model, settings) as engine:
        engine.logits(ctx.tokens[0])  # warm-up, untimed
        for i, tokens in enumerate(ctx.tokens[: max(2, min(len(ctx.tokens), 6))]):
            t0 = time.perf_counter()
            engine.logits(tokens)
            rates.append(len(tokens) / (time.perf_counter() - t0))
            tune.report({"label": f"b{n_batch}-u{n_ubatch}", "n_batch": n_batch, "n_ubatch": n_ubatch,
                         "tokens_per_s": float(np.median(rates)), "chunks": i + 1,
                         "objective": -float(np.median(rates)), "stop_reason": "running", "done_eval": False})
    tune.report({"label": f"b{n_batch}-u{n_ubatch}", "n_batch": n_batch, "n_ubatch": n_ubatch,
                 "tokens_per_s": float(np.median(rates)), "chunks": len(rates),
                 "objective": -float(np.median(rates)), "stop_reason": "all_chunks", "done_eval": True})
