"""Spare CPUs for the last trials: the share rule, and the actor as the driver's callback feeds it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from ggufopt_ray.distributed.cpu_share import CpuShareUpdater, start_cpu_share, thread_share


@pytest.mark.parametrize("total, base, running, pending, expected", [
    (2, 1, 2, 3, 1),   # trials queue: everyone keeps the base share
    (2, 1, 2, 0, 1),   # nothing queued, but both CPUs are in use
    (2, 1, 1, 0, 2),   # the last trial takes the CPU the other one left
    (2, 1, 1, 1, 1),   # ... but not while one more trial is to come
    (16, 2, 3, 0, 5),  # 3 left of 8: 5 threads each, 15 of 16 CPUs
    (16, 4, 5, 0, 4),  # never below the base share
    (8, 1, 0, 0, 1),   # nobody running: the base share
])
def test_thread_share(total, base, running, pending, expected):
    assert thread_share(total, base, running, pending) == expected


def _trial(trial_id: str, status: str):
    """What the callback reads of Tune's Trial objects: the id and the status."""
    return SimpleNamespace(trial_id=trial_id, status=status)


def test_the_last_trial_gets_the_spare_cpus_once_no_trial_waits(ray_local):
    share = start_cpu_share(2, 1, "test")
    try:
        updater = CpuShareUpdater(share, expected=3)
        assert ray.get(share.threads_for.remote("a")) == 1  # before any news: the base share
        a, b, c = _trial("a", "PENDING"), _trial("b", "PENDING"), _trial("c", "PENDING")
        trials = [a, b, c]
        # Tune may call back before it updates the trial's own status: the callback says it
        updater.on_trial_start(0, trials, a)
        a.status = "RUNNING"
        updater.on_trial_start(0, trials, b)
        b.status = "RUNNING"
        assert ray.get(share.threads_for.remote("a")) == 1  # c still waits for a CPU
        updater.on_trial_complete(0, trials, a)
        a.status = "TERMINATED"
        assert ray.get(share.threads_for.remote("b")) == 1  # c is still to come
        updater.on_trial_start(0, trials, c)
        c.status = "RUNNING"
        assert ray.get(share.threads_for.remote("c")) == 1  # b and c share the two CPUs
        updater.on_trial_recover(0, trials, b)  # b failed and will be retried: it is to come again
        b.status = "PENDING"
        assert ray.get(share.threads_for.remote("c")) == 1
        updater.on_trial_start(0, trials, b)
        b.status = "RUNNING"
        updater.on_trial_error(0, trials, b)  # b failed for good
        b.status = "ERROR"
        assert ray.get(share.threads_for.remote("c")) == 2  # c is the last one: both CPUs
        assert ray.get(share.threads_for.remote("b")) == 1  # not running: the base share
    finally:
        ray.kill(share)
