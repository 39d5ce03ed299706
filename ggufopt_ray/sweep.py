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
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ggufopt_ray.config import SweepConfig
from ggufopt_ray.errors import UserError

QUALITY_SEARCHES = ("quant_types", "quant_mix", "imatrix_size", "zfp", "combined")


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
        write_synthetic_model(path, SynthSpec(seed=cfg.model.synth_seed, dtype=cfg.model.synth_dtype))
    return path


def prepare_data(cfg: SweepConfig, model_path: Path, cache: Path):
    """Evaluation and calibration chunks for the model's tokenizer (reused when up to date)."""
    import hashlib

    from ggufopt_ray.data import ChunkParams, load_chunks, make_source, prepare_chunks

    d = cfg.dataset
    options = {}
    if d.source not in ("builtin",):
        options = {k: v for k, v in {"source": d.path, "config": d.config_pattern, "split": d.split,
                                     "text_field": d.text_field}.items() if v is not None}
        if d.source in ("local", "files"):
            options = {"files": d.path, "text_field": d.text_field}
    src = make_source(d.source if not d.plugin_file else None, plugin_file=d.plugin_file,
                      plugin_class=d.plugin_class, **options)
    key = hashlib.sha256(json.dumps([asdict(d), str(model_path), cfg.model.n_ctx], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    out = cache / "chunks" / f"chunks-{key}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = ChunkParams(n_ctx=cfg.model.n_ctx, n_calibration=d.calib_chunks, n_evaluation=d.eval_chunks,
                         seed=d.seed)
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


def validate(cfg: SweepConfig) -> None:
    """Cheap checks before anything starts, so a bad setting never costs a Ray start."""
    from ggufopt_ray.distributed.spaces import SEARCHES

    if cfg.search.name not in SEARCHES:
        raise UserError(f"search.name={cfg.search.name!r} is not a search; choose one of {', '.join(SEARCHES)}")
    if cfg.search.mode not in ("grid", "optuna"):
        raise UserError(f"search.mode must be grid or optuna, not {cfg.search.mode!r}")
    if cfg.model.n_ubatch > cfg.model.n_batch:
        raise UserError(f"model.n_ubatch ({cfg.model.n_ubatch}) must not exceed model.n_batch ({cfg.model.n_batch})")
    if cfg.dataset.eval_chunks < 1:
        raise UserError("dataset.eval_chunks must be at least 1")
    if cfg.search.name == "quant_types" and not cfg.search.types:
        raise UserError("search.types is empty; list quant types, e.g. search.types=[Q8_0,Q4_K_M]")
    if cfg.search.name != "bub" and cfg.search.mode == "grid":
        from ggufopt_ray.engine.quantize import resolve_file_type

        for t in list(cfg.search.types) + [cfg.search.base_type]:
            resolve_file_type(t)


def run_sweep(cfg: SweepConfig, output_dir: str | Path, resume: bool = True, log=print,
              on_baseline_ready=None) -> SweepResult:
    """Run the sweep of ``cfg``; rerunning with the same ``output_dir`` resumes an interrupted one.

    ``on_baseline_ready(store)`` is called once the baseline chunks are in the object store and
    before any trial starts (tools use it to archive the store; tests to prove trials never read it).
    """
    from ggufopt_ray.distributed.baseline import run_baseline
    from ggufopt_ray.distributed.progress import ProgressLine
    from ggufopt_ray.distributed.runtime import start_ray
    from ggufopt_ray.distributed.spaces import grid_configs, optuna_space
    from ggufopt_ray.distributed.trials import TrialContext, bub_trial, quality_trial
    from ggufopt_ray.distributed.tune_runner import run_trials
    from ggufopt_ray.engine.native import versions
    from ggufopt_ray.evaluation import encoding_params
    from ggufopt_ray.gguf.inspect import inspect_model, model_fingerprint
    from ggufopt_ray.report.tables import finalize_results
    from ggufopt_ray.store.baseline import BaselineStore, baseline_identity

    t0 = time.perf_counter()
    validate(cfg)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
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
    budget = resolve_size_budget(cfg, model_path, _n_layer(model_path))
    if budget is not None:  # the trials see the budget resolved for this model
        cfg = replace(cfg, search=replace(cfg.search, target_bpw=budget["target_bpw"]))
        log(f"budget   {cfg.search.base_type} is {budget['base_bpw']:.3f} bpw on this model; "
            f"mixes up to {budget['target_bpw']:.3f} bpw")

    ev, cal = prepare_data(cfg, model_path, cache)
    log(f"data     {len(ev)} evaluation + {len(cal) if cal else 0} calibration chunks of {cfg.model.n_ctx} tokens "
        f"({cfg.dataset.source})")

    ray_info = start_ray(cfg.cluster, verbose=cfg.verbose)
    log(f"ray      {ray_info.num_cpus:g} CPUs, {ray_info.num_gpus:g} GPUs"
        + (f"; dashboard {ray_info.dashboard_url}" if ray_info.dashboard_url else ""))

    first = cfg.metrics.scored_from if cfg.metrics.scored_from is not None else cfg.model.n_ctx // 2
    if not 0 <= first < cfg.model.n_ctx - 1:
        raise UserError(f"metrics.scored_from={first} leaves nothing to score in chunks of {cfg.model.n_ctx}")
    _check_baseline_footprint(cfg, len(ev), first, info.vocab_size, log)
    ver = versions()
    header = {"model_fingerprint": model_fp, "vocab_fingerprint": info.vocab_fingerprint,
              "corpus_fingerprint": ev.fingerprint, "n_ctx": cfg.model.n_ctx, "n_vocab": info.vocab_size,
              "encoding": cfg.metrics.encoding, "encoding_params": encoding_params(cfg.metrics.encoding),
              "first": first, "n_chunks": len(ev), "model_path": str(model_path),
              "runtime": _settings(cfg), "llama_cpp": ver}
    store = BaselineStore.create_or_open(cache / "baselines" / baseline_identity(header), header)
    settings = _settings(cfg)
    is_bub = cfg.search.name == "bub"
    baseline_meta = {"baseline_id": store.baseline_id, "store": str(store.root), "computed": 0, "loaded": 0}
    refs = []
    if not is_bub:
        base = run_baseline(store, ev.chunks, str(model_path), settings, cfg.metrics.encoding, first, cfg.cluster)
        refs = base.refs
        baseline_meta.update(computed=base.computed, loaded=base.loaded, seconds=round(base.seconds, 3),
                             worker_nodes=base.worker_nodes)
        size = baseline_footprint(cfg.metrics.encoding, len(ev), cfg.model.n_ctx - 1 - first, info.vocab_size)
        log(f"baseline {base.computed} chunks computed, {base.loaded} loaded from {store.root} "
            f"({size / 2**20:,.1f} MiB, {cfg.metrics.encoding})")
        if on_baseline_ready is not None:
            on_baseline_ready(store)

    ctx = TrialContext(base_model=str(model_path), model_fp=model_fp, settings=settings, tokens=list(ev.chunks),
                       baseline_refs=refs, baseline_id=store.baseline_id, encoding=cfg.metrics.encoding,
                       first=first, metrics=cfg.metrics, search=cfg.search, cluster=cfg.cluster,
                       cache_dir=str(cache), calib_tokens=list(cal.chunks) if cal else [],
                       calib_fingerprint=cal.fingerprint if cal else "", versions=ver,
                       trial_cpus=cfg.cluster.trial_cpus, events_path=str(output_dir / "events.jsonl"))
    n_calib = len(cal) if cal else 0
    grid = space = None
    if cfg.search.mode == "grid":
        grid = grid_configs(cfg.search, _n_layer(model_path), cfg.model.n_ctx, n_calib)
    else:
        space = optuna_space(cfg.search, _n_layer(model_path), cfg.model.n_ctx, n_calib)
    total = len(grid) if grid is not None else cfg.search.num_samples
    from ray import tune

    trainable = tune.with_parameters(bub_trial if is_bub else quality_trial, ctx=ctx)
    t_trials = time.perf_counter()
    outcome = run_trials(trainable, search=cfg.search, cluster=cfg.cluster, storage_path=output_dir / "ray_results",
                         grid=grid, space=space, n_chunks=len(ev), min_chunks=cfg.metrics.min_chunks,
                         callbacks=[ProgressLine(total, len(ev))], resume=resume)
    baseline_meta["trials_seconds"] = round(time.perf_counter() - t_trials, 3)
    provenance = {"model": str(model_path), "model_fingerprint": model_fp,
                  "vocab_fingerprint": info.vocab_fingerprint, "corpus_fingerprint": ev.fingerprint,
                  "dataset_fingerprint": ev.dataset_fingerprint, "baseline_id": store.baseline_id,
                  "encoding": cfg.metrics.encoding, "n_ctx": cfg.model.n_ctx, "n_batch": cfg.model.n_batch,
                  "n_ubatch": cfg.model.n_ubatch, "trial_threads": int(cfg.cluster.trial_cpus),
                  "seed": cfg.seed, "search_seed": cfg.search.seed, "dataset_seed": cfg.dataset.seed,
                  "llama_cpp_python": ver.get("llama_cpp_python")}
    rows, best, pareto = finalize_results(outcome.rows, outcome.history, output_dir, provenance,
                                          bub=is_bub, imatrix_threshold=cfg.search.imatrix_gain_threshold)
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
        "resumed": outcome.resumed, "dashboard_url": ray_info.dashboard_url, "size_budget": budget,
        "seconds": time.perf_counter() - t0}, indent=2, default=str))
    report = None
    if (output_dir / "results.parquet").exists():
        from ggufopt_ray.report.html import write_report

        report = str(write_report(output_dir))
    return SweepResult(output_dir=str(output_dir), rows=rows, best=best, pareto=pareto, baseline=baseline_meta,
                       dashboard_url=ray_info.dashboard_url, seconds=time.perf_counter() - t0,
                       errors=outcome.errors, resumed=outcome.resumed, report=report)


def baseline_footprint(encoding: str, n_chunks: int, scored_per_chunk: int, n_vocab: int) -> int:
    """Bytes the baseline keeps in the object store (and on disk) for these chunks."""
    from ggufopt_ray.metrics.encodings import get_encoding

    return int(n_chunks * scored_per_chunk * get_encoding(encoding).bytes_per_token(n_vocab))


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


def resolve_size_budget(cfg: SweepConfig, model_path: Path, n_layer: int) -> dict | None:
    """The quant_mix size budget on this model (``None`` without one), in bits per weight.

    A plain type's size depends on the model (output and embedding matrices weigh more in small
    models: Q4_K_M is 5.0 bpw on the tiny model, 5.23 on a 7M-parameter one), so the budget can be
    given relative to the base type. A budget that no mix can meet is refused here, by dry runs
    that take milliseconds, rather than after every trial has been rejected.
    """
    search = cfg.search
    if search.name != "quant_mix" or (search.target_bpw is None and search.target_bpw_over_base is None):
        return None
    from ggufopt_ray.distributed.spaces import mix_groups, mix_overrides
    from ggufopt_ray.engine.quantize import quantize_model

    def dry_bpw(overrides=()) -> float:
        return quantize_model(model_path, search.base_type, dry_run=True, threads=1,
                              tensor_types=list(overrides) or None).bits_per_weight

    base = dry_bpw()
    target = float(search.target_bpw if search.target_bpw is not None
                   else round(base + float(search.target_bpw_over_base), 4))
    if target < base:
        groups = mix_groups(search)
        smallest = min([base] + [dry_bpw(mix_overrides({f"mix_{g}": t for g in groups}, n_layer))
                                 for t in search.mix_types])
        if target < smallest:
            raise UserError(f"search.target_bpw={target:g} is below the smallest mix of {search.base_type} with "
                            f"{list(search.mix_types)} on this model ({smallest:.3f} bpw; the base type alone is "
                            f"{base:.3f}); raise search.target_bpw, or add smaller search.mix_types, or pick a "
                            "smaller search.base_type")
    return {"base_type": search.base_type, "base_bpw": round(base, 4), "target_bpw": target}


def _n_layer(model_path: Path) -> int:
    from ggufopt_ray.gguf.inspect import open_reader

    reader = open_reader(model_path)
    arch = reader.fields["general.architecture"].contents()
    f = reader.fields.get(f"{arch}.block_count")
    return int(f.contents()) if f is not None else 0


def main_from_hydra(cfg) -> SweepResult:
    """Entry used by launch/sweep.py: typed config, Hydra run dir, readable output."""
    from hydra.core.hydra_config import HydraConfig

    from ggufopt_ray.config import to_sweep_config
    from ggufopt_ray.report.tables import format_results_table

    sweep_cfg = to_sweep_config(cfg)
    if not sweep_cfg.verbose:
        # Hydra sets the root logger to INFO; gguf's writer would announce every file it writes.
        logging.getLogger("gguf").setLevel(logging.WARNING)
    out = sweep_cfg.output_dir or HydraConfig.get().runtime.output_dir
    result = run_sweep(sweep_cfg, out)
    print()
    print(format_results_table(result.rows, bub=sweep_cfg.search.name == "bub"))
    if result.errors:
        print(f"\n{len(result.errors)} trial(s) failed:", file=sys.stderr)
        for e in result.errors:
            print(f"  {e}", file=sys.stderr)
    print(f"\nresults in {result.output_dir} ({result.seconds:.0f} s)")
    if result.report:
        print(f"report   {result.report}")
    return result
