"""A sweep from config to results: model -> chunks -> baseline once -> trials -> table.

This is the function ``launch/sweep.py`` calls after Hydra has composed the config. It resolves
the model (the built-in synthetic one by default), builds or reuses the token chunks, computes
the baseline once per fingerprint through Ray (or loads it from the store), runs the trials with
Ray Tune and writes one results row per trial, the best row and the Pareto front under
``output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ggufopt_ray.config import SweepConfig
from ggufopt_ray.errors import UserError
from ggufopt_ray.run_dir import RUN_LOG, claim_run_dir, log_to_run_files
from ggufopt_ray.store.locks import file_lock
from ggufopt_ray.searches import Search, SearchFacts, make_search
from ggufopt_ray.searches.base import superseded

def default_cache_dir() -> Path:
    """The project cache root (``$GGUFOPT_CACHE_DIR`` or ``~/.cache/ggufopt_ray``); the corpus cache lives in it."""
    from ggufopt_ray.data.cache import default_cache_dir as corpus_cache

    return corpus_cache().parent


def resolve_model(cfg: SweepConfig, cache: Path) -> Path:
    """The model file to sweep: ``model.path``, or the built-in synthetic model (made once)."""
    if cfg.model.path:
        from ggufopt_ray.gguf.inspect import check_gguf_file

        return check_gguf_file(Path(cfg.model.path).expanduser()).resolve()
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    path = cache / "models" / f"synth-seed{cfg.model.synth_seed}-{cfg.model.synth_dtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path):  # another sweep on this cache may be writing it
            if not path.exists():
                write_synthetic_model(path, SynthSpec(seed=cfg.model.synth_seed, dtype=cfg.model.synth_dtype))
    return path


def dataset_source(d):
    """The data source a sweep's ``dataset`` settings name, with its options."""
    from ggufopt_ray.data import make_source

    options = {}
    if d.source not in ("builtin",):
        options = {k: v for k, v in {"source": d.path, "config": d.config_pattern, "split": d.split,
                                     "text_field": d.text_field}.items() if v is not None}
        if d.source in ("local", "files"):
            options = {"files": d.path, "text_field": d.text_field}
    return make_source(d.source if not d.plugin_file else None, plugin_file=d.plugin_file,
                       plugin_class=d.plugin_class, **options)


def prepare_data(cfg: SweepConfig, model_path: Path, cache: Path):
    """Evaluation and calibration chunks for the model's tokenizer (reused when up to date)."""
    import hashlib

    from ggufopt_ray.data import ChunkParams, load_chunks, prepare_chunks

    d = cfg.dataset
    src = dataset_source(d)
    key = hashlib.sha256(json.dumps([asdict(d), str(model_path), cfg.model.n_ctx], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    out = cache / "chunks" / f"chunks-{key}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = ChunkParams(n_ctx=cfg.model.n_ctx, n_calibration=d.calib_chunks, n_evaluation=d.eval_chunks,
                         seed=d.seed)
    # Sweeps sharing a cache: one builds the chunks (and the corpus they come from), the others wait.
    with file_lock(out):
        f = prepare_chunks(out, model_path=model_path, source=src, langs=list(d.langs),
                           samples_per_lang=d.samples_per_lang, skip=d.skip, params=params)
    ev = load_chunks(f.path, "evaluation", n_ctx=cfg.model.n_ctx)
    cal = load_chunks(f.path, "calibration", n_ctx=cfg.model.n_ctx) if d.calib_chunks else None
    return ev, cal


@dataclass
class SweepResult:
    output_dir: str
    rows: list[dict]
    best: dict | None
    pareto: list[dict]
    baseline: dict
    dashboard_url: str | None
    seconds: float
    errors: list[str] = field(default_factory=list)
    resumed: bool = False
    report: str | None = None


def _settings(cfg: SweepConfig) -> dict:
    m = cfg.model
    return {"n_ctx": m.n_ctx, "n_batch": m.n_batch, "n_ubatch": m.n_ubatch, "n_threads": m.n_threads,
            "n_gpu_layers": m.n_gpu_layers, "flash_attn": m.flash_attn, "verbose": cfg.verbose}


def validate(cfg: SweepConfig) -> Search:
    """Cheap checks before anything starts, so a bad setting never costs a Ray start; returns the
    search object of ``cfg.search``."""
    search = make_search(cfg.search)
    search.validate()
    m = cfg.model
    if not 1 <= m.n_ubatch <= m.n_batch:
        raise UserError(f"model.n_ubatch ({m.n_ubatch}) must be between 1 and model.n_batch ({m.n_batch})")
    if m.n_ctx < 8:
        raise UserError(f"model.n_ctx={m.n_ctx} is too short to score anything; use e.g. 256 or 512")
    if m.n_threads is not None and m.n_threads < 1:
        raise UserError(f"model.n_threads must be positive or null (all CPUs), not {m.n_threads}")
    if cfg.dataset.eval_chunks < 1:
        raise UserError("dataset.eval_chunks must be at least 1")
    if cfg.dataset.calib_chunks < 0:
        raise UserError("dataset.calib_chunks must not be negative")
    first = scored_from(cfg)
    if not 0 <= first < m.n_ctx - 1:
        raise UserError(f"metrics.scored_from={first} leaves nothing to score in chunks of {m.n_ctx}; "
                        f"use 0 <= metrics.scored_from < {m.n_ctx - 1}")
    validate_metrics(cfg.metrics)
    c = cfg.cluster
    if ((c.trial_cpus is not None and c.trial_cpus <= 0) or (c.worker_cpus is not None and c.worker_cpus < 0)
            or c.task_cpus < 0 or c.logits_workers < 1 or c.max_failures < 0):
        raise UserError("cluster.trial_cpus must be > 0, cluster.worker_cpus/task_cpus >= 0, "
                        "cluster.logits_workers >= 1 and cluster.max_failures >= 0")
    if c.object_store_gib is not None and not c.object_store_gib >= 0.075:
        raise UserError(f"cluster.object_store_gib={c.object_store_gib} is below Ray's minimum of 0.075 GiB "
                        "(75 MiB); e.g. 4, or null for Ray's default")
    return search


def local_cpus(cluster) -> int:
    """CPUs a local cluster will have (``cluster.num_cpus`` or this process's CPUs); 1 for a
    cluster we join, where per-trial CPUs are the user's to set (``cluster.trial_cpus``)."""
    if cluster.mode != "local":
        return 1
    if cluster.num_cpus:
        return int(cluster.num_cpus)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def scored_from(cfg: SweepConfig) -> int:
    """The first scored position of each chunk (default: the second half, as llama-perplexity)."""
    return cfg.metrics.scored_from if cfg.metrics.scored_from is not None else cfg.model.n_ctx // 2


def validate_metrics(metrics) -> None:
    """The encoding and the stopping rule's settings, checked as the trials will use them."""
    from ggufopt_ray.evaluation import racing_config
    from ggufopt_ray.metrics.encodings import get_encoding
    from ggufopt_ray.metrics.stopping import StoppingRule

    try:
        if metrics.encoding != "auto":
            get_encoding(metrics.encoding)
        StoppingRule(target=metrics.target, confidence=metrics.confidence, margin=metrics.margin,
                     min_chunks=metrics.min_chunks)
        racing_config(metrics, max(metrics.min_chunks, metrics.min_paired_chunks, 3), 2)  # control, chunk_order
    except UserError as exc:
        raise UserError(f"metrics: {exc}") from None


def run_sweep(cfg: SweepConfig, output_dir: str | Path, resume: bool = True, log=print,
              on_baseline_ready=None) -> SweepResult:
    """Run the sweep of ``cfg``; rerunning with the same ``output_dir`` resumes an interrupted one.

    ``on_baseline_ready(store)`` is called once the baseline chunks are in the object store and
    before any trial starts (tools use it to archive the store; tests to prove trials never read it).
    """
    from ggufopt_ray.distributed.baseline import run_baseline
    from ggufopt_ray.distributed.cpu_share import CpuShareUpdater, start_cpu_share, stop_cpu_share
    from ggufopt_ray.distributed.progress import ChunkProgress, ProgressLine
    from ggufopt_ray.distributed.race import close_board, start_board
    from ggufopt_ray.distributed.runtime import start_ray
    from ggufopt_ray.distributed.tune_adapter import TrialContext, make_trainable, run_trials
    from ggufopt_ray.engine import RuntimeSettings
    from ggufopt_ray.engine.native import versions
    from ggufopt_ray.evaluation import encoding_params, racing_config
    from ggufopt_ray.gguf.inspect import inspect_model, model_fingerprint
    from ggufopt_ray.report.tables import finalize_results
    from ggufopt_ray.store.baseline import BaselineStore, baseline_identity, tensor_signature

    t0 = time.perf_counter()
    search = validate(cfg)
    output_dir = Path(output_dir).resolve()
    claim_run_dir(output_dir, cfg, overwrite=cfg.overwrite)
    cache = Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)

    model_path = resolve_model(cfg, cache)
    info = inspect_model(model_path)
    if info.context_length and cfg.model.n_ctx > int(info.context_length):
        raise UserError(f"model.n_ctx={cfg.model.n_ctx} is longer than the model's training context "
                        f"({info.context_length}); use model.n_ctx<={info.context_length}")
    model_fp = model_fingerprint(model_path)
    log(f"model    {model_path.name}: {info.architecture}, {info.n_params:,} params, "
        f"{info.bits_per_weight:.2f} bpw, vocab {info.vocab_size}")
    ev, cal = prepare_data(cfg, model_path, cache)
    log(f"data     {len(ev)} evaluation + {len(cal) if cal else 0} calibration chunks of {cfg.model.n_ctx} tokens "
        f"({cfg.dataset.source})")
    # The search binds itself to this model and data (size budgets, calibration sizes, memory
    # guards) on the driver, before Ray starts; trials receive it prepared.
    cpus = local_cpus(cfg.cluster)
    speed = search.trial_kind == "speed"
    search.prepare(SearchFacts(model_path=str(model_path), n_layer=_n_layer(model_path), n_ctx=cfg.model.n_ctx,
                               n_calib=len(cal) if cal else 0, calib_langs=tuple(cal.langs) if cal else (),
                               n_threads=int(cfg.cluster.trial_cpus or (cpus if speed else 1)),
                               n_gpu_layers=cfg.model.n_gpu_layers, flash_attn=cfg.model.flash_attn,
                               cache_dir=str(cache), eval_tokens=tuple(ev.chunks)), log)
    # Trials use the CPUs the sweep has: a timing trial all of them (one at a time, undisturbed),
    # a quality trial its share when there are fewer trials than CPUs.
    trial_cpus = cfg.cluster.trial_cpus or (cpus if speed else max(1, cpus // max(1, min(search.n_trials(), cpus))))
    # ... and the last ones the CPUs the finished ones left (distributed/cpu_share.py), when the
    # cluster is ours and the user fixed no thread count.
    share_cpus = (cfg.cluster.mode == "local" and not speed and cfg.cluster.trial_cpus is None
                  and cfg.model.n_threads is None and trial_cpus < cpus)
    cfg = replace(cfg, cluster=replace(cfg.cluster, trial_cpus=float(trial_cpus)))

    ray_info = start_ray(cfg.cluster, verbose=cfg.verbose)
    log(f"ray      {ray_info.num_cpus:g} CPUs, {ray_info.num_gpus:g} GPUs"
        + (f"; dashboard {ray_info.dashboard_url}" if ray_info.dashboard_url else ""))
    for note in ray_info.notes:
        log(f"ray      {note}")

    first = scored_from(cfg)
    # The memory plan: the baseline against the object store, a trial's peak against this node.
    from ggufopt_ray.distributed.runtime import object_store_bytes
    from ggufopt_ray.distributed.tune_adapter import concurrency
    from ggufopt_ray.memory_plan import available_memory_bytes, plan_sweep_memory, refuse_unless_fits
    from ggufopt_ray.tuning.bub import ModelDims

    dims = ModelDims.from_gguf(model_path)
    plan = plan_sweep_memory(encoding=cfg.metrics.encoding, n_chunks=len(ev), n_ctx=cfg.model.n_ctx, first=first,
                             dims=dims, model_bytes=info.tensor_bytes, n_batch=cfg.model.n_batch,
                             n_ubatch=cfg.model.n_ubatch, kld_threads=int(cfg.cluster.trial_cpus),
                             object_store_bytes=object_store_bytes(), node_memory_bytes=available_memory_bytes(),
                             concurrency=concurrency(cfg.cluster))
    log(plan.describe())
    refuse_unless_fits(plan, n_chunks=len(ev), dims=dims)
    if plan.trials_fit < plan.concurrency and not cfg.cluster.max_concurrent_trials:
        log(f"memory   running {plan.trials_fit} trials at once (not {plan.concurrency}): that is what fits")
        cfg = replace(cfg, cluster=replace(cfg.cluster, max_concurrent_trials=plan.trials_fit))
    if plan.encoding != cfg.metrics.encoding:
        log(f"encoding {plan.encoding} (metrics.encoding=auto)")
        cfg = replace(cfg, metrics=replace(cfg.metrics, encoding=plan.encoding))
    _check_baseline_footprint(cfg, len(ev), first, info.vocab_size, log)
    ver = versions()
    header = {"model_fingerprint": model_fp, "vocab_fingerprint": info.vocab_fingerprint,
              "corpus_fingerprint": ev.fingerprint, "n_ctx": cfg.model.n_ctx, "n_vocab": info.vocab_size,
              "encoding": cfg.metrics.encoding, "encoding_params": encoding_params(cfg.metrics.encoding),
              "first": first, "n_chunks": len(ev), "model_path": str(model_path),
              "runtime": _settings(cfg), "llama_cpp": ver, "tensor_signature": tensor_signature(model_path)}
    # A content-addressed cache path: a damaged header can only be replaced by the same data.
    store = BaselineStore.create_or_open(cache / "baselines" / baseline_identity(header), header,
                                         replace_damaged=True)
    settings = RuntimeSettings(**_settings(cfg))
    baseline_meta = {"baseline_id": store.baseline_id, "store": str(store.root), "computed": 0, "loaded": 0}
    refs = []
    if search.trial_kind == "quality":  # a speed search times the base model; it needs no baseline
        # Two sweeps sharing a cache: the second waits for the first's baseline, then loads it.
        with file_lock(store.root, on_wait=lambda lock: log(f"baseline waiting for another sweep's pass ({lock})")):
            base = run_baseline(store, ev.chunks, str(model_path), settings, cfg.metrics.encoding, first,
                                cfg.cluster, log=log, progress=ChunkProgress("baseline", log))
        refs = base.refs
        baseline_meta.update(computed=base.computed, loaded=base.loaded, seconds=round(base.seconds, 3),
                             worker_nodes=base.worker_nodes)
        size = baseline_footprint(cfg.metrics.encoding, len(ev), cfg.model.n_ctx - 1 - first, info.vocab_size)
        log(f"baseline {base.computed} chunks computed, {base.loaded} loaded from {store.root} "
            f"({size / 2**20:,.1f} MiB, {cfg.metrics.encoding})")
        if on_baseline_ready is not None:
            on_baseline_ready(store)

    ctx = TrialContext(base_model=str(model_path), model_fp=model_fp, settings=settings,
                       tokens=list(ev.chunks), baseline_refs=refs, baseline_id=store.baseline_id,
                       encoding=cfg.metrics.encoding, first=first, metrics=cfg.metrics, search=search,
                       cluster=cfg.cluster, langs=list(ev.langs),
                       cache_dir=str(cache), calib_tokens=list(cal.chunks) if cal else [],
                       calib_fingerprint=cal.fingerprint if cal else "", calib_langs=list(cal.langs) if cal else [],
                       versions=ver,
                       trial_cpus=cfg.cluster.trial_cpus, events_path=str(output_dir / "events.jsonl"))
    racing = (racing_config(cfg.metrics, len(ev), search.n_trials())
              if search.trial_kind == "quality" and search.races() else None)
    run_tag = uuid.uuid4().hex[:6]
    if racing is not None:
        ctx.racing, ctx.board = racing, start_board(output_dir, run_tag)
    if share_cpus:
        ctx.cpu_share = start_cpu_share(cpus, int(trial_cpus), run_tag)

    def callbacks(n_trials: int) -> list:
        extra = [CpuShareUpdater(ctx.cpu_share, n_trials)] if ctx.cpu_share is not None else []
        return [ProgressLine(n_trials, len(ev)), *extra]

    trainable = make_trainable(search.trial_kind, ctx)
    t_trials = time.perf_counter()
    outcome = run_trials(trainable, search=search, cluster=cfg.cluster, storage_path=output_dir / "ray_results",
                         n_chunks=len(ev), min_chunks=cfg.metrics.min_chunks,
                         callbacks=callbacks(search.n_trials()), resume=resume, log=log)

    def run_round(configs: list[dict], name: str) -> list[dict]:
        """A later round of the search: its configs as trials, added to the sweep's results (a row of
        a candidate measured before replaces the earlier one: ``searches.base.superseded``)."""
        more = run_trials(trainable, search=search, cluster=cfg.cluster, storage_path=output_dir / "ray_results",
                          n_chunks=len(ev), min_chunks=cfg.metrics.min_chunks, configs=configs, name=name,
                          callbacks=callbacks(len(configs)), resume=resume, log=log)
        outcome.rows[:] = superseded(outcome.rows, more.rows)
        outcome.history.extend(more.history)
        outcome.errors.extend(more.errors)
        return more.rows

    search.follow_up(list(outcome.rows), run_round, output_dir, log)
    baseline_meta["trials_seconds"] = round(time.perf_counter() - t_trials, 3)
    if racing is not None:
        apply_final_estimates(outcome.rows, close_board(ctx.board, racing))
    if ctx.cpu_share is not None:
        stop_cpu_share(ctx.cpu_share)
    provenance = {"model": str(model_path), "model_fingerprint": model_fp,
                  "vocab_fingerprint": info.vocab_fingerprint, "corpus_fingerprint": ev.fingerprint,
                  "dataset_fingerprint": ev.dataset_fingerprint, "baseline_id": store.baseline_id,
                  "encoding": cfg.metrics.encoding, "n_ctx": cfg.model.n_ctx, "n_batch": cfg.model.n_batch,
                  "n_ubatch": cfg.model.n_ubatch, "trial_threads": int(cfg.cluster.trial_cpus),
                  "seed": cfg.seed, "search_seed": cfg.search.seed, "dataset_seed": cfg.dataset.seed,
                  "llama_cpp_python": ver.get("llama_cpp_python")}
    rows, best, pareto = finalize_results(outcome.rows, outcome.history, output_dir, provenance,
                                          bub=search.table_kind() == "speed", **search.finalize_options())
    search_notes = {**search.notes, **search.finish(outcome.rows, t_trials)}
    for line in search.summary_lines(search_notes):
        log(line)
    write_language_table(rows, output_dir)
    if best and best.get("imatrix_growth"):
        g = best["imatrix_growth"]
        versus = ""
        if g.get("gain_over_no_imatrix") is not None:
            versus = (f"; {100 * abs(g['gain_over_no_imatrix']):.1f}% "
                      f"{'better' if g['gain_over_no_imatrix'] >= 0 else 'worse'} than no imatrix")
        log(f"imatrix  recommended size {g['recommended_imatrix_chunks']} chunks "
            f"(growth stops when the composite improves by less than {100 * g['threshold']:.1f}%{versus})")
    (output_dir / "sweep.json").write_text(json.dumps({
        "baseline": baseline_meta, "provenance": provenance, "errors": outcome.errors,
        "resumed": outcome.resumed, "dashboard_url": ray_info.dashboard_url,
        "size_budget": search_notes.get("size_budget"), "search": search_notes, "memory_plan": plan.to_dict(),
        "seconds": time.perf_counter() - t0}, indent=2, default=str))
    report = None
    if cfg.report and (output_dir / "results.parquet").exists():
        from ggufopt_ray.report.html import write_report

        report = str(write_report(output_dir))
    return SweepResult(output_dir=str(output_dir), rows=rows, best=best, pareto=pareto, baseline=baseline_meta,
                       dashboard_url=ray_info.dashboard_url, seconds=time.perf_counter() - t0,
                       errors=outcome.errors, resumed=outcome.resumed, report=report)


def baseline_footprint(encoding: str, n_chunks: int, scored_per_chunk: int, n_vocab: int) -> int:
    """Bytes the baseline keeps in the object store (and on disk) for these chunks."""
    from ggufopt_ray.metrics.memory_plan import baseline_bytes

    return baseline_bytes(encoding, n_vocab, n_chunks * scored_per_chunk)


def _check_baseline_footprint(cfg: SweepConfig, n_chunks: int, first: int, n_vocab: int, log) -> None:
    """Say early when the baseline will not fit the object store: Ray would spill it to disk and
    every trial would read it back from there. Big vocabularies (128k+) make this the first limit."""
    from ggufopt_ray.distributed.runtime import object_store_bytes

    scored = cfg.model.n_ctx - 1 - first
    need = baseline_footprint(cfg.metrics.encoding, n_chunks, scored, n_vocab)
    capacity = object_store_bytes()
    gib = 2.0**30
    if capacity and need > 0.5 * capacity:
        compact = baseline_footprint("compact", n_chunks, scored, n_vocab)
        log(f"warning  the {cfg.metrics.encoding} baseline takes {need / gib:.2f} GiB of the object store's "
            f"{capacity / gib:.2f} GiB; past its capacity Ray spills to disk and trials read the baseline "
            f"back from there. metrics.encoding=compact needs {compact / gib:.2f} GiB, or give Ray more "
            "object store memory")


def _n_layer(model_path: Path) -> int:
    from ggufopt_ray.gguf.inspect import open_reader

    reader = open_reader(model_path)
    arch = reader.fields["general.architecture"].contents()
    f = reader.fields.get(f"{arch}.block_count")
    return int(f.contents()) if f is not None else 0


def write_language_table(rows: list[dict], output_dir: Path) -> None:
    """``languages.parquet``: one row per (candidate, language) with that language's statistics."""
    import pandas as pd

    table = []
    for r in rows:
        for lang_row in json.loads(r["languages"]) if isinstance(r.get("languages"), str) else []:
            table.append({"label": r.get("label"), "trial_id": r.get("trial_id"),
                          "bits_per_weight": r.get("bits_per_weight"), **lang_row})
    path = output_dir / "languages.parquet"
    if table:
        tmp = path.with_name(path.name + ".partial")
        pd.DataFrame(table).to_parquet(tmp, index=False)
        tmp.replace(path)
    else:
        path.unlink(missing_ok=True)


def apply_final_estimates(rows: list[dict], estimates: dict[str, dict]) -> None:
    """Each row's borrowed-strength mean, recomputed with everything the sweep measured."""
    for row in rows:
        adj = estimates.get(row.get("label"))
        if adj:
            row.update({"kld_mean_adj": adj["estimate"], "kld_mean_adj_se": adj["se"], "kld_mean_adj_lo": adj["lo"],
                        "kld_mean_adj_hi": adj["hi"], "kld_mean_adj_control": adj.get("control") or ""})


def error_causes(errors: list[str]) -> dict[str, int]:
    """Trial errors grouped by message (the label before the first ': ' is dropped)."""
    causes: dict[str, int] = {}
    for e in errors:
        cause = e.split(": ", 1)[1] if ": " in e else e
        causes[cause] = causes.get(cause, 0) + 1
    return causes


def main_from_hydra(cfg) -> SweepResult:
    """Entry used by launch/sweep.py: typed config, Hydra run dir, readable output."""
    from hydra.core.hydra_config import HydraConfig

    from ggufopt_ray.config import to_sweep_config
    from ggufopt_ray.report.tables import format_results_table

    log_to_run_files()  # what the sweep prints also goes, with times, to the run directory's sweep.log
    sweep_cfg = to_sweep_config(cfg)
    if not sweep_cfg.verbose:
        # Hydra sets the root logger to INFO; gguf's writer would announce every file it writes,
        # and matplotlib that it built its font cache.
        for name in ("gguf", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)
    out = sweep_cfg.output_dir or HydraConfig.get().runtime.output_dir

    def say(message: str = "", stream=None) -> None:
        print(message, file=stream)
        if message:
            RUN_LOG.info(message)

    result = run_sweep(sweep_cfg, out, log=say)
    say()
    search = make_search(sweep_cfg.search)
    shown, left_out = search.table_rows(result.rows)
    say(format_results_table(shown, bub=search.table_kind() == "speed"))
    if left_out:
        say(left_out)
    if result.errors:
        causes = error_causes(result.errors)
        say(f"\n{len(result.errors)} trial(s) failed, {len(causes)} distinct cause(s):", sys.stderr)
        for cause, n in causes.items():
            say(f"  {n} x {cause}", sys.stderr)
        if not result.rows:
            raise UserError(f"every trial failed ({'; '.join(causes)}); fix the setting named above and rerun")
    say(f"\nresults in {result.output_dir} ({result.seconds:.0f} s)")
    if result.report:
        say(f"report   {result.report}")
    elif not sweep_cfg.report:
        say(f"report   not drawn (report=false); `ggufopt report {result.output_dir}` draws it")
    return result
