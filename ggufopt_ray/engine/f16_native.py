"""The compiled log-softmax and float16 baseline encoder (``f16_kernel.c``), loaded with ctypes.

``metrics.kld.log_softmax`` and ``Float16Encoding`` ask for them (lazily, so the metrics stay
numpy-only) and fall back to their numpy code when they are not selected or cannot be built.
Built, cached and selected like the KLD kernel (``kld_native``: the system C compiler,
``GGUFOPT_KLD_KERNEL=auto|native|numpy``); checked on load against float64 and numpy.

The two compiled functions share their normalizer code, so the float16 codes encoded from logits
are exactly float16 of the compiled log-softmax, as the numpy pair's are of each other. Between
the compiled and the numpy path log-probs may differ in the last float32 bit (a different
exponential and summation order; numpy's own float32 exponential differs between CPUs too), so a
baseline store's codes can differ in rare entries between a machine with a C compiler and one
without; every statistic agrees to float32 rounding.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from ggufopt_ray.engine import kld_native
from ggufopt_ray.metrics.kld import rows_per_block
from ggufopt_ray.metrics.row_blocks import run_row_blocks

SOURCE = Path(__file__).with_name("f16_kernel.c")
ABI = 1

_local = threading.local()


def _load(path: Path):
    lib = kld_native.open_library(path, "ggf_abi", ABI)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ggf_log_softmax_rows.restype = None
    lib.ggf_log_softmax_rows.argtypes = [i64, i64, p, i64, p, i64]
    lib.ggf_f16_encode_rows.restype = i64
    lib.ggf_f16_encode_rows.argtypes = [i64, i64, p, i64, ctypes.c_int, p, p, i64, p, p, p, p, p]
    _self_test(lib)
    return lib


kld_native.register_kind("f16", SOURCE, kld_native.FLAGS, _load)


def _self_test(lib) -> None:
    """A few rows against float64: the log-softmax within float32 rounding, the codes exactly
    float16 of it, the correction and the reference log-prob as the definitions give them."""
    from scipy.special import log_softmax as log_softmax64

    rng = np.random.default_rng(0)
    for v in (1, 13, 1000):
        x = (3 * rng.standard_normal((3, v))).astype(np.float32)
        ref = rng.integers(0, v, 3)
        lp = np.empty_like(x)
        _log_softmax_call(lib, x, lp)
        want = log_softmax64(x.astype(np.float64), axis=1)
        if not np.allclose(lp, want, rtol=1e-6, atol=2e-6):
            raise RuntimeError(f"self-test failed at V={v}: log-softmax {lp[0, :3]} vs {want[0, :3]}")
        out = _encode_call(lib, x, ref, True)
        if out is None or not np.array_equal(out["logprobs"], lp.astype(np.float16)):
            raise RuntimeError(f"self-test failed at V={v}: float16 codes")
        lq = log_softmax64(out["logprobs"].astype(np.float64), axis=1)
        corr = (np.exp(lq) * (want - lq)).sum(axis=1)
        if not np.allclose(out["xent_correction"], corr, rtol=1e-4, atol=1e-9):
            raise RuntimeError(f"self-test failed at V={v}: correction {out['xent_correction']} vs {corr}")
        if not np.allclose(out["ref_logprob"], want[np.arange(3), ref], rtol=1e-6, atol=2e-6):
            raise RuntimeError(f"self-test failed at V={v}: reference log-prob")


def _library():
    return kld_native._selected("f16", "compiled log-softmax/float16 encoder", "using numpy")


def _scratch(v: int) -> np.ndarray:
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.shape[0] < v + 8:
        buf = _local.scratch = np.empty(v + 8, np.float32)
    return buf


def _f32_rows(x) -> bool:
    return kld_native._rows_ok(x, (np.float32,))


def _log_softmax_call(lib, x: np.ndarray, out: np.ndarray) -> None:
    n, v = x.shape
    lib.ggf_log_softmax_rows(n, v, x.ctypes.data, x.strides[0] // 4, out.ctypes.data, out.strides[0] // 4)


def log_softmax(x: np.ndarray, out: np.ndarray) -> bool:
    """``out`` = the row-wise log-softmax of float32 rows ``x`` (``out`` may be ``x``), by the
    compiled kernel; False (nothing written) when it is not selected or available, or the arrays
    are not float32 rows it can read in place."""
    if x.shape[1] < 1 or not (_f32_rows(x) and _f32_rows(out)):
        return False
    lib = _library()
    if lib is None:
        return False
    _log_softmax_call(lib, x, out)
    return True


def _outputs(n: int, v: int, with_ref: bool) -> dict:
    """The arrays of an encoding of n rows (top_id as int64, as the kernel writes it)."""
    out = {"logprobs": np.empty((n, v), np.float16), "xent_correction": np.empty(n, np.float32),
           "top_id": np.empty(n, np.int64)}
    if with_ref:
        out["ref_logprob"] = np.empty(n, np.float32)
    return out


def _encode_call(lib, x, ref, from_logits: bool, out=None, r0: int = 0):
    """Rows of ``x`` into rows r0: of ``out`` (allocated when None); returns ``out``, or None when
    a row is bad (non-finite logits, or log-probs float16 cannot hold)."""
    n, v = x.shape
    if out is None:
        out = _outputs(n, v, ref is not None)
    codes, top = out["logprobs"], out["top_id"]
    ref_ptr = None
    if ref is not None:  # the reference tokens of these rows
        ref = np.ascontiguousarray(ref, np.int64)
        ref_ptr = ref.ctypes.data
    bad = np.zeros(n, np.uint8)
    n_bad = lib.ggf_f16_encode_rows(
        n, v, x.ctypes.data, x.strides[0] // 4, int(from_logits), ref_ptr,
        kld_native._ptr(codes, r0), codes.strides[0] // 2, kld_native._ptr(out["xent_correction"], r0),
        kld_native._ptr(top, r0), None if ref is None else kld_native._ptr(out["ref_logprob"], r0),
        bad.ctypes.data, _scratch(v).ctypes.data)
    return None if n_bad else out


def float16_encoder():
    """``encode(rows, ref, from_logits, threads)`` by the compiled kernel when it is selected and
    available, else None. ``encode`` returns the arrays of ``Float16Encoding`` (top_id as int64),
    or None when a row is bad (the caller's numpy path then names the row)."""
    lib = _library()
    if lib is None:
        return None

    def encode(rows: np.ndarray, ref, from_logits: bool, threads: int):
        if not _f32_rows(rows):
            rows = np.ascontiguousarray(rows, np.float32)
        n, v = rows.shape
        out = _outputs(n, v, ref is not None)
        failed = []

        def work(blocks):
            for r0, r1 in blocks:
                rref = None if ref is None else ref[r0:r1]
                if _encode_call(lib, rows[r0:r1], rref, from_logits, out, r0) is None:
                    failed.append(r0)

        run_row_blocks(n, rows_per_block(v, kld_native.DIRECT_BLOCK_ELEMENTS), threads, work)
        return None if failed else out

    return encode
