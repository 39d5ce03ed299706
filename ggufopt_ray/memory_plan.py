"""The sweep's memory plan, made before any logits are computed: does it fit, and if not, what would.

At real vocabularies (128k-262k tokens) the vocabulary, not the transformer, sets a sweep's
memory: the float16 baseline is 2·V bytes per scored token in Ray's object store (past its
capacity Ray spills to disk and every trial reads it back from there), and each trial holds
vocabulary-sized float32 buffers (llama.cpp's logits, the scored rows, KLD blocks). The numbers
come from :mod:`ggufopt_ray.metrics.memory_plan` (checked against measured peaks by
``bench/big_vocab.py``); this module applies them to a sweep: the baseline against the object
store, a trial's peak against the node's memory, how many trials fit at once, and — when the
plan does not fit — a one-line refusal naming settings that would. ``metrics.encoding=auto``
picks float16 (error ≈ 0.03% of the mean KLD) when it fits the object store comfortably, else
compact (≈ ¼ of llama.cpp's bytes, measured error < 1% of the mean KLD).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.memory_plan import baseline_bytes, plan_trial_memory

GIB = float(2**30)
STORE_SHARE = 0.5  # the baseline may take this share of the object store (trials put data there too)
AUTO_ENCODINGS = ("float16", "compact")  # auto: the first whose baseline fits STORE_SHARE of the store


@dataclass
class SweepMemoryPlan:
    encoding: str
    baseline_bytes: int
    object_store_bytes: int
    trial_peak_bytes: int
    trial_components: dict
    node_memory_bytes: int
    trials_fit: int  # trials whose peaks fit the node's available memory at once
    concurrency: int  # trials the sweep will run at once

    @property
    def fits(self) -> bool:
        return self.baseline_fits and self.trials_fit >= 1

    @property
    def baseline_fits(self) -> bool:
        return not self.object_store_bytes or self.baseline_bytes <= self.object_store_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}

    def describe(self) -> str:
        store = (f" of the object store's {self.object_store_bytes / GIB:.2f} GiB" if self.object_store_bytes else "")
        return (f"memory   baseline {self.baseline_bytes / GIB:.2f} GiB ({self.encoding}){store}; a trial peaks at "
                f"~{self.trial_peak_bytes / GIB:.2f} GiB, {self.trials_fit} fit in "
                f"{self.node_memory_bytes / GIB:.1f} GiB available, {self.concurrency} will run")


def plan_sweep_memory(*, encoding: str, n_chunks: int, n_ctx: int, first: int, dims, model_bytes: int,
                      n_batch: int, n_ubatch: int, kld_threads: int, object_store_bytes: float,
                      node_memory_bytes: float, concurrency: int) -> SweepMemoryPlan:
    """The plan for ``encoding`` (``auto`` resolved here) on a model of shape ``dims``
    (:class:`~ggufopt_ray.tuning.bub.ModelDims`); ``model_bytes`` bounds any candidate's size."""
    scored = n_ctx - 1 - first
    tokens = n_chunks * scored
    if encoding == "auto":
        encoding = next((e for e in AUTO_ENCODINGS
                         if not object_store_bytes or baseline_bytes(e, dims.n_vocab, tokens)
                         <= STORE_SHARE * object_store_bytes), AUTO_ENCODINGS[-1])
    trial = plan_trial_memory(model_bytes, n_ctx, dims.n_vocab, dims.n_layer, dims.n_embd, encoding,
                              n_scored=scored, n_batch=n_batch, n_ubatch=n_ubatch,
                              n_embd_kv=dims.n_head_kv * dims.head_dim_k, n_ff=dims.n_ff, threads=kld_threads)
    fit = int(node_memory_bytes // trial.total) if trial.total else concurrency
    return SweepMemoryPlan(encoding=encoding, baseline_bytes=baseline_bytes(encoding, dims.n_vocab, tokens),
                           object_store_bytes=int(object_store_bytes or 0), trial_peak_bytes=trial.total,
                           trial_components=trial.to_dict(), node_memory_bytes=int(node_memory_bytes),
                           trials_fit=fit, concurrency=int(concurrency))


def refuse_unless_fits(plan: SweepMemoryPlan, *, n_chunks: int, dims) -> None:
    """A one-line refusal naming settings that would fit, when the plan does not."""
    if not plan.baseline_fits:
        per_chunk = plan.baseline_bytes / max(1, n_chunks)
        chunks = int(plan.object_store_bytes // per_chunk) if per_chunk else 0
        alt = ("metrics.encoding=compact, " if plan.encoding != "compact" else "")
        raise UserError(f"the {plan.encoding} baseline needs {plan.baseline_bytes / GIB:.2f} GiB, more than the "
                        f"object store's {plan.object_store_bytes / GIB:.2f} GiB at vocabulary {dims.n_vocab:,}; use "
                        f"{alt}dataset.eval_chunks<={max(1, chunks)}, or give Ray more object store memory "
                        "(cluster.object_store_gib with cluster=local)")
    if plan.trials_fit < 1:
        raise UserError(f"one trial needs ~{plan.trial_peak_bytes / GIB:.2f} GiB and {plan.node_memory_bytes / GIB:.2f} "
                        "GiB are available; lower model.n_batch (fewer logits rows per decode) or model.n_ctx, or "
                        "free memory")


def safe_concurrency(plan: SweepMemoryPlan) -> int:
    """Trials to run at once: what the sweep would run, but never more than fit in memory."""
    return max(1, min(plan.concurrency, plan.trials_fit))


def available_memory_bytes() -> float:
    """This node's available memory (psutil ships with ray[default])."""
    import psutil

    return float(psutil.virtual_memory().available)
