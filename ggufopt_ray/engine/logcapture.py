"""Capture llama.cpp's log text while one call runs.

Some llama.cpp results exist only as log lines: ``llama_model_quantize`` returns 0 or 1, and the
reason for a failure, the per-tensor types a dry run chose and the sizes it computed are printed
through the log callback. This module swaps in a collecting callback for the duration of a call
and restores the project's quiet callback (``engine.native``) afterwards. Captured text is still
echoed to stderr when the process runs verbose, so ``verbose=true`` keeps showing everything.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from ggufopt_ray.engine import native

_capture_lock = threading.Lock()


@contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Yield a list that receives every llama.cpp/ggml log fragment emitted inside the block.

    Captures are serialised (one at a time per process) because the log callback is global.
    Fragments are appended as llama.cpp emits them; join them and split on newlines to get lines.
    """
    native.ensure_backend()
    lib = native.llama()
    fragments: list[str] = []

    @lib.llama_log_callback
    def _collect(level, text, user_data):  # noqa: ARG001 - signature fixed by llama.cpp
        try:
            s = text.decode("utf-8", "replace")
            fragments.append(s)
            if native._verbose:
                sys.stderr.write(s)
        except Exception:  # never raise inside native code
            pass

    with _capture_lock:
        lib.llama_log_set(_collect, ctypes.c_void_p(0))
        try:
            yield fragments
        finally:
            # back to the project-wide callback (quiet unless verbose)
            lib.llama_log_set(native._log_callback, ctypes.c_void_p(0))


def log_lines(fragments: list[str]) -> list[str]:
    """The captured fragments as whole lines."""
    return "".join(fragments).splitlines()
