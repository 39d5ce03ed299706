"""Typed experiment configuration, shared by Hydra (``conf/``) and library callers.

The dataclasses are registered as Hydra structured configs, so a misspelt key or a value of the
wrong type in ``conf/*.yaml`` or on the command line fails at once with a message naming it.
Library code receives plain dataclass instances (``to_sweep_config``), never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    path: Optional[str] = None  # a GGUF file; null = the built-in synthetic model
    synth_seed: int = 0  # built-in model only
    synth_dtype: str = "f32"  # built-in model only: f32 or f16
    n_ctx: int = 256
    n_batch: int = 256
    n_ubatch: int = 256
    n_threads: Optional[int] = None  # null = all CPUs the worker may use
    n_gpu_layers: int = 0  # offloaded layers on GPU workers; ignored by CPU-only builds
    flash_attn: bool = False


@dataclass
class DatasetConfig:
    source: str = "builtin"  # builtin | local | hf | a plugin name
    path: Optional[str] = None  # local files / glob, or a Hugging Face dataset id or local path
    langs: list[str] = field(default_factory=lambda: ["en", "code", "de"])  # each chunk is one language
    samples_per_lang: int = 200
    skip: int = 0
    text_field: str = "text"
    config_pattern: Optional[str] = None  # HF config name per language, e.g. unshuffled_deduplicated_{lang}
    split: str = "train"
    plugin_file: Optional[str] = None
    plugin_class: Optional[str] = None
    eval_chunks: int = 16
    calib_chunks: int = 8
    seed: int = 0


@dataclass
class MetricsConfig:
    # how baseline log-probs are kept: auto (float16 when it fits the object store, else compact),
    # exact, float16, llamacpp_uint16, topk, compact
    encoding: str = "auto"
    scored_from: Optional[int] = None  # first scored position per chunk; null = n_ctx // 2
    early_stopping: bool = True
    target: str = "mean"  # mean | median | p90 | p95 | p99 | composite: the statistic stopping pins down
    confidence: float = 0.95
    margin: float = 0.1  # stop when the CI half-width < margin * estimate
    min_chunks: int = 4
    # Racing: candidates are compared on the chunks they share; one that a no-larger candidate
    # beats with confidence stops (dominated_by=...), and means borrow strength from the other
    # candidates' chunks (two-way fit of chunk difficulty) before the precision rule acts.
    racing: bool = True
    alpha: float = 0.05  # chance that a candidate on the size/quality front is ever stopped as dominated
    min_paired_chunks: int = 3  # shared chunks before any dominance decision
    max_chunks: Optional[int] = None  # cap on chunks per candidate; null = every evaluation chunk
    control: str = "auto"  # auto | twoway | reference | entropy | none: what the means borrow strength from
    # staggered: candidates share the first min_chunks chunks, then each walks the rest from its
    # own offset, so early stops cover different chunks and every chunk's difficulty is learned
    # once per sweep (two-way estimator); shared: every candidate in the same order
    chunk_order: str = "staggered"
    per_language: bool = False  # the precision rule must hold in every language's chunks, not only pooled


@dataclass
class SearchConfig:
    """The settings every search has; each search extends it with its own typed config
    (``ggufopt_ray/searches/<name>.py``), registered with Hydra as ``search/<name>_schema``."""

    name: str = "quant_types"  # one of ggufopt_ray.searches.SEARCHES
    mode: str = "grid"  # grid: every listed value; optuna: Ray Tune + OptunaSearch
    num_samples: int = 8  # optuna trials
    scheduler: str = "none"  # none | asha | median
    objectives: list[str] = field(default_factory=lambda: ["composite"])  # add bits_per_weight for a Pareto front
    seed: int = 0


def _default_search() -> SearchConfig:
    from ggufopt_ray.searches.quant_types import QuantTypesConfig

    return QuantTypesConfig()


@dataclass
class ClusterConfig:
    mode: str = "local"  # local: start Ray in-process; ray: connect to an existing cluster
    address: Optional[str] = None  # auto, or ray://host:10001
    num_cpus: Optional[int] = None
    object_store_gib: Optional[float] = None  # cluster=local: Ray's object store size (null: Ray's default, 30% of RAM)
    num_gpus: int = 0
    logits_workers: int = 1
    worker_cpus: Optional[float] = None  # CPUs per baseline worker; null: a local cluster's free CPUs, 1 on a cluster
    worker_gpus: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)  # e.g. {gpu_node: 0.01}
    task_resources: dict[str, float] = field(default_factory=dict)  # e.g. {cpu_node: 0.01}
    task_cpus: float = 0.0  # CPUs of a quantize/imatrix task (0: the trial does it, unless task_resources)
    trial_cpus: Optional[float] = None  # CPUs per trial (its llama.cpp threads); null: CPUs / trials, at least 1
    max_concurrent_trials: Optional[int] = None
    max_failures: int = 2
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265


@dataclass
class SweepConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    search: SearchConfig = field(default_factory=_default_search)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output_dir: Optional[str] = None  # null = Hydra's run directory
    cache_dir: Optional[str] = None  # null = $GGUFOPT_CACHE_DIR or ~/.cache/ggufopt_ray
    verbose: bool = False
    seed: int = 0
    overwrite: bool = False  # true: discard the results of another sweep in output_dir instead of refusing
    # false: no report.html, report.md and plots at the end (drawing them costs seconds per sweep,
    # a lot in a multirun of many small sweeps); `ggufopt report DIR` draws them later
    report: bool = True


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (called by launch/sweep.py)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    # The primary schema types ``search`` as the base class, so any search's schema merges into it.
    cs.store(name="sweep_schema", node=SweepConfig(search=SearchConfig()))
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="metrics", name="metrics_schema", node=MetricsConfig)
    from ggufopt_ray.searches import SEARCHES

    for name, search in SEARCHES.items():  # one schema per search: conf/search/<name>.yaml names it
        cs.store(group="search", name=f"{name}_schema", node=search.config_class)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)


def to_sweep_config(cfg: Any) -> SweepConfig:
    """A DictConfig (or dict) -> SweepConfig dataclass, validated by OmegaConf's typed merge.

    The search part is checked against the typed config of the search it names."""
    from omegaconf import OmegaConf

    from ggufopt_ray.searches import search_class

    if isinstance(cfg, SweepConfig):
        return cfg
    name = OmegaConf.select(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg, "search.name",
                            default=None) or SearchConfig.name
    schema = SweepConfig(search=search_class(name).config_class())
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    return OmegaConf.to_object(merged)
