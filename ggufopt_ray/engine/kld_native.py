"""The compiled per-token KLD kernel (``kld_kernel.c``): built on first use, loaded with ctypes.

``metrics.kld.compare_rows`` asks ``default_kernel()`` for it (through ``kld.row_kernel``), so
every caller — trials, ``ggufopt bench``, the benches — gets it without wiring of its own. It
computes, per row, what the numpy kernel does (same formulation, same float64 fallback for
non-finite rows) in three passes over the row instead of about ten, reading float16 baseline rows
directly (no decode into float32).

Selection: ``GGUFOPT_KLD_KERNEL`` = ``auto`` (default: native when it builds, else numpy with one
warning), ``native`` (a one-line UserError when it cannot be built) or ``numpy``.

Build: the system C compiler (``$CC``, else ``cc``/``gcc``) with ``-O3 -march=native``, into
``$GGUFOPT_KERNEL_CACHE`` or ``$XDG_CACHE_HOME/ggufopt_ray/kernels`` (default
``~/.cache/ggufopt_ray/kernels``), under a name keyed by a hash of the source, the flags, the
compiler's version and what ``-march=native`` means on this CPU. The library is compiled to a
temporary name and renamed into place under a file lock, so concurrent processes neither clash
nor load a half-written file. A freshly loaded library is checked on a few rows against a float64
computation before use.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.row_blocks import check_threads, run_on_workers, run_row_blocks

ENV_KERNEL = "GGUFOPT_KLD_KERNEL"
ENV_CACHE = "GGUFOPT_KERNEL_CACHE"
SOURCE = Path(__file__).with_name("kld_kernel.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=gnu11", "-fPIC", "-shared"]
ABI = 4
# The compact encoder (compact_kernel.c): a library of its own, because its float64 code must
# round as numpy's elementwise operations do (no fused multiply-add), which the KLD kernel's
# flags do not ask for.
COMPACT_SOURCE = Path(__file__).with_name("compact_kernel.c")
COMPACT_FLAGS = FLAGS + ["-ffp-contract=off"]
COMPACT_ABI = 1
# Headers the sources include (part of every library's build key).
HEADERS = [Path(__file__).with_name(name) for name in ("simd_exp.h", "simd_rows.h")]
# Rows per foreign call of a kernel that reads the arrays directly in blocks (the float16
# encoder; ~2 MiB of float32 per call): enough to make the call overhead negligible, few enough
# to share rows evenly among threads.
DIRECT_BLOCK_ELEMENTS = 1 << 19
# Rows a thread takes at a time from the shared counter inside the kernel (ggk_kld_rows_shared):
# at least ~64 Ki entries, so the atomic increment is negligible; small, so threads finish together.
SHARED_STEP_ELEMENTS = 1 << 16

log = logging.getLogger(__name__)

_lock = threading.RLock()  # re-entered: the compact self-test loads the KLD kernel
_loaded: dict[tuple, tuple[object, str | None]] = {}  # (compiler, cache dir, kind) -> (lib or None, why not)
_warned: set[tuple] = set()


# ----------------------------------------------------------------------------- build and load

def _compiler() -> list[str] | None:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ggufopt_ray" / "kernels"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, **kw)


def _build_key(cc: list[str], source: bytes, flags: list[str] = FLAGS) -> str:
    """Hash of everything the library depends on: source, flags, compiler version, the CPU's
    ``-march=native`` expansion (raises OSError or CalledProcessError without a working compiler)."""
    version = _run(cc + ["--version"])
    version.check_returncode()
    native = _run(cc + ["-march=native", "-E", "-v", "-x", "c", os.devnull, "-o", os.devnull])
    native.check_returncode()
    h = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), version.stdout.encode(), native.stderr.encode(),
                 platform.machine().encode(), str(ctypes.sizeof(ctypes.c_void_p)).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _build(cc: list[str], directory: Path, source_path: Path = SOURCE, flags: list[str] = FLAGS) -> Path:
    """The library of ``source_path`` built with ``flags`` (named after the source's stem)."""
    source = source_path.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = _build_key(cc, source, flags)
    stem = source_path.stem
    directory.mkdir(parents=True, exist_ok=True)
    lib = directory / f"{stem}-{key}.so"
    if lib.exists():
        return lib
    with open(directory / f"{stem}-{key}.lock", "w") as lock_file:
        try:
            import fcntl

            fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building the same library
        except ImportError:  # no fcntl (not POSIX): the temporary name and rename still keep it safe
            pass
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-{key}-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            res = _run(cc + flags + ["-o", tmp, str(source_path), "-lm"])
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cc)} failed: {(res.stderr or res.stdout).strip()[-500:]}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def open_library(path: Path, abi_function: str, abi: int):
    """The library at ``path``, refused (RuntimeError) unless ``abi_function()`` returns ``abi``:
    a library built from another version of its source is not called with this one's arguments."""
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, abi_function)
    fn.restype = ctypes.c_int
    if fn() != abi:
        raise RuntimeError(f"{path} has ABI {fn()}, expected {abi}")
    return lib


def _load(path: Path):
    lib = open_library(path, "ggk_abi", ABI)
    lib.ggk_simd.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ggk_kld_rows.restype = i64
    lib.ggk_kld_rows.argtypes = [i64, i64, p, i64, ctypes.c_int, p, i64, p, p, p, p, p, p, p, p, p]
    lib.ggk_kld_rows_shared.restype = i64
    lib.ggk_kld_rows_shared.argtypes = [i64, i64, p, i64, ctypes.c_int, p, i64, p, p, p, p, p, p, p, p, p, p, i64]
    _self_test(lib)
    return lib


def _self_test(lib) -> None:
    """A few rows against a float64 computation: a miscompiled or mis-targeted library is refused."""
    from ggufopt_ray.metrics.kld import _rows_float64

    rng = np.random.default_rng(0)
    for v in (1, 13, 1000):
        a = (3 * rng.standard_normal((3, v))).astype(np.float32)
        b = (a + 0.3 * rng.standard_normal((3, v)).astype(np.float32) + 2).astype(np.float32)
        out = {k: np.empty(3, np.float32) for k in ("kld", "same_top", "delta_p", "nll_base", "nll_cand")}
        bad = _call(lib, a, b, None, None, out, 0, 3, _scratch(v), np.zeros(3, np.uint8))
        want = _rows_float64(a, b)[0]
        if bad.any() or not np.allclose(out["kld"], want, rtol=1e-5, atol=1e-7):
            raise RuntimeError(f"self-test failed at V={v}: {out['kld']} vs {want}")


def _settings_key() -> tuple:
    """What decides which library the current process settings select (cheap: no file system)."""
    return tuple(os.environ.get(k) for k in ("CC", "PATH", ENV_CACHE, "XDG_CACHE_HOME", "HOME"))


_by_settings: dict[tuple, tuple] = {}  # _settings_key() -> (compiler, cache dir) key of _loaded


def register_kind(kind: str, source: Path, flags: list[str], load) -> None:
    """Make ``kind`` a library ``_entry`` can build: ``source`` compiled with ``flags``, then
    ``load(path)`` (which checks it and returns the loaded library)."""
    _kinds[kind] = (source, flags, load)


def _entry(kind: str = "kld") -> tuple:
    """(library or None, why not) for the current settings, building and loading it on first use.
    ``kind``: "kld" (kld_kernel.c), "compact" (compact_kernel.c), or one that ``register_kind``
    added ("f16": f16_kernel.c, by ``f16_native``)."""
    skey = _settings_key()
    base = _by_settings.get(skey)
    if base is None:
        base = _by_settings[skey] = (tuple(_compiler() or ()), str(cache_dir()))
    key = base + (kind,)
    entry = _loaded.get(key)
    if entry is None:
        with _lock:
            entry = _loaded.get(key)
            if entry is None:
                try:
                    if not key[0]:
                        raise RuntimeError("no C compiler found (set CC)")
                    source, flags, load = _kinds[kind]
                    lib = load(_build(list(key[0]), Path(key[1]), source, flags))
                    entry = (lib, None)
                except Exception as e:  # noqa: BLE001 - any failure means: use the numpy kernel
                    entry = (None, f"{type(e).__name__}: {' '.join(str(e).split())}"[:400])
                _loaded[key] = entry
    return entry


_kinds: dict[str, tuple] = {}  # kind -> (source, flags, load); filled below and by register_kind


def library():
    """The loaded kernel library for the current settings ($CC, the cache directory), or None when
    it cannot be built (the reason: ``why_not()``)."""
    return _entry()[0]


def why_not() -> str | None:
    """Why the library for the current settings is unavailable (None when it is available)."""
    return _entry()[1]


def default_kernel():
    """``compare`` when the compiled kernel is selected and available, else None (numpy kernel)."""
    lib = _selected("kld", "compiled KLD kernel", "using the numpy kernel")
    return None if lib is None else compare


def _selected(kind: str, what: str, fallback: str):
    """The compiled library of ``kind`` ("kld", "compact", "f16") as ``GGUFOPT_KLD_KERNEL`` selects it:
    None for numpy (forced, or auto without a compiler: one warning per settings), a UserError
    for native without it or an unknown value."""
    mode = (os.environ.get(ENV_KERNEL) or "auto").strip().lower()
    if mode == "numpy":
        return None
    if mode not in ("auto", "native"):
        raise UserError(f"{ENV_KERNEL} must be auto, native or numpy, got {os.environ.get(ENV_KERNEL)!r}")
    lib, reason = _entry(kind)
    if lib is not None:
        return lib
    if mode == "native":
        raise UserError(f"{ENV_KERNEL}=native but the {what} is unavailable ({reason}); "
                        f"install a C compiler or set {ENV_KERNEL}=numpy")
    # one warning per settings and reason: without a compiler every kind fails alike
    key = _by_settings[_settings_key()] + (reason,)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s unavailable, %s: %s", what, fallback, reason)
    return None


# ----------------------------------------------------------------------------- the kernel

def _scratch(v: int) -> np.ndarray:
    """One worker's scratch for the kernel: room for every vector of a row set aside (s and ea)."""
    return np.empty(2 * ((v + 7) // 8 * 8), np.float32)


def _ptr(x: np.ndarray, row: int = 0) -> int:
    return x.ctypes.data + row * x.strides[0]


def _row_args(n: int, a, b, ref, base_top, out, bad, r0: int) -> tuple:
    """The arguments of ``ggk_kld_rows`` (and the leading ones of ``ggk_kld_rows_shared``) up to
    the scratch: ``n`` rows of ``a`` (float16/float32) and ``b`` (float32) from their first row,
    whose rows must be contiguous; ``ref``/``base_top``/``out``/``bad`` indexed from row ``r0``."""
    return (n, b.shape[1], a.ctypes.data, a.strides[0] // a.itemsize, int(a.dtype == np.float16),
            b.ctypes.data, b.strides[0] // 4,
            None if base_top is None else _ptr(base_top, r0), None if ref is None else _ptr(ref, r0),
            _ptr(out["kld"], r0), _ptr(out["same_top"], r0), _ptr(out["delta_p"], r0),
            _ptr(out["nll_base"], r0), _ptr(out["nll_cand"], r0), _ptr(bad, r0))


def _call(lib, a, b, ref, base_top, out, r0, r1, scratch, bad) -> np.ndarray:
    """Rows r0:r1 of ``out`` from rows 0:r1-r0 of ``a`` (float16/float32) and ``b`` (float32), whose
    rows must be contiguous; ``ref``/``base_top`` are indexed from r0. Returns the bad-row flags."""
    lib.ggk_kld_rows(*_row_args(r1 - r0, a, b, ref, base_top, out, bad, r0), scratch.ctypes.data)
    return bad[r0:r1]


def _rows_ok(x, dtypes) -> bool:
    """An ndarray whose rows the kernel can read in place."""
    return (isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype in dtypes and x.strides[1] == x.itemsize
            and x.strides[0] % x.itemsize == 0 and x.strides[0] >= 0 and x.flags.aligned)


def compare(load_base, b_all, ref, base_top, out, *, threads: int, block_elements: int) -> None:
    """Fill ``out`` (kld, same_top, and with ``ref`` delta_p / nll_base / nll_cand) for all rows,
    as ``metrics.kld.compare_rows``' numpy kernel does; arguments already checked by it."""
    from ggufopt_ray.metrics.kld import rows_per_block

    lib = library()
    n, v = b_all.shape
    if v < 1:
        raise ValueError("rows of an empty vocabulary have no distribution to compare")
    if base_top is not None:
        base_top = np.ascontiguousarray(base_top, np.int64)
        if base_top.shape[0] != n or (n and (base_top.min() < 0 or base_top.max() >= v)):
            raise ValueError(f"base_top must hold {n} token ids in [0, {v})")
    if ref is not None:
        ref = np.ascontiguousarray(ref, np.int64)
    direct_a = getattr(load_base, "rows", None)
    if not _rows_ok(direct_a, (np.float16, np.float32)):
        direct_a = None
    direct_b = _rows_ok(b_all, (np.float32,))
    bad = np.zeros(n, np.uint8)
    if direct_a is not None and direct_b:
        # both sides readable in place: the threads take rows from a counter inside the kernel
        _call_shared(lib, direct_a, b_all, ref, base_top, out, bad, min(check_threads(threads), n),
                     max(1, SHARED_STEP_ELEMENTS // v))
    else:
        step = rows_per_block(v, block_elements)

        def work(blocks) -> None:
            rows = min(step, n)
            scratch = _scratch(v)
            abuf = np.empty((rows, v), np.float32) if direct_a is None else None
            bbuf = None if direct_b else np.empty((rows, v), np.float32)
            for r0, r1 in blocks:
                if direct_a is not None:
                    a = direct_a[r0:r1]
                else:
                    a = np.asarray(load_base(r0, r1, abuf[: r1 - r0]))
                    if not _rows_ok(a, (np.float16, np.float32)):
                        a = np.ascontiguousarray(a, np.float32)
                if direct_b:
                    b = b_all[r0:r1]
                else:
                    b = bbuf[: r1 - r0]
                    np.copyto(b, np.asarray(b_all[r0:r1]), casting="unsafe")
                _call(lib, a, b, ref, base_top, out, r0, r1, scratch, bad)

        run_row_blocks(n, step, threads, work)
    if bad.any():
        _redo_float64(np.flatnonzero(bad), load_base, direct_a, b_all, ref, out)


def _call_shared(lib, a, b, ref, base_top, out, bad, workers: int, step: int) -> None:
    """All rows of ``a`` and ``b`` (contiguous rows, read in place) on ``workers`` threads: each
    makes one foreign call that takes ``step`` rows at a time from a shared counter until none
    are left."""
    n, v = b.shape
    counter = np.zeros(1, np.int64)
    args = _row_args(n, a, b, ref, base_top, out, bad, 0)

    def one_worker() -> None:
        scratch = _scratch(v)  # held here: the kernel writes into it during the call
        lib.ggk_kld_rows_shared(*args, scratch.ctypes.data, counter.ctypes.data, step)

    run_on_workers(workers, one_worker)


def _redo_float64(rows: np.ndarray, load_base, direct_a, b_all, ref, out) -> None:
    """Rows the kernel flagged (a non-finite value, or an overflow): plain float64, as the numpy
    kernel's fallback does (same_top is already set)."""
    from ggufopt_ray.metrics.kld import _rows_float64

    v = b_all.shape[1]
    for r in rows:
        r = int(r)
        a = direct_a[r:r + 1] if direct_a is not None else np.asarray(load_base(r, r + 1, np.empty((1, v), np.float32)))
        a = np.asarray(a, np.float32)
        b = np.asarray(b_all[r:r + 1], np.float32)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            k64, la, lb = _rows_float64(a, b)
            out["kld"][r] = k64[0]
            if ref is not None:
                tok = int(ref[r])
                nll_b = la[0] - np.float64(a[0, tok])
                nll_c = lb[0] - np.float64(b[0, tok])
                out["nll_base"][r] = nll_b
                out["nll_cand"][r] = nll_c
                out["delta_p"][r] = np.exp(-nll_c) - np.exp(-nll_b)


# ----------------------------------------------------------------------------- the compact encoder

def _load_compact(path: Path):
    lib = open_library(path, "ggc_abi", COMPACT_ABI)
    lib.ggc_n_consts.restype = ctypes.c_int
    if lib.ggc_n_consts() != len(_compact_consts()):
        raise RuntimeError(f"{path} expects {lib.ggc_n_consts()} constants, not {len(_compact_consts())}")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ggc_scratch_bytes.restype = i64
    lib.ggc_scratch_bytes.argtypes = [i64, i64]
    lib.ggc_compact_rows.restype = i64
    lib.ggc_compact_rows.argtypes = [i64, i64, p, i64, i64, i64, p, p, p, p, p, ctypes.c_int, p,
                                     p, p, p, p, p, p, p, p]
    _compact_self_test(lib)
    return lib


_consts: list = []


def _compact_consts() -> np.ndarray:
    """The encoder's constants, from encodings.py itself (the same doubles on both sides)."""
    if not _consts:
        from ggufopt_ray.metrics import encodings as enc

        _consts.append(np.array((enc._LOG2E, enc._LN2_HI, enc._LN2_LO) + enc._EXP_COEFS + tuple(enc.COMPACT_LEVELS)
                                + tuple(enc._LEVEL_MIDS), np.float64))
    return _consts[0]


def _compact_self_test(lib) -> None:
    """A few rows against the numpy encoder, which the library must reproduce exactly."""
    from ggufopt_ray.metrics.encodings import CompactEncoding
    from ggufopt_ray.metrics.kld import log_softmax

    rng = np.random.default_rng(0)
    v = 1000
    x = log_softmax((3 * rng.standard_normal((3, v))).astype(np.float32))
    x[1, ::7] = x[1, 3]  # ties
    ref = rng.integers(0, v, 3)
    enc = CompactEncoding()
    want = enc.encode(x, ref, threads=1, native=False)
    got = enc.encode(x, ref, threads=1, native=_CompactEncoder(lib))
    for name, arr in want.items():
        if not np.array_equal(arr, got[name]):
            raise RuntimeError(f"self-test failed: the compiled compact encoder's {name} differs from numpy's")


class _CompactEncoder:
    """``encode(xb, ref, out, r0, r1, t_top, k)``: fills rows r0:r1 of ``out`` (all but
    xent_correction) from the float32 rows ``xb`` and returns their decoded rows (a per-thread
    buffer, valid until the thread's next call)."""

    def __init__(self, lib):
        self.lib = lib
        self._local = threading.local()

    def _buffer(self, name: str, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, name, None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, 64), np.uint8)
            setattr(self._local, name, buf)
        return buf

    def __call__(self, xb, ref, out, r0, r1, t_top, k) -> np.ndarray:
        xb = np.ascontiguousarray(xb, np.float32)
        n, v = xb.shape
        for name in ("codes", "mid", "top_ids", "top_codes"):
            if not out[name].flags.c_contiguous:
                raise ValueError(f"compact encoder output {name} must be C-contiguous")
        scratch = self._buffer("scratch", int(self.lib.ggc_scratch_bytes(v, k)))
        dec = self._buffer("dec", n * v * 4)[: n * v * 4].view(np.float32).reshape(n, v)
        if ref is not None:
            ref = np.ascontiguousarray(ref[r0:r1], np.int64)
        ids = out["top_ids"]
        rc = self.lib.ggc_compact_rows(
            n, v, xb.ctypes.data, v, k, t_top, _compact_consts().ctypes.data,
            None if ref is None else ref.ctypes.data,
            _ptr(out["codes"], r0), _ptr(out["mid"], r0), _ptr(ids, r0), ids.itemsize, _ptr(out["top_codes"], r0),
            _ptr(out["row_max"], r0), _ptr(out["mid_floor"], r0), _ptr(out["anchor"], r0),
            _ptr(out["tilt_a"], r0), _ptr(out["tilt_b"], r0),
            None if ref is None else _ptr(out["ref_logprob"], r0), dec.ctypes.data, scratch.ctypes.data)
        if rc != 0:
            raise RuntimeError(f"compiled compact encoder failed on rows {r0}:{r1} (V={v}, K={k}, T={t_top})")
        return dec


_encoders: dict = {}


def compact_encoder():
    """The compiled compact encoder (see ``_CompactEncoder``) when selected and available, else None
    (``CompactEncoding`` then encodes with numpy). ``GGUFOPT_KLD_KERNEL`` selects, as for the KLD
    kernel: numpy forces numpy, native fails without it, auto falls back with one warning."""
    lib = _selected("compact", "compiled compact encoder", "encoding with numpy")
    if lib is None:
        return None
    enc = _encoders.get(id(lib))
    if enc is None:
        enc = _encoders[id(lib)] = _CompactEncoder(lib)
    return enc


register_kind("kld", SOURCE, FLAGS, _load)
register_kind("compact", COMPACT_SOURCE, COMPACT_FLAGS, _load_compact)
