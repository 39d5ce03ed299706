"""CPU work as Ray tasks: build candidates and importance matrices, ship files between nodes.

Resources come from the config (``cluster.task_resources``, e.g. ``{cpu_node: 0.01}`` to pin the
work to CPU nodes); every task carries a readable name in the dashboard. Files are written to the
cache directory; when a consumer runs on a node that does not share that directory, it pulls the
bytes from the producing node through the object store (``fetch_to_local``).
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from ggufopt_ray.candidates import Candidate, Recipe, build_candidate
from ggufopt_ray.config import ClusterConfig
from ggufopt_ray.engine.imatrix import collect_imatrix, load_imatrix
from ggufopt_ray.store.locks import file_lock


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1, max_retries=2)
def build_candidate_task(recipe: Recipe, base_model: str, cache_dir: str, model_fp: str,
                         imatrix_path: str | None, threads: int | None) -> Candidate:
    """Build (or find in the cache) the candidate of ``recipe``; the Candidate says on which node."""
    imatrix = load_imatrix(imatrix_path) if imatrix_path else None
    cand = build_candidate(recipe, base_model, cache_dir, model_fp, imatrix=imatrix, threads=threads)
    cand.node_id = _node_id()
    return cand


@ray.remote(num_cpus=1, max_retries=2)
def build_imatrix_task(model_path: str, chunks: list, out_path: str, n_ctx: int,
                       threads: int | None) -> dict:
    """Collect an importance matrix over ``chunks`` (cached at ``out_path``)."""
    out = Path(out_path)
    with file_lock(out):  # concurrent sweeps on one cache: one collects, the others wait and load
        if out.exists():
            im = load_imatrix(out)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            im = collect_imatrix(model_path, chunks, n_ctx=n_ctx, n_threads=threads)
            tmp = out.with_name(f"{out.stem}.{os.getpid()}.partial{out.suffix}")
            im.save(tmp)
            tmp.replace(out)
    return {"path": str(out), "hash": im.hash(), "chunks": im.chunk_count, "node_id": _node_id()}


@ray.remote(num_cpus=0)
def read_file_task(path: str) -> bytes:
    return Path(path).read_bytes()


def task_options(cluster: ClusterConfig, name: str) -> dict:
    """Options for a CPU task started from inside a trial.

    The trial waits for its task and does nothing meanwhile, so by default the task borrows the
    trial's CPU (``cluster.task_cpus = 0``) instead of asking for another one, which would
    deadlock when every CPU is held by a waiting trial. ``task_resources`` (e.g.
    ``{cpu_node: 0.01}``) still pins the work to a node group.
    """
    # "DEFAULT" lets the task leave the trial's placement group (Tune captures child tasks into
    # it otherwise), so it can run on another node group.
    opts: dict = {"name": name, "num_cpus": cluster.task_cpus, "scheduling_strategy": "DEFAULT"}
    if cluster.task_resources:
        opts["resources"] = dict(cluster.task_resources)
    return opts


def fetch_to_local(path: str, node_id: str) -> str:
    """``path`` as produced on ``node_id``; copied here through the object store if missing."""
    if Path(path).exists():
        return path
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    data = ray.get(read_file_task.options(
        name="fetch-candidate",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)).remote(path))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.partial")
    tmp.write_bytes(data)
    tmp.replace(target)
    return str(target)
