"""Advisory file locks, so that processes sharing one cache build each thing once.

Two sweeps (or two trials of one sweep, or a sweep and a ``ggufopt`` command) that share a cache
directory often want the same candidate file, importance matrix or baseline at the same moment.
Every such build already writes under a temporary name and renames, so racing builds stay
*correct*, but each one spends the full build time. A lock per output path turns the race into a
wait: the first process builds, the others block on the lock and then find the finished file.

``fcntl.flock`` is used because the kernel drops the lock when its holder dies (even by
``kill -9``), so a crashed builder never leaves a stale lock behind, and the waiting process simply
becomes the builder. The lock file (``OUTPUT.lock``) is never deleted: unlinking a lock file while
another process waits on it would let a third process lock a *new* file with the same name and
build concurrently. Locks are per host on local file systems; Linux NFS clients emulate ``flock``
with byte-range locks, which also work across hosts sharing the mount.

Usage: take the lock, then look for the finished output *again* before building::

    with file_lock(out):
        if not out.exists():
            build(out)
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ggufopt_ray.errors import UserError


def lock_path(target: str | Path) -> Path:
    """The lock file guarding ``target``: ``target`` with ``.lock`` appended, in the same folder."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


@contextmanager
def file_lock(target: str | Path, *, timeout: float | None = None,
              on_wait: Callable[[Path], None] | None = None, poll: float = 0.1) -> Iterator[Path]:
    """Hold an exclusive lock on ``target`` (via ``target.lock``) for the ``with`` block.

    ``on_wait(lock)`` is called once if another process holds the lock, before waiting (e.g. to
    say "waiting for another build of X"). ``timeout`` seconds (None: wait for ever) bounds the
    wait; running out raises ``TimeoutError``. The lock folder is created if needed; a folder that
    cannot be written is a ``UserError`` naming it.
    """
    lock = lock_path(target)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot create the lock file {lock} ({exc.strerror or exc}); "
                        "make its folder writable or choose another cache/output folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if on_wait is not None:
                on_wait(lock)
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as again:
                        if again.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() >= deadline:
                            raise TimeoutError(f"{lock} is still held by another process after "
                                               f"{timeout:g} s") from None
                        time.sleep(poll)
        yield lock
    finally:
        # Closing the descriptor releases the lock (also done by the kernel if we die).
        os.close(fd)


def is_locked(target: str | Path) -> bool:
    """True when another process holds the lock on ``target`` right now (for tests and status)."""
    lock = lock_path(target)
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
