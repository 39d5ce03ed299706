"""Row blocks of a chunk on a few threads: the parallel loop of every per-row kernel (KLD
comparison, baseline encoders).

Why a pool that stays alive and a shared queue of blocks, not fresh threads with fixed shares:
a chunk's comparison at a big vocabulary is tens of milliseconds, so the two costs of fresh
threads with fixed shares are not small next to it. New threads first run where they were
woken, beside the thread that started them, until the scheduler spreads them; and with a fixed
share per thread the call lasts as long as the slowest share (a thread that started late, or one
whose rows have more entries set aside). Measured at V = 128,256 on 2 cores, paired runs: fresh
threads with round-robin shares reached 1.39-1.61x one thread's speed, the persistent pool with
a shared queue 1.72-1.86x. Workers write disjoint rows of shared outputs; numpy and the ctypes
kernels release the GIL inside each call, so the threads run in parallel on blocks of a few
hundred KiB or more. The calling thread works too (it is awake already), so one thread of the
pool serves two. A kernel that shares out rows itself (the KLD kernel's counter) needs only
``run_on_workers``: one call per thread, no Python between blocks.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from ggufopt_ray.errors import UserError


def check_threads(threads) -> int:
    """``threads`` as a positive int; anything else is the caller's mistake (a UserError)."""
    try:
        value = int(threads)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or value != threads:
        raise UserError(f"threads must be a positive whole number, got {threads!r}")
    return value


class BlockQueue:
    """The blocks of one call, handed out one at a time to whichever worker asks next (an
    iterator that several threads share)."""

    def __init__(self, blocks: list[tuple[int, int]]):
        self._blocks = blocks
        self._next = 0
        self._lock = threading.Lock()

    def __iter__(self):
        return self

    def close(self) -> None:
        """No more blocks for anyone (a worker failed: the call is lost anyway)."""
        with self._lock:
            self._next = len(self._blocks)

    def __next__(self) -> tuple[int, int]:
        with self._lock:
            i = self._next
            if i >= len(self._blocks):
                raise StopIteration
            self._next = i + 1
        return self._blocks[i]


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()  # .in_pool: this thread is one of the pool's workers


def _forget_pool() -> None:
    """In a forked child the parent's worker threads do not exist: start a new pool when asked."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _mark_worker() -> None:
    _local.in_pool = True


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool, grown to at least ``workers`` threads. A grown pool replaces the old one
    without shutting it down (a caller may still be submitting to it); once no caller holds it,
    its idle threads exit."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="rows", initializer=_mark_worker)
            _pool_size = workers
        return _pool


def _run(work, queue: BlockQueue) -> None:
    try:
        work(queue)
    except BaseException:
        queue.close()
        raise


def run_on_workers(workers: int, fn: Callable[[], None]) -> None:
    """Call ``fn()`` once on each of ``workers`` threads at the same time: the calling thread and
    ``workers - 1`` of the shared pool (for kernels that share out their rows themselves). The
    first error is raised once every call has returned. Inside a worker it is one call, here."""
    if workers <= 1 or getattr(_local, "in_pool", False):
        fn()
        return
    pool = _executor(workers - 1)
    futures = [pool.submit(fn) for _ in range(workers - 1)]
    errors = []
    _local.in_pool = True  # the calling thread is the last worker: it is awake already
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - re-raised below
        errors.append(e)
    finally:
        _local.in_pool = False
    for f in futures:  # wait for all before raising, so no worker still writes the outputs
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    if errors:
        raise errors[0]


def run_row_blocks(n: int, step: int, threads: int, work: Callable[[Iterable[tuple[int, int]]], None]) -> None:
    """Split rows 0..n into blocks of ``step`` rows and run ``work`` once on each of up to
    ``threads`` workers, each called as ``work(blocks)`` with an iterable of ``(r0, r1)`` that the
    workers share (so each can allocate its scratch once, and a worker that is ahead takes more
    blocks). The calling thread is one of the workers; the others come from the shared pool.
    Every block goes to exactly one worker; the first error of any worker is raised once all
    have stopped.

    Called from inside a worker (a kernel that itself runs row blocks) it runs in that thread:
    the outer call is already parallel, and waiting on the pool from its own thread could block.
    """
    blocks = [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]
    queue = BlockQueue(blocks)
    run_on_workers(min(check_threads(threads), len(blocks)), lambda: _run(work, queue))
