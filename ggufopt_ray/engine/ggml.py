"""ggml through ctypes: the public ``ggml_tensor`` struct, tensor types and their sizes.

llama-cpp-python binds llama.h but not ggml.h. Two things need ggml directly: the importance-matrix
collector reads tensors handed to llama.cpp's eval callback (a raw ``ggml_tensor *``), and
quantization needs the exact byte size of a row of any ggml type to predict file sizes. Both use
``libggml-base.so`` shipped inside the ``llama_cpp`` package, so the numbers always come from the
same ggml build that llama.cpp runs.

The struct layout follows ggml.h (``GGML_MAX_DIMS`` 4, ``GGML_MAX_OP_PARAMS`` 64 bytes,
``GGML_MAX_SRC`` 10, ``GGML_MAX_NAME`` 64); :func:`lib` checks it against
``ggml_tensor_overhead()`` on first use so that a changed ggml fails loudly, not silently.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_OP_PARAMS = 64
_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + padding

# Types that exist in ggml but are not storage formats one quantizes a weight to.
_NOT_A_WEIGHT_TYPE = {"q8_1", "q8_k", "i8", "i16", "i32", "i64", "f64"}


class ggml_tensor(ctypes.Structure):
    pass


ggml_tensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(ggml_tensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(ggml_tensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

_lock = threading.Lock()
_lib = None
_op_names: dict[int, str] = {}


def lib():
    """``libggml-base.so`` from the llama_cpp package, with the signatures used here."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        import llama_cpp

        path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
        if not path.exists():  # pragma: no cover - depends on how llama-cpp-python was built
            raise RuntimeError(f"{path} not found: this llama-cpp-python build does not ship libggml-base")
        g = ctypes.CDLL(str(path))
        sig = {
            "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
            "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
            "ggml_type_size": (ctypes.c_size_t, [ctypes.c_int]),
            "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
            "ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
            "ggml_nbytes": (ctypes.c_size_t, [ctypes.c_void_p]),
            "ggml_tensor_overhead": (ctypes.c_size_t, []),
            "ggml_backend_buffer_is_host": (ctypes.c_bool, [ctypes.c_void_p]),
            "ggml_backend_tensor_get": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(g, name)
            fn.restype = restype
            fn.argtypes = argtypes
        expected = g.ggml_tensor_overhead() - _GGML_OBJECT_SIZE
        if ctypes.sizeof(ggml_tensor) != expected:  # pragma: no cover - only with a different ggml
            raise RuntimeError(f"ggml_tensor layout mismatch: ctypes struct is {ctypes.sizeof(ggml_tensor)} "
                               f"bytes, this ggml's is {expected}; update ggufopt_ray/engine/ggml.py")
        _lib = g
        return g


# -- tensor types ---------------------------------------------------------------------------------
def type_count() -> int:
    from ggufopt_ray.engine import native

    return int(native.llama().GGML_TYPE_COUNT)


def type_name(type_id: int) -> str:
    """ggml's own name of a type (``q4_K``, ``iq2_xs``, ``f32``)."""
    return lib().ggml_type_name(int(type_id)).decode()


def weight_types() -> dict[str, int]:
    """Upper-case name -> ggml type id, for every type a weight tensor can be stored in."""
    g = lib()
    out = {}
    for i in range(type_count()):
        if g.ggml_blck_size(i) <= 0:  # removed types keep their slot with block size 0
            continue
        name = g.ggml_type_name(i).decode()
        if name.lower() in _NOT_A_WEIGHT_TYPE:
            continue
        out[name.upper()] = i
    return out


def type_id_from_name(name: str) -> int | None:
    """The ggml type id of ``name`` (any case), or None."""
    g = lib()
    for i in range(type_count()):
        if g.ggml_blck_size(i) > 0 and g.ggml_type_name(i).decode().lower() == name.lower():
            return i
    return None


def row_size(type_id: int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values stored as ``type_id``."""
    return int(lib().ggml_row_size(int(type_id), int(n_per_row)))


def tensor_nbytes(type_id: int, ne: list[int] | tuple[int, ...]) -> int:
    """Bytes of a contiguous tensor with ggml shape ``ne`` (ne[0] = row length)."""
    n_rows = 1
    for d in list(ne)[1:]:
        n_rows *= int(d)
    return row_size(type_id, int(ne[0])) * n_rows


# -- tensors seen in the eval callback ---------------------------------------------------------------
def op_name(op: int) -> str:
    """Name of a ggml op (``MUL_MAT``), cached; only call with op values from real tensors."""
    name = _op_names.get(op)
    if name is None:
        name = lib().ggml_op_name(int(op)).decode()
        _op_names[op] = name
    return name


def tensor_name(t: ggml_tensor) -> str:
    return t.name.decode("utf-8", "replace")


def read_tensor(t: ggml_tensor, dtype) -> np.ndarray:
    """The elements of ``t`` as a numpy array in numpy order ``(ne3, ne2, ne1, ne0)``.

    Host tensors are viewed in place (valid only inside the callback: copy what you keep);
    tensors in device memory are copied to the host with ``ggml_backend_tensor_get``.
    Non-contiguous views keep their strides.
    """
    g = lib()
    addr = ctypes.addressof(t)
    nbytes = int(g.ggml_nbytes(addr))
    itemsize = np.dtype(dtype).itemsize
    if int(t.nb[0]) != itemsize:
        raise RuntimeError(f"tensor {tensor_name(t)}: element stride {t.nb[0]} != {itemsize}")
    if t.buffer and not g.ggml_backend_buffer_is_host(t.buffer):
        host = np.empty(nbytes, dtype=np.uint8)
        g.ggml_backend_tensor_get(addr, host.ctypes.data, 0, nbytes)
        base = host
    else:
        base = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(t.data))
    shape = tuple(int(t.ne[i]) for i in range(GGML_MAX_DIMS))[::-1]
    strides = tuple(int(t.nb[i]) for i in range(GGML_MAX_DIMS))[::-1]
    return np.ndarray(shape=shape, dtype=dtype, buffer=base, offset=0, strides=strides)
