"""Progress of long stages reaches a log file, not only a terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

from ggufopt_ray.distributed.progress import ChunkProgress, ProgressLine


def test_chunk_progress_logs_at_most_every_interval_and_at_the_end():
    now = [100.0]
    lines: list[str] = []
    progress = ChunkProgress("baseline", lines.append, every_s=10.0, clock=lambda: now[0])
    for done, t in [(1, 101.0), (2, 104.0), (3, 111.0), (4, 115.0), (5, 120.0)]:
        now[0] = t
        progress(done, 5)
    # 3 chunks after 11 s: 11/3 s per chunk, 2 left -> ETA 7 s; the last chunk always gets a line
    assert lines == ["baseline 3/5 chunks, 11 s, ETA 7 s", "baseline 5/5 chunks, 20 s"]


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def _trial(trial_id: str, **last):
    """What the callback reads of Tune's Trial objects: the id and the last reported row."""
    return SimpleNamespace(trial_id=trial_id, last_result=last)


def test_progress_line_writes_a_line_per_finished_trial_off_a_terminal():
    stream = _Log()
    line = ProgressLine(3, 8, stream=stream)
    a = _trial("t1", label="Q8_0", chunks=6, stop_reason="precision_reached")
    b = _trial("t2", label="Q4_0", chunks=3, stop_reason="dominated_by=Q4_K_M")
    c = _trial("t3")
    for t in (a, b, c):
        line.on_trial_start(0, [], t)
    line.on_trial_complete(0, [], a)
    line.on_trial_complete(0, [], b)
    line.on_trial_error(0, [], c)
    line.on_experiment_end([])
    out = stream.getvalue().splitlines()
    assert out[0].startswith("trial    Q8_0: 6 chunks, precision_reached (1/3 finished, ")
    assert out[1].startswith("trial    Q4_0: 3 chunks, dominated_by=Q4_K_M (2/3 finished, ")
    assert out[2].startswith("trial    t3: failed (3/3 finished, ")
    assert out[3].startswith("trials 2/3 done, 0 running, 2 stopped early, 1 failed | 0 chunks |")
    assert len(out) == 4
