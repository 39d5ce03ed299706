"""Process-wide llama.cpp state: backend init, quiet logging, model loading, versions.

Every other engine module goes through here so that llama.cpp is initialised once per process,
its log output is silent unless asked for, and a model that fails to load becomes a one-line
``UserError`` rather than a NULL pointer.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ggufopt_ray.errors import UserError
from ggufopt_ray.gguf.inspect import inspect_model

_lock = threading.Lock()
_initialised = False
_verbose = False
_log_callback = None  # keep a reference: llama.cpp holds the raw function pointer
_log_sinks: list[list[str]] = []  # active capture_log() blocks
_capture_lock = threading.Lock()


def llama():
    """The ``llama_cpp`` module, imported on first use (it takes ~0.3 s and loads native code)."""
    import llama_cpp

    return llama_cpp


def _make_log_callback(lib):
    @lib.llama_log_callback
    def _callback(level, text, user_data):  # noqa: ARG001 - signature fixed by llama.cpp
        try:
            s = text.decode("utf-8", "replace")
            for sink in _log_sinks:
                sink.append(s)
            if _verbose:
                sys.stderr.write(s)
        except Exception:  # never let a log line raise inside native code
            pass

    return _callback


@contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log text emitted inside the block (still echoed when verbose).

    Some results exist only as log lines: ``llama_model_quantize`` returns 0 or 1, and the reason
    of a failure or the per-tensor plan of a dry run are printed through the log. Captures are
    serialised because the log is process-global.
    """
    ensure_backend()
    sink: list[str] = []
    with _capture_lock:
        _log_sinks.append(sink)
        try:
            yield sink
        finally:
            _log_sinks.remove(sink)


def log_lines(fragments: list[str]) -> list[str]:
    """Captured fragments as whole lines."""
    return "".join(fragments).splitlines()


def set_verbose(verbose: bool) -> None:
    """Show (True) or hide (False) llama.cpp's own log lines for this process."""
    global _verbose
    ensure_backend()
    _verbose = bool(verbose)


def ensure_backend() -> None:
    global _initialised, _log_callback
    with _lock:
        if _initialised:
            return
        lib = llama()
        _log_callback = _make_log_callback(lib)
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lib.llama_backend_init()
        _initialised = True


def load_model(path: str | Path, n_gpu_layers: int = 0, use_mmap: bool = True, vocab_only: bool = False):
    """Load a GGUF model and return the raw ``llama_model*``; caller frees with ``free_model``."""
    # Reading the header and tensor table first turns a damaged or truncated file into a clear
    # message instead of whatever llama.cpp does with it.
    inspect_model(path)
    path = Path(path)
    ensure_backend()
    lib = llama()
    params = lib.llama_model_default_params()
    # On a CPU-only build llama.cpp ignores the offload request, so the setting is always safe.
    params.n_gpu_layers = int(n_gpu_layers)
    params.use_mmap = bool(use_mmap)
    params.vocab_only = bool(vocab_only)
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise UserError(f"llama.cpp could not load {path} (damaged, truncated or an unsupported "
                        "architecture); run `ggufopt inspect` on it, or rerun with verbose=true to see why")
    return model


def free_model(model) -> None:
    if model:
        llama().llama_model_free(model)


def versions() -> dict:
    """Versions that go into every result row, so a number can be traced to what produced it."""
    ensure_backend()
    lib = llama()
    return {
        "llama_cpp_python": getattr(lib, "__version__", "unknown"),
        "llama_cpp_system": lib.llama_print_system_info().decode(errors="replace").strip(),
    }


def default_threads() -> int:
    """Physical work threads: all CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
