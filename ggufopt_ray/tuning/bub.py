"""Batch/ubatch tuning: the ``n_batch``/``n_ubatch`` pair that generates all-position logits fastest.

The baseline and every candidate evaluation run ``LogitsEngine.logits`` over chunks of ``n_ctx``
tokens with every position as an output, so that is exactly what the objective times (the
original's best_bub timed completion calls with ``logits_all=False``, whose tiny output buffer
does not transfer to logits generation). The objective is tokens per second over ``n_chunks``
chunks, after one untimed warm-up chunk, with model loading excluded from the clock (the
original's timer included it). A configuration's figure is the median of its chunks' tokens/s
(the mean is kept too): on a shared machine a burst of contention in one chunk would otherwise
decide the ranking.

Search space: ``n_ubatch <= n_batch <= n_ctx``, both taken from a ladder of sizes (powers of two
from ``min_size`` up to ``n_ctx``, plus ``n_ctx`` itself when it is not a power of two, since
that is what llama.cpp's default ``n_batch=2048`` clips to). Optuna sees two integer levels
(indices into the ladder, i.e. exponents for the power-of-two ladder) with a dynamic upper bound
for the ubatch level, the form Optuna's TPE handles for conditional bounds. The llama.cpp default
(``n_batch=min(2048, n_ctx)``, ``n_ubatch=min(512, n_batch)``) is enqueued first. Results are
kept by configuration, not read back from ``study.best_params``, so any winner (the enqueued
default included: the original crashed with KeyError when it won) is reported the same way.
TPE proposing an already measured configuration costs nothing: that ask is discarded and, after
a few in a row, an unmeasured configuration is enqueued at random (seeded) instead.

Pruning: each chunk's tokens/s is reported as an intermediate value; ``MedianPruner`` stops a
configuration whose best chunk so far is below the median of earlier configurations at the same
chunk (not before the second chunk, nor before two configurations have completed).

Memory guard (``estimate_memory``): llama.cpp's host memory for one configuration is modelled as

- model weights: the file's size (mmap'd, all pages touched by a full forward pass);
- KV cache: ``2 (K and V) * n_layer * n_ctx_pad * n_head_kv * head_dim * 2 bytes`` (F16 cache),
  with ``n_ctx_pad`` = n_ctx rounded up to 256, as llama.cpp pads it;
- compute buffer: ``n_ubatch * (max(n_vocab, n_head * n_ctx_pad) + 2 * n_ff + 4 * n_embd) * 4``
  bytes, the largest live activations of one ubatch (the logits or the attention scores, plus
  the FFN and residual streams);
- logits output buffer: ``n_batch * n_vocab * 4`` bytes (every position of a batch is an output);
- the result array of one chunk: ``n_ctx * n_vocab * 4`` bytes.

Checked against llama.cpp's own reports on the synthetic model and tinycode-a, the compute-buffer
term is exact to 25 % over (never under). Configurations whose estimate exceeds the budget
(default: 80 % of MemAvailable from /proc/meminfo, or psutil) are skipped before the search;
the estimate grows with both sizes, so the allowed region is a staircase the dynamic bounds
describe exactly. GPU memory is not modelled.

Results are cached as JSON keyed by the model's fingerprint (``gguf.inspect.model_fingerprint``:
size, tensor table and sampled content),
n_ctx, threads, offload/flash-attention, the size ladder and the hardware (CPU model, CPU count,
llama.cpp system info and binding version). A cached best that no longer fits the current memory
budget is ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ggufopt_ray.errors import UserError

LLAMA_DEFAULT_N_BATCH = 2048
LLAMA_DEFAULT_N_UBATCH = 512
DEFAULT_MIN_SIZE = 16
DEFAULT_NEAR_BEST_PCT = 5.0
DEFAULT_MEMORY_FRACTION = 0.8
CACHE_VERSION = 1

# (step, tokens_per_s of that chunk) -> True to stop measuring (pruned)
ChunkReport = Callable[[int, float], bool]


# -- configurations -----------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class BubConfig:
    n_batch: int
    n_ubatch: int

    def validate(self, n_ctx: int) -> None:
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise UserError(f"n_batch and n_ubatch must be positive, got {self.n_batch},{self.n_ubatch}")
        if self.n_ubatch > self.n_batch:
            raise UserError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch}); "
                            "give BATCH,UBATCH with UBATCH <= BATCH")
        if self.n_batch > n_ctx:
            raise UserError(f"n_batch ({self.n_batch}) must not exceed n_ctx ({n_ctx}); llama.cpp "
                            "would clip it, so lower it to at most the context")

    def label(self) -> str:
        return f"{self.n_batch}/{self.n_ubatch}"


def llama_default_config(n_ctx: int) -> BubConfig:
    """llama.cpp's defaults (n_batch 2048, n_ubatch 512) as they apply at context ``n_ctx``."""
    n_batch = min(LLAMA_DEFAULT_N_BATCH, int(n_ctx))
    return BubConfig(n_batch, min(LLAMA_DEFAULT_N_UBATCH, n_batch))


def size_ladder(n_ctx: int, min_size: int = DEFAULT_MIN_SIZE,
                sizes: Sequence[int] | None = None) -> list[int]:
    """Allowed batch/ubatch sizes, ascending: powers of two in [min_size, n_ctx] (+ n_ctx itself).

    ``sizes`` replaces the power-of-two ladder by an explicit list (values above n_ctx dropped).
    """
    n_ctx = int(n_ctx)
    if sizes:
        ladder = sorted({int(s) for s in sizes if 1 <= int(s) <= n_ctx})
        if not ladder:
            raise UserError(f"none of the sizes {list(sizes)} is in [1, n_ctx={n_ctx}]")
        return ladder
    if min_size < 1:
        raise UserError(f"the smallest batch size must be positive, not {min_size}")
    lo = min(int(min_size), n_ctx)
    ladder = []
    s = 1 << max(0, math.ceil(math.log2(lo)))
    while s <= n_ctx:
        ladder.append(s)
        s <<= 1
    if not ladder or ladder[-1] != n_ctx:
        ladder.append(n_ctx)
    return ladder


def all_configs(ladder: Sequence[int]) -> list[BubConfig]:
    return [BubConfig(b, u) for b in ladder for u in ladder if u <= b]


# -- memory ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """The shape numbers the memory model needs, read from any architecture's GGUF metadata."""

    architecture: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_ctx_train: int | None
    file_size: int
    add_bos: bool
    bos_id: int

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ModelDims":
        from ggufopt_ray.gguf.inspect import open_reader

        path = Path(path)
        reader = open_reader(path)
        fields = reader.fields

        def get(key, default=None):
            f = fields.get(key)
            if f is None:
                return default
            v = f.contents()
            if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): the largest layer
                v = max(v) if v else default
            return v

        arch = str(get("general.architecture", "unknown"))
        tokens = fields.get("tokenizer.ggml.tokens")
        n_vocab = get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else 0)
        n_embd = get(f"{arch}.embedding_length")
        if not n_embd or not n_vocab:
            emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            if emb is None:
                raise UserError(f"{path}: cannot find the embedding size or vocabulary size in the GGUF "
                                "metadata; is it a language model?")
            shape = [int(x) for x in emb.shape]
            n_embd = n_embd or shape[0]
            n_vocab = n_vocab or shape[1]
        n_embd = int(n_embd)
        n_layer = int(get(f"{arch}.block_count", 1) or 1)
        n_head = int(get(f"{arch}.attention.head_count", 1) or 1)
        n_head_kv = int(get(f"{arch}.attention.head_count_kv", n_head) or n_head)
        head_dim_k = int(get(f"{arch}.attention.key_length", n_embd // n_head) or n_embd // n_head)
        head_dim_v = int(get(f"{arch}.attention.value_length", head_dim_k) or head_dim_k)
        n_ff = int(get(f"{arch}.feed_forward_length", 4 * n_embd) or 4 * n_embd)
        ctx_train = get(f"{arch}.context_length")
        return cls(architecture=arch, n_vocab=int(n_vocab), n_embd=n_embd, n_layer=n_layer,
                   n_head=n_head, n_head_kv=n_head_kv, head_dim_k=head_dim_k, head_dim_v=head_dim_v,
                   n_ff=n_ff, n_ctx_train=int(ctx_train) if ctx_train else None,
                   file_size=path.stat().st_size,
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
                   bos_id=int(get("tokenizer.ggml.bos_token_id", -1)))


@dataclass(frozen=True)
class MemoryEstimate:
    model: int
    kv_cache: int
    compute: int
    logits_output: int
    result_array: int

    @property
    def total(self) -> int:
        return self.model + self.kv_cache + self.compute + self.logits_output + self.result_array

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def estimate_memory(dims: ModelDims, n_ctx: int, config: BubConfig) -> MemoryEstimate:
    """Host memory one configuration needs (bytes); the model is in the module docstring."""
    n_ctx_pad = int(math.ceil(n_ctx / 256) * 256)
    kv = dims.n_layer * n_ctx_pad * dims.n_head_kv * (dims.head_dim_k + dims.head_dim_v) * 2  # F16 K + V
    per_token = max(dims.n_vocab, dims.n_head * n_ctx_pad) + 2 * dims.n_ff + 4 * dims.n_embd
    compute = config.n_ubatch * per_token * 4
    return MemoryEstimate(model=dims.file_size, kv_cache=int(kv), compute=int(compute),
                          logits_output=config.n_batch * dims.n_vocab * 4,
                          result_array=int(n_ctx) * dims.n_vocab * 4)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _psutil_available() -> int | None:
    """psutil's figure, where /proc/meminfo is missing (psutil comes with ray[default])."""
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def available_memory() -> int:
    """Bytes of memory available to new allocations now (MemAvailable), not the total."""
    avail = _meminfo_available()
    if avail is None:
        avail = _psutil_available()
    if avail is None:
        raise UserError("cannot tell how much memory is available (no /proc/meminfo, no psutil); "
                        "give a memory budget explicitly")
    return avail


def default_memory_budget(fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    return int(available_memory() * fraction)


def parse_memory_budget(text: str | int | float | None) -> int | None:
    """``None``/'' -> None; '8G', '512MiB', '1.5GB', '123456' -> bytes; a value <= 1 -> that
    fraction of the memory available now."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        s = str(text).strip().upper().replace(" ", "")
        for suffix in ("IB", "B"):
            if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in "KMGT":
                s = s[: -len(suffix)]
                break
        unit = s[-1] if s and s[-1] in "KMGT" else ""
        num = s[:-1] if unit else s
        try:
            value = float(num)
        except ValueError:
            raise UserError(f"cannot read memory budget {text!r}; write e.g. 8G, 512M, 1073741824 "
                            "or 0.5 (half of the available memory)")
    if value <= 0:
        raise UserError(f"the memory budget must be positive, not {text!r}")
    if not unit and value <= 1:
        return int(available_memory() * value)
    return int(value * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


# -- measurements ----------------------------------------------------------------------------------
@dataclass
class ConfigMeasurement:
    """Logits throughput of one configuration; ``status`` is complete, pruned or failed."""

    n_batch: int
    n_ubatch: int
    status: str
    tokens_per_s: float  # median over the timed chunks of each chunk's tokens/s (nan if none)
    chunk_tokens_per_s: list[float] = field(default_factory=list)
    mean_tokens_per_s: float = float("nan")  # total tokens / total seconds
    load_seconds: float = 0.0
    memory_estimate: int = 0
    error: str = ""

    @property
    def config(self) -> BubConfig:
        return BubConfig(self.n_batch, self.n_ubatch)

    @property
    def stdev(self) -> float:
        v = self.chunk_tokens_per_s
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stdev"] = self.stdev
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ConfigMeasurement":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)


def make_chunks(dims: ModelDims, n_ctx: int, n_chunks: int, tokens: np.ndarray | None = None,
                seed: int = 0) -> list[np.ndarray]:
    """``n_chunks + 1`` chunks of ``n_ctx`` tokens (the first is the warm-up), BOS first.

    From ``tokens`` (a token stream, reused cyclically) when given, else random ids (the speed of
    a dense model does not depend on which tokens it sees).
    """
    if n_chunks < 1:
        raise UserError(f"need at least one timed chunk, not {n_chunks}")
    need = (n_chunks + 1) * n_ctx
    if tokens is not None and len(tokens):
        stream = np.resize(np.asarray(tokens, dtype=np.int32), need)
    else:
        stream = np.random.default_rng(seed).integers(0, dims.n_vocab, size=need, dtype=np.int32)
    chunks = [stream[i * n_ctx:(i + 1) * n_ctx].copy() for i in range(n_chunks + 1)]
    if dims.add_bos and dims.bos_id >= 0:
        for c in chunks:
            c[0] = dims.bos_id
    return chunks


def measure_config(model_path: str | Path, n_ctx: int, config: BubConfig, chunks: Sequence[np.ndarray],
                   n_threads: int | None = None, n_gpu_layers: int = 0, flash_attn: bool = False,
                   warmup: bool = True, report: ChunkReport | None = None) -> ConfigMeasurement:
    """Time ``LogitsEngine.logits`` (all positions) on ``chunks`` with one configuration.

    A fresh engine is created for the configuration (its load time is recorded, not timed);
    ``chunks[0]`` is an untimed warm-up when ``warmup``. ``report(step, tokens_per_s)`` is called
    after each timed chunk and stops the measurement (status ``pruned``) when it returns True.
    A context llama.cpp refuses to create (out of memory) gives status ``failed``.
    """
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings

    settings = RuntimeSettings(n_ctx=n_ctx, n_batch=config.n_batch, n_ubatch=config.n_ubatch,
                               n_threads=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn)
    t0 = time.perf_counter()
    try:
        engine = LogitsEngine(model_path, settings)
    except UserError as exc:
        if "could not create a context" in str(exc):
            return ConfigMeasurement(config.n_batch, config.n_ubatch, "failed", float("nan"),
                                     load_seconds=time.perf_counter() - t0, error=str(exc))
        raise
    load_seconds = time.perf_counter() - t0
    rates: list[float] = []
    total_tokens, total_seconds = 0, 0.0
    status = "complete"
    try:
        out = np.empty((n_ctx, engine.n_vocab), dtype=np.float32)
        timed = list(chunks)
        if warmup and len(timed) > 1:
            engine.logits(timed[0], out=out[: len(timed[0])])
            timed = timed[1:]
        for step, chunk in enumerate(timed):
            t = time.perf_counter()
            engine.logits(chunk, out=out[: len(chunk)])
            dt = time.perf_counter() - t
            rates.append(len(chunk) / dt)
            total_tokens += len(chunk)
            total_seconds += dt
            if report is not None and report(step, rates[-1]) and step < len(timed) - 1:
                status = "pruned"
                break
    finally:
        engine.close()
    median = float(np.median(rates)) if rates else float("nan")
    mean = total_tokens / total_seconds if total_seconds > 0 else float("nan")
    return ConfigMeasurement(config.n_batch, config.n_ubatch, status, median, rates,
                             mean_tokens_per_s=mean, load_seconds=load_seconds)


# -- results ---------------------------------------------------------------------------------------
@dataclass
class BubResult:
    """Best configuration, the near-best ones, and every measurement that led there."""

    model: str
    n_ctx: int
    n_threads: int
    method: str  # "optuna-tpe", "grid" or "manual"
    best: ConfigMeasurement
    near_best: list[ConfigMeasurement]
    default: ConfigMeasurement | None
    evaluations: list[ConfigMeasurement]
    skipped_memory: list[BubConfig]
    grid_size: int  # configurations in the space that fit the memory budget
    ladder: list[int]
    memory_budget: int
    near_best_pct: float
    n_chunks: int
    seed: int
    seconds: float
    cache_key: str = ""
    from_cache: bool = False
    cache_path: str = ""
    fingerprint: dict = field(default_factory=dict)

    @property
    def n_evaluations(self) -> int:
        """Configurations actually measured (pruned ones included, cached repeats not)."""
        return len(self.evaluations)

    @property
    def best_config(self) -> BubConfig:
        return self.best.config

    @property
    def speedup_over_default(self) -> float | None:
        if self.default is None or self.default.status != "complete":
            return None
        return self.best.tokens_per_s / self.default.tokens_per_s

    def to_dict(self) -> dict:
        return {
            "model": self.model, "n_ctx": self.n_ctx, "n_threads": self.n_threads, "method": self.method,
            "best": self.best.to_dict(), "near_best": [m.to_dict() for m in self.near_best],
            "default": self.default.to_dict() if self.default else None,
            "speedup_over_default": self.speedup_over_default,
            "evaluations": [m.to_dict() for m in self.evaluations],
            "n_evaluations": self.n_evaluations,
            "skipped_memory": [[c.n_batch, c.n_ubatch] for c in self.skipped_memory],
            "grid_size": self.grid_size, "ladder": list(self.ladder),
            "memory_budget": self.memory_budget, "near_best_pct": self.near_best_pct,
            "n_chunks": self.n_chunks, "seed": self.seed, "seconds": self.seconds,
            "cache_key": self.cache_key, "from_cache": self.from_cache, "cache_path": self.cache_path,
            "fingerprint": dict(self.fingerprint),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BubResult":
        m = ConfigMeasurement.from_dict
        return cls(model=d["model"], n_ctx=d["n_ctx"], n_threads=d["n_threads"], method=d["method"],
                   best=m(d["best"]), near_best=[m(x) for x in d["near_best"]],
                   default=m(d["default"]) if d.get("default") else None,
                   evaluations=[m(x) for x in d["evaluations"]],
                   skipped_memory=[BubConfig(*x) for x in d["skipped_memory"]],
                   grid_size=d["grid_size"], ladder=list(d["ladder"]), memory_budget=d["memory_budget"],
                   near_best_pct=d["near_best_pct"], n_chunks=d["n_chunks"], seed=d["seed"],
                   seconds=d["seconds"], cache_key=d.get("cache_key", ""),
                   from_cache=d.get("from_cache", False), cache_path=d.get("cache_path", ""),
                   fingerprint=d.get("fingerprint", {}))


def pick_best(evaluations: Sequence[ConfigMeasurement], near_best_pct: float
              ) -> tuple[ConfigMeasurement, list[ConfigMeasurement]]:
    """The fastest complete measurement and the others within ``near_best_pct`` % of it."""
    done = [e for e in evaluations if e.status == "complete" and np.isfinite(e.tokens_per_s)]
    if not done:
        raise UserError("no configuration could be measured completely (all failed or were pruned); "
                        "rerun with --verbose to see llama.cpp's messages, or raise the memory budget")
    done.sort(key=lambda e: -e.tokens_per_s)
    best = done[0]
    floor = best.tokens_per_s * (1.0 - near_best_pct / 100.0)
    return best, [e for e in done[1:] if e.tokens_per_s >= floor]


# -- fingerprints and cache ------------------------------------------------------------------------
def hardware_fingerprint() -> dict:
    """What the timing depends on besides the model: CPU, CPU count, llama.cpp build."""
    from ggufopt_ray.engine import native

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = native.versions()
    return {"cpu": cpu, "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "llama_cpp_python": vers.get("llama_cpp_python"), "system_info": vers.get("llama_cpp_system")}


def default_cache_dir() -> Path:
    """``bub/`` in the project cache ($GGUFOPT_CACHE_DIR or ~/.cache/ggufopt_ray), where the sweep
    keeps its bub results too, so ``ggufopt bub`` and ``search=bub`` answer from one cache."""
    from ggufopt_ray.data.cache import default_cache_dir as corpus_cache

    return corpus_cache().parent / "bub"


def cache_fingerprint(setup: "BubSetup", n_gpu_layers: int = 0, flash_attn: bool = False) -> dict:
    """Everything a timing depends on: model, context, threads, offload, the ladder, the hardware.
    ``ggufopt bub`` and the sweep's bub search share results through this key."""
    from ggufopt_ray.gguf.inspect import model_fingerprint

    return {
        "model": model_fingerprint(setup.model_path), "model_size": setup.dims.file_size,
        "n_ctx": setup.n_ctx, "n_threads": setup.n_threads, "n_gpu_layers": int(n_gpu_layers),
        "flash_attn": bool(flash_attn), "ladder": setup.ladder, "hardware": hardware_fingerprint(),
    }


def cache_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]


def load_cached(path: Path, key: str) -> BubResult | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if d.get("cache_version") != CACHE_VERSION or d.get("cache_key") != key:
        return None
    try:
        return BubResult.from_dict(d)
    except (KeyError, TypeError):
        return None


def save_cached(path: Path, result: BubResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    d = result.to_dict()
    d["cache_version"] = CACHE_VERSION
    d["from_cache"] = False
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(d, indent=1))
    tmp.replace(path)


# -- preparation shared by search, grid and manual runs ---------------------------------------------
@dataclass
class BubSetup:
    model_path: str
    dims: ModelDims
    n_ctx: int
    n_threads: int
    ladder: list[int]
    budget: int
    fitting: list[BubConfig]
    skipped: list[BubConfig]
    memory: dict


def prepare_setup(model_path, n_ctx, n_threads, memory_budget, min_size, sizes) -> BubSetup:
    from ggufopt_ray.engine import native
    from ggufopt_ray.gguf.inspect import check_gguf_file

    path = check_gguf_file(model_path)
    n_ctx = int(n_ctx)
    if n_ctx < 2:
        raise UserError(f"the context must be at least 2 tokens, not {n_ctx}")
    if n_threads is not None and n_threads < 1:
        raise UserError(f"threads must be positive, not {n_threads}")
    dims = ModelDims.from_gguf(path)
    if dims.n_ctx_train and n_ctx > dims.n_ctx_train:
        raise UserError(f"context {n_ctx} is longer than the model's training context "
                        f"({dims.n_ctx_train}); use --ctx <= {dims.n_ctx_train}")
    ladder = size_ladder(n_ctx, min_size=min_size, sizes=sizes)
    budget = int(memory_budget) if memory_budget else default_memory_budget()
    fitting, skipped, memory = [], [], {}
    for cfg in all_configs(ladder):
        est = estimate_memory(dims, n_ctx, cfg).total
        memory[cfg] = est
        (fitting if est <= budget else skipped).append(cfg)
    if not fitting:
        smallest = min(memory.values())
        raise UserError(f"every batch/ubatch configuration is over the memory budget of "
                        f"{budget / 2**20:.1f} MiB (the smallest needs about {smallest / 2**20:.1f} MiB); "
                        "raise --memory-budget or lower --ctx")
    threads = int(n_threads) if n_threads else native.default_threads()
    return BubSetup(str(path), dims, n_ctx, threads, ladder, budget, fitting, skipped, memory)


def _default_measure(setup: BubSetup, chunks, n_gpu_layers, flash_attn, warmup):
    def measure(config: BubConfig, report: ChunkReport | None) -> ConfigMeasurement:
        return measure_config(setup.model_path, setup.n_ctx, config, chunks, n_threads=setup.n_threads,
                              n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, warmup=warmup,
                              report=report)
    return measure


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="cfg", disable=not enabled, leave=False)


def finish_result(setup: BubSetup, method, evaluations, near_best_pct, n_chunks, seed, t0, fp=None,
            key="") -> BubResult:
    for e in evaluations:
        e.memory_estimate = setup.memory.get(e.config, 0)
    best, near = pick_best(evaluations, near_best_pct)
    default_cfg = llama_default_config(setup.n_ctx)
    default = next((e for e in evaluations if e.config == default_cfg), None)
    return BubResult(model=setup.model_path, n_ctx=setup.n_ctx, n_threads=setup.n_threads, method=method,
                     best=best, near_best=near, default=default, evaluations=list(evaluations),
                     skipped_memory=list(setup.skipped), grid_size=len(setup.fitting), ladder=setup.ladder,
                     memory_budget=setup.budget, near_best_pct=near_best_pct, n_chunks=n_chunks,
                     seed=seed, seconds=time.perf_counter() - t0, cache_key=key,
                     fingerprint=fp or {})


def auto_trials(grid_size: int) -> int:
    """Default number of configurations to measure: ~2*log2 of the space, at least 6 (or all).

    15 configurations (n_ctx 256) -> 8, 21 (512) -> 9, 45 (4096) -> 11, 55 (8192) -> 12.
    """
    return min(grid_size, max(6, math.ceil(2 * math.log2(max(grid_size, 2)))))


# -- the searches ----------------------------------------------------------------------------------
def search_bub(model_path: str | Path, n_ctx: int = 512, *, n_trials: int | None = None,
               n_chunks: int = 5, n_threads: int | None = None, n_gpu_layers: int = 0,
               flash_attn: bool = False, memory_budget: int | None = None,
               min_size: int = DEFAULT_MIN_SIZE, sizes: Sequence[int] | None = None,
               near_best_pct: float = DEFAULT_NEAR_BEST_PCT, seed: int = 42,
               tokens: np.ndarray | None = None, warmup: bool = True,
               cache_dir: str | Path | None = None, use_cache: bool = True, progress: bool = False,
               measure_fn: Callable[[BubConfig, ChunkReport | None], ConfigMeasurement] | None = None
               ) -> BubResult:
    """Optuna TPE search for the fastest (n_batch, n_ubatch) for all-logits generation at n_ctx.

    Measures at most ``n_trials`` distinct configurations (default ``auto_trials``), the llama.cpp
    default first. With ``use_cache`` a result for the same model, context, threads and hardware
    is returned from ``cache_dir`` (default ``bub/`` in $GGUFOPT_CACHE_DIR or ~/.cache/ggufopt_ray)
    without measuring anything. ``measure_fn(config, report)`` replaces the real measurement
    (tests; a distributed runner).
    """
    import optuna

    t0 = time.perf_counter()
    setup = prepare_setup(model_path, n_ctx, n_threads, memory_budget, min_size, sizes)
    if n_trials is not None and n_trials < 1:
        raise UserError(f"--trials must be at least 1, not {n_trials}")
    if near_best_pct < 0:
        raise UserError(f"the near-best margin must not be negative, not {near_best_pct}")
    fp = cache_fingerprint(setup, n_gpu_layers, flash_attn)
    key = cache_key(fp)
    cache_path = Path(cache_dir or default_cache_dir()) / f"{key}.json"
    if use_cache and cache_path.is_file():
        cached = load_cached(cache_path, key)
        if cached is not None and setup.memory.get(cached.best_config, math.inf) <= setup.budget:
            cached.from_cache = True
            cached.cache_path = str(cache_path)
            return cached

    ladder = setup.ladder
    fits = set(setup.fitting)
    # Highest ubatch level allowed under each batch level (the staircase the budget leaves).
    u_max = {}
    for i, b in enumerate(ladder):
        js = [j for j, u in enumerate(ladder) if j <= i and BubConfig(b, u) in fits]
        if js:
            u_max[i] = max(js)
    b_max = max(u_max)
    # The estimate grows with n_batch, so the batch levels that fit are 0..b_max without gaps.
    assert sorted(u_max) == list(range(b_max + 1)), u_max
    space = len(setup.fitting)
    budget_trials = min(int(n_trials) if n_trials else auto_trials(space), space)
    chunks = make_chunks(setup.dims, setup.n_ctx, n_chunks, tokens=tokens, seed=seed)
    measure = measure_fn or _default_measure(setup, chunks, n_gpu_layers, flash_attn, warmup)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, budget_trials // 3)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1, interval_steps=1)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    rng = np.random.default_rng(seed)

    def levels(cfg: BubConfig) -> dict:
        return {"batch_level": ladder.index(cfg.n_batch), "ubatch_level": ladder.index(cfg.n_ubatch)}

    default_cfg = llama_default_config(setup.n_ctx)
    if default_cfg in fits:
        study.enqueue_trial(levels(default_cfg))

    seen: dict[BubConfig, ConfigMeasurement] = {}
    evaluations: list[ConfigMeasurement] = []
    duplicates_in_row = 0
    max_asks = 20 * budget_trials + 50
    bar = _progress(budget_trials, "bub search", progress)
    try:
        for _ in range(max_asks):
            if len(evaluations) >= budget_trials:
                break
            trial = study.ask()
            bi = trial.suggest_int("batch_level", 0, b_max)
            ui = trial.suggest_int("ubatch_level", 0, u_max[bi])
            cfg = BubConfig(ladder[bi], ladder[ui])
            if cfg in seen:
                # Already measured: let TPE not count it twice; after a few in a row, try an
                # unmeasured configuration instead (TPE has converged; exploring is the best use).
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                duplicates_in_row += 1
                if duplicates_in_row >= 3:
                    unseen = [c for c in setup.fitting if c not in seen]
                    study.enqueue_trial(levels(unseen[int(rng.integers(len(unseen)))]))
                    duplicates_in_row = 0
                continue
            duplicates_in_row = 0

            def report(step: int, value: float, _trial=trial) -> bool:
                _trial.report(value, step)
                return _trial.should_prune()

            m = measure(cfg, report)
            seen[cfg] = m
            evaluations.append(m)
            bar.update(1)
            bar.set_postfix_str(f"{cfg.label()} {m.tokens_per_s:.0f} tok/s {m.status}")
            if m.status == "complete":
                study.tell(trial, m.tokens_per_s)
            elif m.status == "pruned":
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
    finally:
        bar.close()
    result = finish_result(setup, "optuna-tpe", evaluations, near_best_pct, n_chunks, seed, t0, fp, key)
    if use_cache:
        save_cached(cache_path, result)
        result.cache_path = str(cache_path)
    return result


def grid_bub(model_path: str | Path, n_ctx: int = 512, *, n_chunks: int = 5,
             n_threads: int | None = None, n_gpu_layers: int = 0, flash_attn: bool = False,
             memory_budget: int | None = None, min_size: int = DEFAULT_MIN_SIZE,
             sizes: Sequence[int] | None = None, near_best_pct: float = DEFAULT_NEAR_BEST_PCT,
             seed: int = 42, tokens: np.ndarray | None = None, warmup: bool = True,
             progress: bool = False,
             measure_fn: Callable[[BubConfig, ChunkReport | None], ConfigMeasurement] | None = None
             ) -> BubResult:
    """Measure every configuration of the space that fits the budget (no pruning, no cache)."""
    t0 = time.perf_counter()
    setup = prepare_setup(model_path, n_ctx, n_threads, memory_budget, min_size, sizes)
    chunks = make_chunks(setup.dims, setup.n_ctx, n_chunks, tokens=tokens, seed=seed)
    measure = measure_fn or _default_measure(setup, chunks, n_gpu_layers, flash_attn, warmup)
    evaluations = _measure_each(setup.fitting, measure, "bub grid", progress)
    return finish_result(setup, "grid", evaluations, near_best_pct, n_chunks, seed, t0)


def measure_configs(model_path: str | Path, configs: Sequence[BubConfig | tuple[int, int]],
                    n_ctx: int = 512, *, n_chunks: int = 5, n_threads: int | None = None,
                    n_gpu_layers: int = 0, flash_attn: bool = False, memory_budget: int | None = None,
                    near_best_pct: float = DEFAULT_NEAR_BEST_PCT, seed: int = 42,
                    tokens: np.ndarray | None = None, warmup: bool = True, progress: bool = False,
                    measure_fn: Callable[[BubConfig, ChunkReport | None], ConfigMeasurement] | None = None
                    ) -> BubResult:
    """Measure the given configurations only (any sizes with ubatch <= batch <= n_ctx)."""
    t0 = time.perf_counter()
    configs = [c if isinstance(c, BubConfig) else BubConfig(int(c[0]), int(c[1])) for c in configs]
    if not configs:
        raise UserError("give at least one BATCH,UBATCH configuration")
    for c in configs:
        c.validate(int(n_ctx))
    sizes = sorted({s for c in configs for s in (c.n_batch, c.n_ubatch)})
    setup = prepare_setup(model_path, n_ctx, n_threads, memory_budget, 1, sizes)
    wanted = list(dict.fromkeys(configs))
    setup.fitting = [c for c in wanted if setup.memory[c] <= setup.budget]
    setup.skipped = [c for c in wanted if setup.memory[c] > setup.budget]
    if not setup.fitting:
        raise UserError(f"every given configuration is over the memory budget of {setup.budget / 2**20:.1f} MiB; "
                        "raise --memory-budget")
    chunks = make_chunks(setup.dims, setup.n_ctx, n_chunks, tokens=tokens, seed=seed)
    measure = measure_fn or _default_measure(setup, chunks, n_gpu_layers, flash_attn, warmup)
    evaluations = _measure_each(setup.fitting, measure, "bub configs", progress)
    return finish_result(setup, "manual", evaluations, near_best_pct, n_chunks, seed, t0)


def _measure_each(configs, measure, desc: str, progress: bool) -> list:
    """Measure every configuration in order (no pruning), with a progress bar."""
    evaluations = []
    bar = _progress(len(configs), desc, progress)
    try:
        for cfg in configs:
            evaluations.append(measure(cfg, None))
            bar.update(1)
    finally:
        bar.close()
    return evaluations


# -- presentation ----------------------------------------------------------------------------------
def format_bub_result(result: BubResult, top: int | None = None) -> str:
    """A table of measured configurations, fastest first, and the verdict."""
    rows = sorted(result.evaluations, key=lambda e: (e.status != "complete",
                                                     -(e.tokens_per_s if np.isfinite(e.tokens_per_s) else -1)))
    if top:
        rows = rows[:top]
    near = {e.config for e in result.near_best}
    default_cfg = llama_default_config(result.n_ctx)
    ref = result.default.tokens_per_s if result.default and result.default.status == "complete" else None
    head = f"{'n_batch':>7} {'n_ubatch':>8} {'tokens/s':>10} {'± sd':>8} {'vs default':>10} {'memory MiB':>10}  status"
    lines = [f"model {result.model}  n_ctx {result.n_ctx}  threads {result.n_threads}  method {result.method}"
             + ("  (from cache)" if result.from_cache else ""), "", head, "-" * len(head)]
    for e in rows:
        mark = ("best" if e.config == result.best_config else "near-best" if e.config in near else "")
        if e.config == default_cfg:
            mark = (mark + " default").strip()
        rel = f"{e.tokens_per_s / ref:10.3f}" if ref and np.isfinite(e.tokens_per_s) else f"{'-':>10}"
        lines.append(f"{e.n_batch:>7} {e.n_ubatch:>8} {e.tokens_per_s:>10.1f} {e.stdev:>8.1f} {rel} "
                     f"{e.memory_estimate / 2**20:>10.1f}  {e.status}{'  ' + mark if mark else ''}")
    lines.append("")
    b = result.best
    lines.append(f"best: n_batch={b.n_batch} n_ubatch={b.n_ubatch}  {b.tokens_per_s:.1f} tokens/s"
                 + (f"  ({result.speedup_over_default:.3f}x the llama.cpp default "
                    f"{default_cfg.label()})" if result.speedup_over_default else ""))
    if result.near_best:
        lines.append(f"within {result.near_best_pct:g}% of best: "
                     + ", ".join(f"{e.config.label()} ({e.tokens_per_s:.0f})" for e in result.near_best))
    lines.append(f"measured {result.n_evaluations} of {result.grid_size} configurations that fit "
                 f"{result.memory_budget / 2**20:.0f} MiB"
                 + (f"; {len(result.skipped_memory)} skipped by the memory guard" if result.skipped_memory else ""))
    return "\n".join(lines)
