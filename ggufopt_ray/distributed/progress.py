"""Progress of a sweep's long stages, on a terminal and in logs.

``ProgressLine``: one live line for the trials (done/running/stopped, chunks, ETA) rewritten on a
terminal; where stderr is not a terminal (a log file, a batch job) one line per finished trial
instead. The run directory's log (``run_dir.RUN_LOG``) gets the line of every finished trial
either way. ``ChunkProgress``: "baseline 12/32 chunks ..." lines at most every few seconds.
"""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from ggufopt_ray.run_dir import RUN_LOG


class ProgressLine(Callback):
    """Rewrites one status line on stderr as trials report; quiet when stderr is not a terminal."""

    def __init__(self, total_trials: int | None, chunks_per_trial: int, stream=None):
        self.total = total_trials
        self.chunks_per_trial = chunks_per_trial
        self._stream = stream  # None: sys.stderr at write time (Tune pickles callbacks; streams do not pickle)
        self.started = time.monotonic()
        self.chunks = 0
        self.done = 0
        self.errored = 0
        self.early = 0
        self.running: set[str] = set()
        self._last = 0.0

    @property
    def stream(self):
        return self._stream or sys.stderr

    @property
    def tty(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stream"] = None
        return state

    def _render(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.5:
            return
        self._last = now
        elapsed = now - self.started
        eta = ""
        if self.total and self.done:
            left = max(self.total - self.done, 0)
            eta = f" ETA {elapsed / self.done * left:5.0f}s"
        total = f"/{self.total}" if self.total else ""
        line = (f"trials {self.done}{total} done, {len(self.running)} running, {self.early} stopped early, "
                f"{self.errored} failed | {self.chunks} chunks | {elapsed:5.0f}s{eta}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100) + ("\n" if final else ""))
            self.stream.flush()
        elif final:
            self.stream.write(line + "\n")
        if final:
            RUN_LOG.info(line)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._render()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.chunks += 1
        self._render()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1
        last = trial.last_result or {}
        if last.get("stop_reason") not in (None, "all_chunks", "running"):
            self.early += 1
        self._log_trial(trial, f"{last.get('chunks', '?')} chunks, {last.get('stop_reason') or 'done'}")
        self._render()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errored += 1
        self._log_trial(trial, "failed")
        self._render()

    def _log_trial(self, trial, what: str) -> None:
        """Each finished trial gets a line in the run's log, and off a terminal (where the live
        line is not drawn) on stderr too."""
        label = (trial.last_result or {}).get("label") or trial.trial_id
        total = f"/{self.total}" if self.total else ""
        elapsed = time.monotonic() - self.started
        line = f"trial    {label}: {what} ({self.done + self.errored}{total} finished, {elapsed:.0f} s)"
        RUN_LOG.info(line)
        if self.tty:
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    def on_experiment_end(self, trials, **info):
        self._render(final=True)


class ChunkProgress:
    """``"<what> 12/32 chunks, 8 s, ETA 14 s"`` through ``log``, at most every ``every_s`` seconds
    and at the last chunk: a pass of many minutes shows where it is in a log file too."""

    def __init__(self, what: str, log, every_s: float = 10.0, clock=time.monotonic):
        self.what, self.log, self.every_s, self.clock = what, log, float(every_s), clock
        self.started = self.last = clock()

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        eta = f", ETA {elapsed / done * (total - done):.0f} s" if 0 < done < total else ""
        self.log(f"{self.what} {done}/{total} chunks, {elapsed:.0f} s{eta}")
