"""Spare CPUs for the last trials of a local sweep.

A local sweep gives each trial ``CPUs // min(trials, CPUs)`` threads, so every CPU is busy while
trials queue. At the end no trial waits any more and the ones still running could use the CPUs
the finished ones left: on 2 cores, the sweep's last trial used to evaluate its chunks on one
thread while the other core idled. Here the driver (a Tune callback that sees every trial start
and end) tells a small named actor how many trials run and how many are still to come; a trial
asks it for its thread count between chunks and switches its engine
(:meth:`~ggufopt_ray.engine.session.ModelSession.set_threads`, which leaves every number as it
was). While any trial is still to come, every trial keeps its share, so no queued trial ever
waits for CPUs it would have had.

Only a local cluster of the sweep's own, with the per-trial CPUs left to the sweep
(``cluster.trial_cpus`` and ``model.n_threads`` unset), shares; on a cluster we join, free CPUs
are the cluster's, not ours.
"""

from __future__ import annotations

import ray
from ray.tune import Callback


def thread_share(total_cpus: int, base: int, running: int, pending: int) -> int:
    """Threads for each running trial: ``base`` while trials are still to come (``pending``),
    else the CPUs divided among the ``running`` ones (never fewer than ``base``)."""
    if pending > 0 or running < 1:
        return base
    return max(base, int(total_cpus) // int(running))


@ray.remote(num_cpus=0)
class CpuShare:
    """What the driver knows about running and coming trials, for trials to ask."""

    def __init__(self, total_cpus: int, base: int):
        self.total, self.base = int(total_cpus), int(base)
        self.running: set[str] = set()
        self.pending = 1  # nothing known yet: keep the base share

    def update(self, running: list[str], pending: int) -> None:
        self.running, self.pending = set(running), int(pending)

    def threads_for(self, trial_id: str) -> int:
        if trial_id not in self.running:
            return self.base
        return thread_share(self.total, self.base, len(self.running), self.pending)


class CpuShareUpdater(Callback):
    """Tune callback on the driver: after every trial start, end, error or retry, tells the share
    actor which trials run and how many of the ``expected`` trials have not started yet (a
    trial that Tune will retry counts as not started)."""

    def __init__(self, share, expected: int):
        self.share, self.expected = share, int(expected)

    def _update(self, trials, trial, running_now: bool, started_now: bool) -> None:
        # The trial's own status may not be updated yet when Tune calls back: say it explicitly.
        running = {t.trial_id for t in trials if t.status == "RUNNING" and t.trial_id != trial.trial_id}
        started = {t.trial_id for t in trials if t.status in ("RUNNING", "TERMINATED", "ERROR")}
        if running_now:
            running.add(trial.trial_id)
        (started.add if started_now else started.discard)(trial.trial_id)
        self.share.update.remote(sorted(running), max(0, self.expected - len(started)))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trials, trial, running_now=True, started_now=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trials, trial, running_now=False, started_now=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trials, trial, running_now=False, started_now=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._update(trials, trial, running_now=False, started_now=False)


def start_cpu_share(total_cpus: int, base: int, run_tag: str):
    """The sweep's share actor (named, so the dashboard shows it)."""
    return CpuShare.options(name=f"cpu-share-{run_tag}").remote(int(total_cpus), int(base))


def stop_cpu_share(share) -> None:
    """End the sweep's share actor once its trials are done."""
    ray.kill(share)
