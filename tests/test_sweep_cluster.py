"""Placement on a simulated multi-node cluster: logits work on the GPU node, quantization on the CPU node.

The cluster (a head and two nodes with different custom resources) is made with
``ray.cluster_utils.Cluster`` in a child process, so it does not disturb the session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
import ray
from ray.cluster_utils import Cluster
from conftest import small_sweep_config
from ggufopt_ray.sweep import run_sweep

MB = 2 ** 20
cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False,
                                                            object_store_memory=200 * MB))
gpu = cluster.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1}, object_store_memory=200 * MB)
cpu = cluster.add_node(num_cpus=2, resources={"cpu_node": 1}, object_store_memory=200 * MB)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
cfg = small_sweep_config(sys.argv[2] + "/cache", types=["Q8_0", "Q4_K_M"])
cfg.cluster.mode, cfg.cluster.address = "ray", cluster.address
cfg.cluster.worker_gpus = 0.5
cfg.cluster.worker_resources = {"gpu_node": 0.01}
cfg.cluster.task_resources = {"cpu_node": 0.01}
res = run_sweep(cfg, sys.argv[2] + "/out", log=lambda *a: None)
print("RESULT " + json.dumps({"gpu": gpu.node_id, "cpu": cpu.node_id, "errors": res.errors,
      "baseline_nodes": res.baseline["worker_nodes"],
      "rows": [{k: r[k] for k in ("label", "node_id", "build_node_id", "kld_mean")} for r in res.rows]}))
ray.shutdown(); cluster.shutdown()
'''


@pytest.mark.slow
def test_logits_on_gpu_node_quantize_on_cpu_node(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=500)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    print(json.dumps(out, indent=1))
    assert not out["errors"]
    assert out["baseline_nodes"] == [out["gpu"]]  # the baseline logits actor ran on the GPU node
    assert sorted(r["label"] for r in out["rows"]) == ["Q4_K_M", "Q8_0"]
    for r in out["rows"]:
        assert r["node_id"] == out["gpu"]  # candidate logits (the trial) on the GPU node
        assert r["build_node_id"] == out["cpu"]  # quantization task on the CPU node
