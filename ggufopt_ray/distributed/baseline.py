"""The baseline stage: each chunk's baseline log-probabilities computed once, kept in Ray's object store.

Logits workers are actors that load the base model once and take chunks round-robin, in groups
of as many chunks as one decode packs (``n_batch // n_ctx`` sequences, as llama-perplexity does);
they sit on GPU nodes when the config asks for GPUs (or custom resources such as
``{gpu_node: 0.01}``). Each chunk's encoded payload is written to the baseline store on disk
(crash-safe, so a rerun resumes) and kept in the object store as one ObjectRef per chunk, which
trials on any node read zero-copy. When the store already holds every chunk for this
fingerprint, nothing is computed: the chunks are loaded and put once.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np
import ray

from ggufopt_ray.config import ClusterConfig
from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.evaluation import baseline_payloads


@ray.remote
class LogitsWorker:
    """One loaded model; turns token chunks into encoded baseline payloads."""

    def __init__(self, model_path: str, settings: RuntimeSettings, encoding: str, first: int):
        # Threads follow the CPUs Ray granted this actor unless the config names a count.
        granted = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        threads = settings.n_threads or max(1, int(granted))
        self.engine = LogitsEngine(model_path, replace(settings, n_threads=threads))
        self.encoding = encoding
        self.first = first
        self.computed = 0

    def baselines(self, chunks: list[np.ndarray]):
        """Payloads of ``chunks`` (packed per decode); called with ``num_returns=len(chunks)``,
        so each payload becomes an object of its own."""
        payloads = baseline_payloads(self.engine, chunks, self.encoding, self.first)
        self.computed += len(payloads)
        return payloads[0] if len(payloads) == 1 else payloads

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def computed_count(self) -> int:
        return self.computed


def worker_cpus(cluster: ClusterConfig) -> float:
    """CPUs per baseline worker: ``cluster.worker_cpus``, or when unset the CPUs the cluster has
    free shared by the workers on a local cluster (nothing else runs during the baseline pass;
    one worker on 1 of 2 cores ran at 0.44x of llama-perplexity's speed), 1 on a shared cluster."""
    if cluster.worker_cpus is not None:
        return float(cluster.worker_cpus)
    if cluster.mode != "local":
        return 1.0
    free = ray.available_resources().get("CPU", 1.0)
    return float(max(1, math.floor(free / max(1, cluster.logits_workers))))


def worker_options(cluster: ClusterConfig, index: int, run_tag: str) -> dict:
    """Actor options; the name carries a per-run tag because Ray actor names are cluster-wide.

    ``ray.kill`` is asynchronous, so a sweep that starts right after another (multirun, tests)
    would otherwise collide with the previous run's still-dying ``logits-worker-0``.
    """
    opts: dict = {"name": f"logits-worker-{run_tag}-{index}", "num_cpus": worker_cpus(cluster),
                  "max_restarts": 1, "max_task_retries": 1}
    if cluster.worker_gpus:
        opts["num_gpus"] = cluster.worker_gpus
    if cluster.worker_resources:
        opts["resources"] = dict(cluster.worker_resources)
    return opts


@dataclass
class BaselineRefs:
    """What trials need: one ObjectRef per chunk (wrapped in a list so Ray does not resolve it)."""

    refs: list  # list[[ObjectRef]]
    computed: int  # chunks computed in this run (0 when loaded from the store)
    loaded: int  # chunks loaded from the store
    seconds: float
    worker_nodes: list[str] = field(default_factory=list)


def run_baseline(store, chunks: list[np.ndarray], model_path: str, settings: RuntimeSettings, encoding: str,
                 first: int, cluster: ClusterConfig, progress=None, log=None) -> BaselineRefs:
    """Fill ``store`` (a :class:`~ggufopt_ray.store.baseline.BaselineStore`) and return object refs.

    Chunks already committed in the store are loaded and put; the missing ones are sharded over
    ``cluster.logits_workers`` actors. Results are committed as they arrive, so an interrupted
    stage resumes where it stopped; ``progress(done, total)`` hears of each committed one.
    """
    t0 = time.perf_counter()
    refs: list = [None] * len(chunks)
    for path, why in store.discard_damaged(range(len(chunks))):  # checksums: recomputed below
        if log is not None:
            log(f"warning  {path} was damaged ({why}); recomputing it")
    missing = [i for i in range(len(chunks)) if not store.has(i)]
    loaded = 0
    for i in range(len(chunks)):
        if i not in missing:
            refs[i] = [ray.put(store.read_payload(i))]
            loaded += 1
    nodes: list[str] = []
    if missing:
        n_workers = max(1, min(cluster.logits_workers, len(missing)))
        run_tag = uuid.uuid4().hex[:6]
        workers = [LogitsWorker.options(**worker_options(cluster, k, run_tag)).remote(model_path, settings, encoding,
                                                                                      first)
                   for k in range(n_workers)]
        try:
            nodes = ray.get([w.node_id.remote() for w in workers])
            pending = {}
            # Groups of what one decode packs; each chunk still comes back as its own object.
            per_decode = max(1, settings.n_batch // settings.n_ctx)
            groups = [missing[g:g + per_decode] for g in range(0, len(missing), per_decode)]
            for k, group in enumerate(groups):
                call = workers[k % n_workers].baselines.options(num_returns=len(group))
                out = call.remote([chunks[i] for i in group])
                for i, ref in zip(group, out if len(group) > 1 else [out]):
                    pending[ref] = i
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    store.write_payload(i, chunks[i], ray.get(ref))
                    refs[i] = [ref]
                    if progress is not None:
                        progress(len(missing) - len(pending), len(missing))
        finally:
            # Freed even when a chunk fails, so a retry in the same cluster gets its CPUs back.
            for w in workers:
                ray.kill(w)
    return BaselineRefs(refs=refs, computed=len(missing), loaded=loaded,
                        seconds=time.perf_counter() - t0, worker_nodes=nodes)
