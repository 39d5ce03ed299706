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
    langs: list[str] = field(default_factory=lambda: ["en", "code"])
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
    encoding: str = "float16"  # how baseline log-probs are kept: exact, float16, llamacpp_uint16, topk, compact
    scored_from: Optional[int] = None  # first scored position per chunk; null = n_ctx // 2
    early_stopping: bool = True
    target: str = "composite"  # mean | median | p90 | p95 | p99 | composite
    confidence: float = 0.95
    margin: float = 0.1  # stop when the CI half-width < margin * estimate
    min_chunks: int = 4


@dataclass
class SearchConfig:
    name: str = "quant_types"  # quant_types | quant_mix | imatrix_size | zfp | bub | combined
    mode: str = "grid"  # grid: every listed value; optuna: Ray Tune + OptunaSearch
    num_samples: int = 8  # optuna trials
    types: list[str] = field(default_factory=lambda: ["Q8_0", "Q6_K", "Q4_K_M", "Q4_0"])
    imatrix: bool = False  # quantize with an importance matrix from the calibration chunks
    target_bpw: Optional[float] = None  # quant_mix: size budget in bits per weight
    # quant_mix with target_bpw null: the budget is the base type's own size on this model plus
    # this many bits per weight (a fixed number suits one model, not every model)
    target_bpw_over_base: Optional[float] = None
    base_type: str = "Q4_K_M"  # quant_mix: the plain type the mixes start from
    mix_types: list[str] = field(default_factory=lambda: ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
    mix_groups: list[str] = field(default_factory=lambda: [  # tensor groups a mix may change
        "attn_v", "attn_k", "attn_qo", "ffn_down", "ffn_up_gate", "output", "token_embd",
        "first_layers", "last_layers"])
    imatrix_chunks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    imatrix_gain_threshold: float = 0.01
    zfp_modes: list[str] = field(default_factory=lambda: ["rate"])
    zfp_rates: list[float] = field(default_factory=lambda: [4.0, 6.0, 8.0, 12.0])
    zfp_dims: list[int] = field(default_factory=lambda: [1, 2])
    bub_max_log2: int = 9
    bub_min_log2: int = 4
    scheduler: str = "none"  # none | asha | median
    objectives: list[str] = field(default_factory=lambda: ["composite"])  # add bits_per_weight for a Pareto front
    seed: int = 0


@dataclass
class ClusterConfig:
    mode: str = "local"  # local: start Ray in-process; ray: connect to an existing cluster
    address: Optional[str] = None  # auto, or ray://host:10001
    num_cpus: Optional[int] = None
    num_gpus: int = 0
    logits_workers: int = 1
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)  # e.g. {gpu_node: 0.01}
    task_resources: dict[str, float] = field(default_factory=dict)  # e.g. {cpu_node: 0.01}
    task_cpus: float = 0.0  # CPUs a quantize/imatrix task asks for (0: borrow the waiting trial's)
    trial_cpus: float = 1.0  # CPUs per trial (its llama.cpp threads)
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
    search: SearchConfig = field(default_factory=SearchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output_dir: Optional[str] = None  # null = Hydra's run directory
    cache_dir: Optional[str] = None  # null = $GGUFOPT_CACHE_DIR or ~/.cache/ggufopt_ray
    verbose: bool = False
    seed: int = 0


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (called by launch/sweep.py)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=SweepConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="metrics", name="metrics_schema", node=MetricsConfig)
    cs.store(group="search", name="search_schema", node=SearchConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)


def to_sweep_config(cfg: Any) -> SweepConfig:
    """A DictConfig (or dict) -> SweepConfig dataclass, validated by OmegaConf's typed merge."""
    from omegaconf import OmegaConf

    if isinstance(cfg, SweepConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), cfg)
    return OmegaConf.to_object(merged)
