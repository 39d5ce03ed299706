"""A crash-safe, resumable store of per-chunk HDF5 files under one directory.

HDF5 is not crash-safe: a process killed while it updates a file can leave the superblock or a
B-tree half written and the whole file unreadable. So a store never updates a file in place.
Its header (what produced the data: fingerprints, settings, encoding) is written once, and every
chunk is its own small HDF5 file, written under a temporary name, flushed to disk and renamed
into place. A rename is atomic, so at any moment each chunk is either fully committed or absent;
a ``kill -9`` can only lose the chunk being written, and a rerun resumes at the first missing one.

A rename protects against crashes, not against damage after the fact (a bad disk, a copy cut
short, a stray edit). So every chunk also records a checksum of each of its arrays, and every
read verifies the arrays it returns: a damaged chunk is reported with its path instead of
yielding wrong numbers, and ``discard_damaged`` removes such chunks so that the next run
recomputes them. The checksum guards against damage, not tampering, so new chunks record
XXH3-128 (``xxh3_128:<hex>``, ~10 GB/s; xxhash comes with ``datasets``) instead of SHA-256
(1.4 GB/s: 18 ms of CPU per 25 MB chunk, on the writer thread of a baseline pass and again on
every read); chunks that recorded SHA-256 (a bare hex digest) are verified with it. A header
that HDF5 cannot read is a one-line error naming the file. Failing writes (a full disk, a
read-only folder) remove their temporary file and become one-line errors naming the path and
the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ggufopt_ray.errors import UserError

try:  # installed with `datasets`; without it new chunks record SHA-256
    import xxhash
except ImportError:  # pragma: no cover
    xxhash = None

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


CHECKSUM_ATTR = "checksums"
HEADER_CHECKSUM_ATTR = "header_checksum"


class DamagedFile(UserError):
    """A store file that exists but cannot be trusted: unreadable, truncated or failing its checksum."""

    def __init__(self, path: Path, problem: str, fix: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path} is damaged ({problem}); {fix}")


def _first_line(exc: BaseException) -> str:
    """A short reason for an exception: errno text if any, else the first line of its message."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).strip().splitlines()[0][:200]


def write_failed(path: Path, exc: OSError) -> UserError:
    """The one-line error for a write that the environment refused (full disk, read-only, ...)."""
    reason = _first_line(exc)
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or \
            "space" in reason.lower() or "too large" in reason.lower() or \
            ("requested" in reason and "written" in reason):  # numpy's short write
        fix = "free disk space (or raise the file size limit) and rerun; completed work is kept"
    elif getattr(exc, "errno", None) == errno.ENOENT:
        fix = "its folder does not exist: create it or choose another output path"
    else:
        fix = "make the folder writable or choose another output path"
    return UserError(f"cannot write {path} ({reason}); {fix}")


XXH3_PREFIX = "xxh3_128:"


def array_checksum(arr: np.ndarray, like: str | None = None) -> str:
    """Checksum of an array's shape, dtype and bytes: what a chunk records and every read checks.

    XXH3-128 (``xxh3_128:<hex>``) when xxhash is there, else SHA-256 (a bare hex digest); ``like``:
    a recorded checksum whose algorithm to use (reads verify old chunks with what they recorded).
    """
    arr = np.ascontiguousarray(arr)
    use_xxh3 = xxhash is not None if like is None else like.startswith(XXH3_PREFIX)
    if use_xxh3 and xxhash is None:  # pragma: no cover
        raise UserError("this store records XXH3 checksums, which need the xxhash package: pip install xxhash")
    h = xxhash.xxh3_128() if use_xxh3 else hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B") if arr.ndim and arr.size else arr.tobytes())
    return (XXH3_PREFIX if use_xxh3 else "") + h.hexdigest()


# Arrays at least this large are written from their own buffers into space HDF5 reserved for
# them (``_h5_image``); smaller ones go into HDF5's in-memory image.
LARGE_ARRAY_BYTES = 1 << 20


def _h5_image(arrays: dict[str, np.ndarray], attrs: dict):
    """The HDF5 file of ``arrays`` (C-contiguous) and ``attrs`` as an in-memory image plus ``(offset, array)``
    pieces: large arrays are not copied into the image; HDF5 reserves contiguous space for each
    (allocated at creation, never filled) and the writer puts the array's own bytes there. The
    image holds everything else (where HDF5 wrote metadata after a reserved space, the image has
    zeros in that space, which the writer skips)."""
    import io

    import h5py

    image = io.BytesIO()
    large = {k: a for k, a in arrays.items() if a.nbytes >= LARGE_ARRAY_BYTES and a.dtype.kind in "biuf"}
    pieces = []
    with h5py.File(image, "w", track_order=True) as f:
        for key, value in attrs.items():
            # Every attribute as JSON text: None, nested dicts and lists survive unchanged.
            f.attrs[key] = json.dumps(value, sort_keys=True, default=str)
        for name, arr in arrays.items():
            if name not in large:
                # track_times=False: identical content gives identical bytes (resume == fresh run).
                f.create_dataset(name, data=arr, track_times=False)
        for name, arr in large.items():
            parent, _, leaf = name.rpartition("/")
            group = f.require_group(parent) if parent else f
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            dcpl.set_obj_track_times(False)
            dset = h5py.h5d.create(group.id, leaf.encode(), h5py.h5t.py_create(arr.dtype, logical=True),
                                   h5py.h5s.create_simple(arr.shape), dcpl=dcpl)
            offset = dset.get_offset()
            if offset is None or dset.get_storage_size() != arr.nbytes:  # not contiguous: HDF5 writes it
                dset.write(h5py.h5s.ALL, h5py.h5s.ALL, arr)
            else:
                pieces.append((int(offset), arr))
    return image, sorted(pieces, key=lambda p: p[0])


def _write_image(fh, image, pieces) -> None:
    """Write the file: the image's bytes, with each piece's array in its reserved space."""
    buf = image.getbuffer()
    at = 0
    for offset, arr in pieces:
        fh.write(buf[at:offset])
        fh.write(arr.reshape(-1).view(np.uint8))
        at = offset + arr.nbytes
    fh.write(buf[at:])


def _write_h5_atomically(final: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write one HDF5 file under a temporary name, fsync it, then rename it to ``final``.

    HDF5 builds the file's metadata in memory (``_h5_image``) and the file is written with plain
    file I/O, the large arrays straight from their own buffers (one copy, into the page cache): a
    failing disk then raises one clean ``OSError`` here, instead of HDF5 reporting it later from
    object destructors (a screen of "Exception ignored" tracebacks after the error message).
    """
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    # C order once: the checksums and the writer then read the arrays in place
    arrays = {name: np.asarray(arr, order="C") for name, arr in arrays.items()}
    if arrays:
        attrs = {**attrs, CHECKSUM_ATTR: {name: array_checksum(a) for name, a in arrays.items()}}
    image, pieces = _h5_image(arrays, attrs)
    try:
        with open(tmp, "wb") as fh:
            _write_image(fh, image, pieces)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        raise write_failed(final, exc) from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def _read_attrs(f) -> dict:
    out = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        out[key] = json.loads(value)
    return out


def _header_checksum(header: dict) -> str:
    return hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode()).hexdigest()


def _verify(path: Path, arrays: dict[str, np.ndarray], checksums: dict | None) -> str | None:
    """The first problem with ``arrays`` against the recorded ``checksums`` (None: all good)."""
    if checksums is None:
        return None  # written before checksums existed: nothing to compare with
    for name, arr in arrays.items():
        want = checksums.get(name)
        if want is None:
            return f"array {name!r} has no recorded checksum"
        if array_checksum(np.asarray(arr), like=want) != want:
            return f"checksum mismatch in array {name!r}"
    return None


class ChunkDirectory:
    """Header + ``chunk_NNNNNN.h5`` files; ``kind`` guards against opening the wrong store type."""

    def __init__(self, root: str | Path, kind: str,
                 repair_hint: str = "rerun the command that made the store: it recomputes missing chunks",
                 remake: str = "the command that made it, with --overwrite"):
        self.root = Path(root)
        self.kind = kind
        self.repair_hint = repair_hint  # how a damaged chunk gets recomputed
        self.remake = remake  # what re-creates the whole store (for a damaged header)

    def _header_fix(self) -> str:
        return f"delete {self.root} and compute the store again ({self.remake} does both)"

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
        try:
            with h5py.File(self.header_path, "r") as f:
                header = _read_attrs(f)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            # truncated or garbage: h5py raises OSError; bad attribute text gives ValueError
            raise DamagedFile(self.header_path, _first_line(exc),
                              self._header_fix()) from None
        want = header.pop(HEADER_CHECKSUM_ATTR, None)
        if want is not None and _header_checksum(header) != want:
            raise DamagedFile(self.header_path, "checksum mismatch",
                              self._header_fix())
        if header.get("kind") != self.kind:
            raise UserError(f"{self.root} holds a {header.get('kind')!r} store, not a {self.kind!r} store")
        return header

    def create_or_check(self, header: dict, identity_keys: Iterable[str]) -> dict:
        """Create the store with ``header``, or check that an existing one has the same identity.

        ``identity_keys`` are the header fields that must match for chunks to belong together
        (fingerprints, n_ctx, encoding, ...). A mismatch is refused, never mixed.
        """
        header = {"kind": self.kind, "format_version": FORMAT_VERSION, **header}
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} is a file, not a {self.kind} store folder; choose another path")
        self.remove_stale_temporaries()
        if self.exists():
            old = self.read_header()
            diffs = [k for k in identity_keys if old.get(k) != header.get(k)]
            if diffs:
                k = diffs[0]
                raise UserError(f"{self.root} was made with {k}={old.get(k)!r}, not {header.get(k)!r}; "
                                "its chunks cannot be mixed with these - use another output path or --overwrite")
            return old
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failed(self.root, exc) from None
        _write_h5_atomically(self.header_path, {}, {**header, HEADER_CHECKSUM_ATTR: _header_checksum(header)})
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

    def _damaged(self, path: Path, problem: str) -> DamagedFile:
        return DamagedFile(path, problem, self.repair_hint)

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
        try:
            with h5py.File(path, "r") as f:
                keys = list(names) if names is not None else list(f.keys())
                missing = [k for k in keys if k not in f]
                if missing:
                    raise self._damaged(path, f"array {missing[0]!r} is missing")
                arrays = {k: f[k][()] for k in keys}
                attrs = _read_attrs(f)
        except DamagedFile:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise self._damaged(path, _first_line(exc)) from None
        problem = _verify(path, arrays, attrs.pop(CHECKSUM_ATTR, None))
        if problem:
            raise self._damaged(path, problem)
        return arrays, attrs

    def check_chunk(self, index: int) -> str | None:
        """What is wrong with committed chunk ``index`` (None when it reads back and verifies).

        Reads every array and checks its checksum, so it costs one full read of the chunk.
        """
        try:
            self.read_chunk(index)
        except DamagedFile as exc:
            return exc.problem
        return None

    def discard_damaged(self, indices: Iterable[int] | None = None) -> list[tuple[Path, str]]:
        """Delete the committed chunks among ``indices`` (default: all) that fail ``check_chunk``.

        Returns ``(path, problem)`` per deleted chunk, for the caller to report; a later run then
        sees those chunks as missing and recomputes them.
        """
        committed = set(self.committed())
        wanted = sorted(committed if indices is None else committed.intersection(indices))
        damaged = []
        for i in wanted:
            problem = self.check_chunk(i)
            if problem is not None:
                path = self.chunk_path(i)
                path.unlink(missing_ok=True)
                damaged.append((path, problem))
        return damaged

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
    REPAIR_HINT = "rerun the command that made the store: it recomputes missing chunks"
    REMAKE = "the command that made it, with --overwrite"

    def __init__(self, root: str | Path):
        self.dir = ChunkDirectory(root, kind=self.KIND, repair_hint=self.REPAIR_HINT, remake=self.REMAKE)
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
    def create_or_open(cls, root: str | Path, header: dict, overwrite: bool = False,
                       replace_damaged: bool = False):
        """Create with ``header`` or reopen an identical one; a different identity is refused.

        ``replace_damaged``: a store whose header cannot be read is deleted and created afresh
        instead of refused. Only for stores at content-addressed cache paths (the folder name is
        the identity, so nothing but the same data can ever belong there).
        """
        store = cls(root)
        if overwrite:
            store.dir.remove()
        elif replace_damaged and store.dir.exists():
            try:
                store.dir.read_header()
            except DamagedFile:
                store.dir.remove()
        store.header = store.dir.create_or_check(cls.prepare_header(header), cls.IDENTITY_KEYS)
        return store

    def discard_damaged(self, indices: Iterable[int] | None = None) -> list[tuple[Path, str]]:
        """Delete damaged chunks so that they are recomputed; see ``ChunkDirectory.discard_damaged``."""
        return self.dir.discard_damaged(indices)

    def has(self, index: int) -> bool:
        return self.dir.has(index)

    def committed(self) -> list[int]:
        return self.dir.committed()
