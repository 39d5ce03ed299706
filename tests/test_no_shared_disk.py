"""Nodes without a shared disk: candidates and importance matrices travel through the object store.

On one machine every simulated node sees the same disk, so each node of a
``ray.cluster_utils.Cluster`` is started with its own ``GGUFOPT_NODE_CACHE_DIR`` (Ray passes
``env_vars`` to the node's raylet, whose workers inherit it): the build tasks on a node write under
that node's root only, and a file reaches another node's root only through ``fetch_to_local``.

The same sweep (two candidates quantized with an importance matrix) runs once on a single local
node and once on the cluster: trials on node "trial", quantization and imatrix collection on node
"build". Besides the sweep, a candidate is built on a third node from the importance matrix
collected on "build" (``build_candidate_task(..., imatrix_node_id=...)``). The single-node run
uses the session's local Ray; the cluster lives in a child process, so it does not disturb it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPES = ["Q8_0", "Q4_K_M"]
# Every number of a results row that depends on the candidate's bytes and the evaluation.
COMPARED = ("kld_mean", "kld_mean_se", "kld_median", "kld_p99", "kld_max", "same_top", "delta_p_rms",
            "ln_ppl_ratio", "composite", "composite_lo", "composite_hi", "n_tokens", "chunks",
            "imatrix_hash", "bits_per_weight", "size_bytes")


def sweep_config(cache):
    from conftest import small_sweep_config

    cfg = small_sweep_config(cache, name="quant_types", types=list(TYPES), imatrix=True)
    # The same threads in both runs: the baseline worker and each trial on one core.
    cfg.cluster.trial_cpus, cfg.cluster.worker_cpus = 1.0, 1.0
    return cfg


def row_fields(rows):
    return [{k: r.get(k) for k in COMPARED + ("label", "node_id", "build_node_id", "candidate_path",
             "chunks_computed", "recipe", "stop_reason")} for r in rows]


MULTI = r'''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
import ray
from ray.cluster_utils import Cluster
from ggufopt_ray.candidates import Recipe
from ggufopt_ray.distributed.tasks import build_candidate_task
from ggufopt_ray.sweep import run_sweep
from test_no_shared_disk import row_fields, sweep_config

tmp, roots = sys.argv[2], json.loads(sys.argv[3])
MB = 2 ** 20
cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False,
                                                            object_store_memory=200 * MB))
node = {}
for name, cpus in (("trial", 2), ("build", 1), ("spare", 1)):
    node[name] = cluster.add_node(num_cpus=cpus, resources={name + "_node": 1}, object_store_memory=200 * MB,
                                  env_vars={"GGUFOPT_NODE_CACHE_DIR": roots[name]})
cluster.wait_for_nodes()
ray.init(address=cluster.address)
cfg = sweep_config(tmp + "/cache")
cfg.cluster.mode, cfg.cluster.address = "ray", cluster.address
cfg.cluster.worker_resources = {"trial_node": 0.01}  # baseline worker and trials
cfg.cluster.task_resources = {"build_node": 0.01}  # imatrix collection and quantization
res = run_sweep(cfg, tmp + "/out", log=lambda *a: None)

# A candidate built on a third node from the importance matrix collected on "build".
prov = json.loads(open(tmp + "/out/sweep.json").read())["provenance"]
row = [r for r in res.rows if r["label"].startswith("Q4_K_M")][0]
im = sorted(Path(roots["build"], "imatrix").rglob("*.gguf"))
spare = ray.get(build_candidate_task.options(num_cpus=0, resources={"spare_node": 0.01}).remote(
    Recipe.from_dict(json.loads(row["recipe"])), prov["model"], cfg.cache_dir, prov["model_fingerprint"],
    str(im[0]), 1, imatrix_node_id=node["build"].node_id))
print("RESULT " + json.dumps({"errors": res.errors, "rows": row_fields(res.rows),
      "nodes": {k: n.node_id for k, n in node.items()},
      "spare": {"path": spare.path, "node_id": spare.node_id, "imatrix_hash": spare.imatrix_hash,
                "imatrix_sent": str(im[0])}}, default=str))
ray.shutdown(); cluster.shutdown()
'''


def _run(script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GGUFOPT_NODE_CACHE_DIR"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT), *args], capture_output=True, text=True,
                          env=env, timeout=500)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    assert not out["errors"], out["errors"]
    return out


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files(root: Path) -> dict[str, str]:
    """Every candidate and importance matrix under a node root: relative path -> sha256."""
    return {str(p.relative_to(root)): sha256(p) for kind in ("candidates", "imatrix")
            for p in sorted((root / kind).rglob("*.gguf")) if ".partial" not in p.name}


@pytest.mark.slow
def test_candidates_and_imatrix_travel_between_nodes_without_shared_disk(ray_local, tmp_path):
    from ggufopt_ray.sweep import run_sweep

    # The single-node run: the session's local Ray, one cache.
    res = run_sweep(sweep_config(tmp_path / "single" / "cache"), tmp_path / "single" / "out", log=lambda *a: None)
    assert not res.errors, res.errors
    single = row_fields(res.rows)
    by_label = {r["label"]: r for r in single}
    assert len(by_label) == len(TYPES) and all(r["imatrix_hash"] for r in by_label.values())
    assert all(r["chunks"] == 4 for r in by_label.values())
    assert all(r["candidate_path"].startswith(str(tmp_path / "single" / "cache")) for r in by_label.values())

    roots = {name: tmp_path / "nodes" / name for name in ("trial", "build", "spare")}
    for r in roots.values():
        r.mkdir(parents=True)
    # A stale copy of the Q8_0 candidate already sits on the trial node under the final name:
    # same size, one byte different (as a file quantized by another llama.cpp would be). The
    # Q4_K_M candidate and the importance matrix are not on the trial node at all.
    q8 = Path(next(r for r in single if r["label"].startswith("Q8_0"))["candidate_path"])
    stale = roots["trial"].joinpath(*q8.parts[-3:])
    stale.parent.mkdir(parents=True)
    data = bytearray(q8.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stale.write_bytes(bytes(data))
    before = files(roots["trial"])
    assert list(before) == [str(stale.relative_to(roots["trial"]))]
    assert not files(roots["build"]) and not files(roots["spare"])

    multi = _run(MULTI, str(tmp_path / "multi"), json.dumps({k: str(v) for k, v in roots.items()}))
    print(json.dumps(multi, indent=1))
    nodes = multi["nodes"]
    on_trial, on_build = files(roots["trial"]), files(roots["build"])
    imatrices = [rel for rel in on_build if rel.startswith("imatrix/")]
    assert len(imatrices) == 1 and imatrices[0] not in before  # collected once, on the build node

    assert sorted(r["label"] for r in multi["rows"]) == sorted(by_label)
    for r in multi["rows"]:
        ref = by_label[r["label"]]
        # The candidate was built on the build node, in its own root, and the trial ran elsewhere.
        assert r["node_id"] == nodes["trial"] and r["build_node_id"] == nodes["build"]
        rel = str(Path(*Path(r["candidate_path"]).parts[-3:]))
        assert rel in on_build
        assert Path(ref["candidate_path"]).name == Path(r["candidate_path"]).name  # same content address
        # The trial evaluated the copy in its own root: the producer's bytes (and the single-node
        # run's), not what was there before (the stale Q8_0) nor a file it could not have had.
        assert r["candidate_path"] == str(roots["trial"] / rel)
        assert on_trial[rel] == on_build[rel] == sha256(ref["candidate_path"])
        assert before.get(rel) != on_trial[rel]
        # Every chunk computed in this run (no results reused), and the same numbers, exactly.
        assert r["chunks_computed"] == 4 and r["stop_reason"] == ref["stop_reason"]
        for key in COMPARED:
            assert r[key] == ref[key], (r["label"], key, r[key], ref[key])

    # The importance matrix travelled to the trial node (which never collects one) byte for byte.
    assert on_trial[imatrices[0]] == on_build[imatrices[0]]

    # And to a third node that builds a candidate from it: the same imatrix and candidate bytes.
    spare, on_spare = multi["spare"], files(roots["spare"])
    assert spare["node_id"] == nodes["spare"] and spare["imatrix_sent"].startswith(str(roots["build"]))
    assert on_spare[imatrices[0]] == on_build[imatrices[0]]
    assert spare["path"].startswith(str(roots["spare"]))
    q4 = next(r for r in multi["rows"] if r["label"].startswith("Q4_K_M"))
    assert spare["imatrix_hash"] == q4["imatrix_hash"]
    assert sha256(spare["path"]) == on_build[str(Path(*Path(q4["candidate_path"]).parts[-3:]))]


def test_node_cache_root_moves_only_cache_files(monkeypatch, tmp_path):
    from ggufopt_ray.distributed.tasks import NODE_CACHE_ENV, on_this_node

    cand = str(tmp_path / "driver" / "candidates" / "fp123" / "Q8_0-abc.gguf")
    im = str(tmp_path / "driver" / "imatrix" / "fp123" / "calib-2.gguf")
    model = str(tmp_path / "models" / "m.gguf")
    monkeypatch.delenv(NODE_CACHE_ENV, raising=False)
    assert [on_this_node(p) for p in (cand, im, model)] == [cand, im, model]  # no node root: unchanged
    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node"))
    assert on_this_node(cand) == str(tmp_path / "node" / "candidates" / "fp123" / "Q8_0-abc.gguf")
    assert on_this_node(im) == str(tmp_path / "node" / "imatrix" / "fp123" / "calib-2.gguf")
    assert on_this_node(model) == model  # the base model is where the user put it, on every node


def test_file_digest_is_remembered_until_the_file_changes(tmp_path):
    from ggufopt_ray.distributed.tasks import file_digest

    path = tmp_path / "candidates" / "fp" / "x.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"first version")
    assert file_digest(path) == {"size": 13, "sha256": hashlib.sha256(b"first version").hexdigest()}
    assert (tmp_path / "candidates" / "fp" / "x.gguf.sha256").exists()
    st = path.stat()
    path.write_bytes(b"other version")  # same size; the modification time tells it changed
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_digest(path)["sha256"] == hashlib.sha256(b"other version").hexdigest()
