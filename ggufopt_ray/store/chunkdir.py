"""A crash-safe, resumable store of per-chunk HDF5 files under one directory.

HDF5 is not crash-safe: a process killed while it updates a file can leave the superblock or a
B-tree half written and the whole file unreadable. So a store never updates a file in place.
Its header (what produced the data: fingerprints, settings, encoding) is written once, and every
chunk is its own small HDF5 file, written under a temporary name, flushed to disk and renamed
into place. A rename is atomic, so at any moment each chunk is either fully committed or absent;
a ``kill -9`` can only lose the chunk being written, and a rerun resumes at the first missing one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ggufopt_ray.errors import UserError

HEADER_NAME = "header.h5"
FORMAT_VERSION = 1
_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.h5$")
_TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_h5_atomically(final: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    import h5py

    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            for key, value in attrs.items():
                # Every attribute as JSON text: None, nested dicts and lists survive unchanged.
                f.attrs[key] = json.dumps(value, sort_keys=True, default=str)
            for name, arr in arrays.items():
                # track_times=False: identical content gives identical bytes (resume == fresh run).
                f.create_dataset(name, data=np.asarray(arr), track_times=False)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_attrs(f) -> dict:
    out = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        out[key] = json.loads(value)
    return out


class ChunkDirectory:
    """Header + ``chunk_NNNNNN.h5`` files; ``kind`` guards against opening the wrong store type."""

    def __init__(self, root: str | Path, kind: str):
        self.root = Path(root)
        self.kind = kind

    # -- header -------------------------------------------------------------------------------
    @property
    def header_path(self) -> Path:
        return self.root / HEADER_NAME

    def exists(self) -> bool:
        return self.header_path.exists()

    def read_header(self) -> dict:
        import h5py

        if not self.exists():
            raise UserError(f"{self.root} is not a {self.kind} store (no {HEADER_NAME}); "
                            "check the path or create the store first")
        with h5py.File(self.header_path, "r") as f:
            header = _read_attrs(f)
        if header.get("kind") != self.kind:
            raise UserError(f"{self.root} holds a {header.get('kind')!r} store, not a {self.kind!r} store")
        return header

    def create_or_check(self, header: dict, identity_keys: Iterable[str]) -> dict:
        """Create the store with ``header``, or check that an existing one has the same identity.

        ``identity_keys`` are the header fields that must match for chunks to belong together
        (fingerprints, n_ctx, encoding, ...). A mismatch is refused, never mixed.
        """
        header = {"kind": self.kind, "format_version": FORMAT_VERSION, **header}
        self.remove_stale_temporaries()
        if self.exists():
            old = self.read_header()
            diffs = [k for k in identity_keys if old.get(k) != header.get(k)]
            if diffs:
                k = diffs[0]
                raise UserError(f"{self.root} was made with {k}={old.get(k)!r}, not {header.get(k)!r}; "
                                "its chunks cannot be mixed with these - use another output path or --overwrite")
            return old
        self.root.mkdir(parents=True, exist_ok=True)
        _write_h5_atomically(self.header_path, {}, header)
        return header

    def remove_stale_temporaries(self) -> list[str]:
        """Delete half-written files left by writers that were killed (their pid is gone)."""
        removed = []
        if not self.root.exists():
            return removed
        for path in self.root.iterdir():
            m = _TMP_RE.match(path.name)
            if m and not _pid_alive(int(m.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def remove(self) -> None:
        """Delete the whole store (for --overwrite); chunk files first, header last."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if _CHUNK_RE.match(path.name) or path.name.endswith(".tmp"):
                path.unlink()
        if self.header_path.exists():
            self.header_path.unlink()

    # -- chunks -------------------------------------------------------------------------------
    def chunk_path(self, index: int) -> Path:
        return self.root / f"chunk_{index:06d}.h5"

    def has(self, index: int) -> bool:
        return self.chunk_path(index).exists()

    def committed(self) -> list[int]:
        if not self.root.exists():
            return []
        out = []
        for path in self.root.iterdir():
            m = _CHUNK_RE.match(path.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def first_missing(self, start: int = 0, stop: int | None = None) -> int | None:
        """First index in ``[start, stop)`` without a committed chunk (None if all are there)."""
        i = start
        while stop is None or i < stop:
            if not self.has(i):
                return i
            i += 1
        return None

    def write_chunk(self, index: int, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
        path = self.chunk_path(index)
        _write_h5_atomically(path, arrays, {"chunk": int(index), **(attrs or {})})
        return path

    def read_chunk(self, index: int, names: Iterable[str] | None = None) -> tuple[dict, dict]:
        import h5py

        path = self.chunk_path(index)
        if not path.exists():
            raise UserError(f"chunk {index} is not in {self.root}; compute it first")
        with h5py.File(path, "r") as f:
            keys = list(names) if names is not None else list(f.keys())
            arrays = {k: f[k][()] for k in keys}
            attrs = _read_attrs(f)
        return arrays, attrs

    def delete_chunk(self, index: int) -> None:
        path = self.chunk_path(index)
        if path.exists():
            path.unlink()

    def keep_last(self, n: int) -> list[int]:
        """Bounded disk: delete all but the ``n`` highest committed chunks; returns those deleted."""
        if n <= 0:
            raise UserError(f"keep-last must be at least 1, not {n}")
        committed = self.committed()
        doomed = committed[:-n] if len(committed) > n else []
        for i in doomed:
            self.delete_chunk(i)
        return doomed


class ChunkStore:
    """Base of the typed stores: a ChunkDirectory of one ``KIND`` plus its header.

    Subclasses name their ``KIND`` and the ``IDENTITY_KEYS`` of their header; ``prepare_header``
    may add derived fields before the header is written or compared.
    """

    KIND = ""
    IDENTITY_KEYS: tuple[str, ...] = ()

    def __init__(self, root: str | Path):
        self.dir = ChunkDirectory(root, kind=self.KIND)
        self.header: dict = {}

    @property
    def root(self) -> Path:
        return self.dir.root

    @classmethod
    def open(cls, root: str | Path):
        store = cls(root)
        store.header = store.dir.read_header()
        return store

    @classmethod
    def prepare_header(cls, header: dict) -> dict:
        return header

    @classmethod
    def create_or_open(cls, root: str | Path, header: dict, overwrite: bool = False):
        """Create with ``header`` or reopen an identical one; a different identity is refused."""
        store = cls(root)
        if overwrite:
            store.dir.remove()
        store.header = store.dir.create_or_check(cls.prepare_header(header), cls.IDENTITY_KEYS)
        return store

    def has(self, index: int) -> bool:
        return self.dir.has(index)

    def committed(self) -> list[int]:
        return self.dir.committed()
