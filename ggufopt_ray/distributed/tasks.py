"""CPU work of trials: build candidates and importance matrices, ship files between nodes.

The work runs in the trial's own process unless the config pins it to a node group
(``cluster.task_resources``, e.g. ``{cpu_node: 0.01}``) or gives it CPUs of its own
(``cluster.task_cpus``); then it runs as a Ray task, which carries a readable name in the
dashboard (:func:`run_cpu_work`). Files are written to the cache directory; when a consumer runs
on a node that does not share that directory, it pulls the bytes from the producing node through
the object store (``fetch_to_local``). A trial asks for what it needs before its first chunk with
:func:`prepare_candidate` (which calls :func:`prepare_imatrix`): cached, built here or on a task,
and made local.

Cache files (candidates, importance matrices) live at ``ROOT/<kind>/<model fingerprint>/<name>``.
``ROOT`` is the sweep's ``cache_dir`` (a path computed on the driver), unless the node was started
with ``$GGUFOPT_NODE_CACHE_DIR`` set (``GGUFOPT_NODE_CACHE_DIR=/scratch/ggufopt ray start ...``):
then the tasks on that node keep their cache files under that root instead, for a node whose
local disk is elsewhere than the driver's cache (and, in tests, to give each simulated node a disk
of its own on one machine). Without it nothing changes: every node uses the sweep's path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray

from ggufopt_ray.calibration import combine_parts, mix_file_label, mix_label, mix_parts
from ggufopt_ray.candidates import Candidate, Recipe, build_candidate
from ggufopt_ray.config import ClusterConfig
from ggufopt_ray.engine.imatrix import ImatrixCollector, collect_imatrix, imatrix_settings, load_imatrix
from ggufopt_ray.errors import UserError
from ggufopt_ray.store.locks import file_lock

if TYPE_CHECKING:  # the adapter imports this module
    from ggufopt_ray.distributed.tune_adapter import TrialContext

NODE_CACHE_ENV = "GGUFOPT_NODE_CACHE_DIR"
CACHE_KINDS = ("candidates", "imatrix")  # the folders of ROOT whose files travel between nodes
PIECE_BYTES = 64 * 2**20  # a file crosses the object store in pieces of this size ...
PIECES_IN_FLIGHT = 4  # ... at most this many at a time (bounds the memory a fetch holds)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def node_cache_dir() -> Path | None:
    """This node's own cache root (``$GGUFOPT_NODE_CACHE_DIR``), or None: the sweep's cache_dir."""
    root = os.environ.get(NODE_CACHE_ENV)
    return Path(root).expanduser() if root else None


def is_cache_file(path: str | Path) -> bool:
    """Whether ``path`` has the layout of a cache file, ``ROOT/<kind>/<fingerprint>/<name>``."""
    parts = Path(path).parts
    return len(parts) >= 4 and parts[-3] in CACHE_KINDS


def on_this_node(path: str | Path) -> str:
    """Where cache file ``path`` (as named on any node) is kept on this node.

    With ``$GGUFOPT_NODE_CACHE_DIR`` set, a cache file goes under that root with the same
    ``<kind>/<fingerprint>/<name>``; otherwise, and for any other file (the base model), the
    path is unchanged.
    """
    root = node_cache_dir()
    if root is None or not is_cache_file(path):
        return str(path)
    return str(root.joinpath(*Path(path).parts[-3:]))


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def file_digest(path: str | Path) -> dict:
    """``{"size", "sha256"}`` of a file, remembered beside it (``NAME.sha256``) for its size and
    modification time, so a multi-GB candidate is hashed once, not on every fetch."""
    path = Path(path)
    st = path.stat()
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    side = _digest_path(path)
    try:
        digest, size, mtime = side.read_text().split()
        if f"{size} {mtime}" == stamp:
            return {"size": st.st_size, "sha256": digest}
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 2**20):
            h.update(block)
    _remember_digest(path, h.hexdigest())
    return {"size": st.st_size, "sha256": h.hexdigest()}


def _remember_digest(path: Path, digest: str) -> None:
    st = path.stat()
    side = _digest_path(path)
    tmp = side.with_name(f"{side.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")
        tmp.replace(side)
    except OSError:  # a read-only folder: the digest is computed again next time
        tmp.unlink(missing_ok=True)


def build_candidate_here(recipe: Recipe, base_model: str, cache_dir: str, model_fp: str,
                         imatrix_path: str | None, threads: int | None,
                         imatrix_node_id: str | None = None) -> Candidate:
    """Build (or find in the cache) the candidate of ``recipe``; the Candidate says on which node.

    ``imatrix_path`` is the importance matrix as named on node ``imatrix_node_id`` (e.g. the trial
    that asked for it); it is fetched to this node when this node does not hold the same bytes.
    Without ``imatrix_node_id`` the file must already be on this node (at the path, or under
    this node's cache root).
    """
    if imatrix_path:
        if imatrix_node_id:
            imatrix_path = fetch_to_local(imatrix_path, imatrix_node_id)
        else:
            local = on_this_node(imatrix_path)
            if not Path(local).exists():
                raise FileNotFoundError(f"importance matrix {Path(imatrix_path).name} is not on node {_node_id()} "
                                        f"(looked at {local}); pass imatrix_node_id= so it is fetched")
            imatrix_path = local
    imatrix = load_imatrix(imatrix_path) if imatrix_path else None
    root = node_cache_dir() or cache_dir
    cand = build_candidate(recipe, base_model, root, model_fp, imatrix=imatrix, threads=threads)
    cand.node_id = _node_id()
    return cand


def build_imatrix_here(model_path: str, chunks: list, out_path: str, n_ctx: int,
                       threads: int | None) -> dict:
    """Collect an importance matrix over ``chunks`` (cached at ``out_path``, or at its place under
    this node's cache root); the dict says where, and on which node."""
    out = Path(on_this_node(out_path))
    with file_lock(out):  # concurrent sweeps on one cache: one collects, the others wait and load
        if out.exists():
            im = load_imatrix(out)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            im = collect_imatrix(model_path, chunks, n_ctx=n_ctx, n_threads=threads)
            im.save(out)
    return {"path": str(out), "hash": im.hash(), "chunks": im.chunk_count, "node_id": _node_id()}


def build_imatrix_prefixes_here(model_path: str, chunks: list, out_paths: list, n_ctx: int,
                                threads: int | None) -> dict:
    """The importance matrices of every prefix of ``chunks`` in one pass: ``out_paths[i]`` holds
    the collection on ``chunks[:i + 1]`` (an imatrix is a running sum, so each is a snapshot).

    One language's calibration chunks are collected once this way, whatever share of them the
    calibration mixes ask for. The last file is written last, so when it exists they all do."""
    outs = [Path(on_this_node(p)) for p in out_paths]
    with file_lock(outs[-1]):
        if not outs[-1].exists():
            outs[-1].parent.mkdir(parents=True, exist_ok=True)
            settings = imatrix_settings([np.asarray(c) for c in chunks], n_ctx=n_ctx, n_threads=threads)
            with ImatrixCollector(model_path, settings) as collector:
                for chunk, out in zip(chunks, outs):
                    collector.add_chunk(chunk)
                    collector.imatrix.save(out)
    return {"paths": [str(o) for o in outs], "node_id": _node_id()}


# The same work as Ray tasks, for CPU work pinned to a node group (``cluster.task_resources``).
build_candidate_task = ray.remote(num_cpus=1, max_retries=2)(build_candidate_here)
build_imatrix_task = ray.remote(num_cpus=1, max_retries=2)(build_imatrix_here)
build_imatrix_prefixes_task = ray.remote(num_cpus=1, max_retries=2)(build_imatrix_prefixes_here)
_TASK_OF = {build_candidate_here: build_candidate_task, build_imatrix_here: build_imatrix_task,
            build_imatrix_prefixes_here: build_imatrix_prefixes_task}


@ray.remote(num_cpus=0)
def file_digest_task(path: str) -> dict:
    return file_digest(path)


@ray.remote(num_cpus=0)
def read_piece_task(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


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


def runs_in_trial(cluster: ClusterConfig) -> bool:
    """Whether a trial does its CPU work (quantize, imatrix) in its own process.

    It does when the work would borrow the trial's CPU (``cluster.task_cpus = 0``, the default)
    and is not pinned to a node group (no ``cluster.task_resources``): as a task it would then
    run on the trial's CPU all the same, only in another worker process -- and Ray keeps no more
    idle workers than a node has CPUs, so with every CPU held by a trial each task started a
    fresh process and paid its imports (~2.5 s per candidate on 2 cores, several times the
    quantization of a small model). With ``task_resources`` or ``task_cpus`` set it stays a task.
    """
    return not cluster.task_resources and not cluster.task_cpus


def work_threads(cluster: ClusterConfig, trial_threads: int) -> int:
    """llama.cpp threads for a trial's quantize or imatrix work.

    In the trial's own process (:func:`runs_in_trial`): the threads the trial holds -- a trial
    given 4 CPUs (a 16-core node running 4 trials, a GPU trial with ``cluster.trial_cpus=8``)
    quantizes on all of them, where it used to take one. On a task: the task's own CPUs
    (``cluster.task_cpus``), or one for a 0-CPU task pinned to a node group, which holds no CPU
    there. The files do not depend on it: llama.cpp quantizes each row, and computes each
    activation the importance matrix sums, in one thread (``tests/test_work_threads.py``).
    """
    if runs_in_trial(cluster):
        return max(1, int(trial_threads))
    return max(1, int(cluster.task_cpus))


def run_cpu_work(cluster: ClusterConfig, name: str, work, *args, **kwargs):
    """``work(*args, **kwargs)`` for a trial (one of this module's ``*_here`` functions): in the
    trial's process (:func:`runs_in_trial`), or as its Ray task named ``name``."""
    if runs_in_trial(cluster):
        return work(*args, **kwargs)
    return ray.get(_TASK_OF[work].options(**task_options(cluster, name)).remote(*args, **kwargs))


def fetch_to_local(path: str, node_id: str) -> str:
    """The local path of file ``path`` as produced on node ``node_id``, copied here through the
    object store unless this node already holds the same bytes.

    A file made on this node is used where it is. A cache file (candidate, importance matrix)
    from another node goes to :func:`on_this_node`; a copy already there counts only if its size
    and sha256 equal the producer's: the same name is not proof of the same bytes, because a
    copy can be stale (a file built by an older llama.cpp, whose name does not change) or
    damaged (truncated by a crash or a full disk), and on a shared file system the file is found
    equal at the cost of one small task (digests are remembered beside the files). Any other
    file (the base model, which every node must have at the same path) is used when it exists.
    """
    if node_id == _node_id():
        return path
    target = Path(on_this_node(path))
    if not is_cache_file(path) and target.exists():
        return str(target)
    affinity = _on_node(node_id)
    try:
        want = ray.get(file_digest_task.options(name=f"digest-{target.name}", **affinity).remote(path))
    except Exception as exc:  # the node is gone, or no longer has the file
        lines = str(exc).strip().splitlines()
        raise RuntimeError(f"cannot fetch {target.name} from node {node_id}: "
                           f"{lines[-1] if lines else type(exc).__name__}") from exc
    with file_lock(target):  # two trials on this node fetching the same file: one copies it
        if target.exists() and target.stat().st_size == want["size"] and \
                file_digest(target)["sha256"] == want["sha256"]:
            return str(target)
        _copy_from(path, node_id, target, want)
    return str(target)


def _on_node(node_id: str) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


def _copy_from(path: str, node_id: str, target: Path, want: dict) -> None:
    """Stream ``path`` from ``node_id`` into ``target`` in pieces, check its sha256, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    size, h = int(want["size"]), hashlib.sha256()
    offsets = list(range(0, size, PIECE_BYTES))
    opts = {"name": f"fetch-{target.name}", **_on_node(node_id)}
    try:
        with open(tmp, "wb") as fh:
            pending = [read_piece_task.options(**opts).remote(path, off, PIECE_BYTES)
                       for off in offsets[:PIECES_IN_FLIGHT]]
            for k in range(len(offsets)):
                piece = ray.get(pending.pop(0))
                if k + PIECES_IN_FLIGHT < len(offsets):
                    pending.append(read_piece_task.options(**opts).remote(
                        path, offsets[k + PIECES_IN_FLIGHT], PIECE_BYTES))
                fh.write(piece)
                h.update(piece)
                del piece
        if h.hexdigest() != want["sha256"]:
            raise RuntimeError(f"{target.name} changed on node {node_id} while it was fetched "
                               f"(sha256 {h.hexdigest()[:12]}, expected {want['sha256'][:12]})")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    _remember_digest(target, want["sha256"])


# -- a trial's side: the files it needs before its first chunk ---------------------------------

def _imatrix_path(ctx: TrialContext, n_chunks: int, part: str = "") -> str:
    name = f"{ctx.calib_fingerprint}-{part + '-' if part else ''}{n_chunks}.gguf"
    return str(Path(ctx.cache_dir) / "imatrix" / ctx.model_fp / name)


def _collect(ctx: TrialContext, chunks: list, path: str, name: str, threads: int) -> str:
    """Collect (or find in the cache) the imatrix of ``chunks`` (in this trial or on a CPU task);
    its local path."""
    im = run_cpu_work(ctx.cluster, name, build_imatrix_here, ctx.base_model, chunks, path, ctx.settings.n_ctx,
                      work_threads(ctx.cluster, threads))
    return fetch_to_local(im["path"], im["node_id"])


def _language_prefix(ctx: TrialContext, lang: str, n: int, threads: int) -> str:
    """The local path of the imatrix of ``lang``'s first ``n`` calibration chunks. Every prefix of
    the language is collected in one pass the first time any is asked for (see
    :func:`build_imatrix_prefixes_here`), and cached."""
    chunks = [c for c, label in zip(ctx.calib_tokens, ctx.calib_langs) if label == lang]
    stem = "lang-" + mix_file_label([(lang, 1.0)])
    out = run_cpu_work(ctx.cluster, f"imatrix-{lang}", build_imatrix_prefixes_here, ctx.base_model, chunks,
                       [_imatrix_path(ctx, j, stem) for j in range(1, len(chunks) + 1)], ctx.settings.n_ctx,
                       work_threads(ctx.cluster, threads))
    return fetch_to_local(out["paths"][n - 1], out["node_id"])


def prepare_imatrix(recipe: Recipe, ctx: TrialContext, threads: int) -> str | None:
    """The local path of the importance matrix ``recipe`` asks for (None when it needs none);
    ``threads``: the trial's threads (see :func:`work_threads`).

    A plain recipe takes the first ``imatrix_chunks`` calibration chunks. A calibration mix is
    combined from per-language collections (each language's chunk prefix collected once, shared
    by every mix that needs it; see :mod:`ggufopt_ray.calibration`)."""
    k = int(recipe.imatrix_chunks)
    if not k:
        return None
    if not recipe.imatrix_mix:
        if k > len(ctx.calib_tokens):
            raise UserError(f"an imatrix of {k} chunks needs {k} calibration chunks; the dataset has "
                            f"{len(ctx.calib_tokens)} (raise dataset.calib_chunks)")
        return _collect(ctx, ctx.calib_tokens[:k], _imatrix_path(ctx, k), f"imatrix-{k}", threads)
    parts = mix_parts(recipe.imatrix_mix, k, ctx.calib_langs)
    out = Path(on_this_node(_imatrix_path(ctx, k, "mix" + recipe.key())))  # this node's cache root
    if out.exists():
        return str(out)
    paths = [_language_prefix(ctx, p.lang, len(p.indices), threads) for p in parts]
    mixed = combine_parts(parts, [load_imatrix(p) for p in paths], label="mix:" + mix_label(recipe.imatrix_mix))
    out.parent.mkdir(parents=True, exist_ok=True)
    mixed.save(out)
    return str(out)


def prepare_candidate(recipe: Recipe, ctx: TrialContext, threads: int) -> Candidate:
    """Build (or fetch from the cache) the candidate file (in this trial or on a CPU task, see
    :func:`runs_in_trial`), local to this trial. ``threads``: the trial's threads, which its own
    quantize and imatrix work use. The Candidate names the importance matrix it was quantized
    with (``imatrix_path``), for the recipes that rebuild it."""
    im_path = prepare_imatrix(recipe, ctx, threads)
    cand = run_cpu_work(ctx.cluster, f"build-{recipe.label()}", build_candidate_here, recipe, ctx.base_model,
                        ctx.cache_dir, ctx.model_fp, im_path, work_threads(ctx.cluster, threads),
                        # the imatrix is on this (the trial's) node; a build task on another node fetches it
                        imatrix_node_id=ray.get_runtime_context().get_node_id() if im_path else None)
    cand.path = fetch_to_local(cand.path, cand.node_id)
    cand.imatrix_path = im_path if cand.imatrix_hash else ""
    return cand
