"""The row-block loop every per-row kernel runs on: each block exactly once, really in parallel,
errors raised, nested and forked use safe."""

import multiprocessing
import threading
import time

import pytest

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.row_blocks import BlockQueue, run_row_blocks


def _visits(n, step, threads):
    seen, lock = [], threading.Lock()

    def work(blocks):
        for r0, r1 in blocks:
            with lock:
                seen.append((r0, r1))

    run_row_blocks(n, step, threads, work)
    return sorted(seen)


@pytest.mark.parametrize("n,step,threads", [(0, 4, 2), (1, 4, 2), (10, 3, 1), (10, 3, 2), (100, 7, 3), (64, 1, 8)])
def test_every_block_exactly_once(n, step, threads):
    want = [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]
    assert _visits(n, step, threads) == want


def test_two_threads_work_at_once():
    """The first worker to take a block waits until another worker holds one: only a second
    thread running at the same time lets the call finish."""
    entered, lock = set(), threading.Lock()
    both = threading.Event()

    def work(blocks):
        for _ in blocks:
            with lock:
                entered.add(threading.get_ident())
                if len(entered) == 2:
                    both.set()
            assert both.wait(10), "no second worker ran while the first held a block"

    run_row_blocks(8, 1, 2, work)
    assert len(entered) == 2
    assert threading.get_ident() in entered  # the calling thread is one of the workers


def test_error_of_a_worker_is_raised_and_stops_the_others():
    taken, lock = [], threading.Lock()

    def work(blocks):
        for r0, _ in blocks:
            with lock:
                taken.append(r0)
            if r0 == 0:
                raise RuntimeError("bad block 0")
            time.sleep(0.001)  # the others are slow: the failure closes the queue long before its end

    with pytest.raises(RuntimeError, match="bad block 0"):
        run_row_blocks(1000, 1, 2, work)
    assert len(taken) < 1000  # the queue closed when block 0 failed


def test_queue_close_ends_iteration():
    q = BlockQueue([(0, 1), (1, 2), (2, 3)])
    assert next(q) == (0, 1)
    q.close()
    assert list(q) == []


def test_nested_call_runs_in_the_worker():
    """A kernel that itself runs row blocks inside a worker must not wait on the pool it is in:
    the inner call runs in the worker's own thread."""
    mismatches, count, lock = [], [0], threading.Lock()

    def outer(blocks):
        for _ in blocks:
            me = threading.get_ident()

            def inner(inner_blocks):
                for _ in inner_blocks:
                    with lock:
                        count[0] += 1
                        if threading.get_ident() != me:
                            mismatches.append(threading.get_ident())

            run_row_blocks(6, 1, 2, inner)

    done = threading.Event()
    t = threading.Thread(target=lambda: (run_row_blocks(4, 1, 2, outer), done.set()), daemon=True)
    t.start()
    assert done.wait(30), "nested run_row_blocks did not finish"
    assert count[0] == 4 * 6
    assert mismatches == []


def _child(q):
    q.put(_visits(9, 2, 2))


def test_works_in_a_forked_child():
    run_row_blocks(4, 1, 2, lambda blocks: list(blocks))  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert q.get(timeout=5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", None])
def test_bad_thread_count_is_a_user_error(bad):
    with pytest.raises(UserError, match="threads must be a positive whole number"):
        run_row_blocks(4, 1, bad, lambda blocks: None)
