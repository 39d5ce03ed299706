"""A trial's quantize and imatrix work runs on the threads the trial holds.

Safe only because the files do not depend on the thread count: checked here byte for byte with
the real llama.cpp (quantization with and without an importance matrix, and the importance
matrix itself), then the rule that picks the count.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ggufopt_ray.config import ClusterConfig
from ggufopt_ray.distributed.tasks import work_threads
from ggufopt_ray.engine.imatrix import collect_imatrix
from ggufopt_ray.engine.quantize import quantize_model


def _chunks(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1024, size=length).astype(np.int32) for _ in range(n)]


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def imatrices(tiny_model):
    chunks = _chunks(3, 96)
    return {n: collect_imatrix(tiny_model, chunks, n_threads=n) for n in (1, 2, 3)}


def test_imatrix_does_not_depend_on_threads(imatrices):
    one = imatrices[1]
    assert one.entries, "the collector saw no matrix"
    for n in (2, 3):
        other = imatrices[n]
        assert sorted(other.entries) == sorted(one.entries)
        assert other.hash() == one.hash()
        for name, entry in one.entries.items():
            np.testing.assert_array_equal(other.entries[name].sums, entry.sums, err_msg=name)
            np.testing.assert_array_equal(other.entries[name].counts, entry.counts, err_msg=name)


@pytest.mark.parametrize("qtype, with_imatrix", [("Q4_K_M", False), ("Q6_K", False), ("IQ4_XS", True),
                                                 ("IQ2_XS", True)])
def test_quantized_file_does_not_depend_on_threads(tiny_model, imatrices, tmp_path, qtype, with_imatrix):
    im = tmp_path / "im.gguf"
    if with_imatrix:
        imatrices[1].save(im)
    digests = {}
    for n in (1, 2, 4):
        out = tmp_path / f"{qtype}-{n}.gguf"
        quantize_model(tiny_model, qtype, out, imatrix=str(im) if with_imatrix else None, threads=n)
        digests[n] = _sha256(out)
    assert digests[2] == digests[1] and digests[4] == digests[1]


@pytest.mark.parametrize("cluster, trial_threads, expected", [
    (ClusterConfig(), 1, 1),  # in the trial: the trial's threads
    (ClusterConfig(), 4, 4),
    (ClusterConfig(), 0, 1),  # never fewer than one
    (ClusterConfig(task_cpus=3.0), 8, 3),  # a task with CPUs of its own: those
    (ClusterConfig(task_cpus=0.5), 8, 1),
    (ClusterConfig(task_resources={"cpu_node": 0.01}), 8, 1),  # a 0-CPU task on a node group: one
])
def test_work_threads_rule(cluster, trial_threads, expected):
    assert work_threads(cluster, trial_threads) == expected
