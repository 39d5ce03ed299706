"""A fast reader of a GGUF file's header: every metadata key/value and every tensor info.

gguf-py's ``GGUFReader`` turns each element of each array field into its own numpy object while
it opens a file; with a 128k-token vocabulary (tokens plus merges) that alone takes tens of
seconds, and this package opens model headers in every sweep, worker, trial and CLI call. This
reader walks the header once over an ``mmap`` with ``struct``: numeric arrays are not touched
until asked for (then one ``numpy.frombuffer``), string arrays are only skipped (8-byte length
prefixes) while opening and decoded on demand, and tensor data are zero-copy numpy views made on
first access. Opening a 262,144-token model costs well under a second.

Written from the GGUF format specification (ggml's ``docs/gguf.md``), versions 2 and 3, which
share one layout: magic ``GGUF``, u32 version, u64 tensor count, u64 KV count, the KV pairs
(u64-length strings, u32 value types, arrays as u32 item type + u64 count + items), the tensor
infos (name, u32 n_dims, u64 dims in ggml order, u32 ggml type, u64 offset relative to the data
section), padding to ``general.alignment`` (default 32), then the tensor data. Only
little-endian files are read; a big-endian one is refused with a clear message.

The objects answer the attributes this package used on gguf-py's reader (``fields[key].contents()``,
``.parts``, ``.types``, ``tensors[i].name/.shape/.tensor_type/.n_elements/.n_bytes/.data_offset/
.data/.field``, ``alignment``, ``byte_order``, ``endianess``), so callers did not have to change.
One deliberate difference: an array of arrays comes back nested (gguf-py flattens it); llama.cpp
itself refuses such fields, so no model file has them. ``shape`` is a tuple of ints, not an array.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import re
import struct
from array import array
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ggufopt_ray.errors import UserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"


class ValueType(IntEnum):
    """GGUF metadata value types; names and numbers as in the spec (and gguf.GGUFValueType)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format, numpy dtype (little-endian) of each fixed-size value type.
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    ValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    ValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    ValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    ValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    ValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    ValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    ValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    ValueType.BOOL: (struct.Struct("<?"), np.dtype("?")),
    ValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    ValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    ValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_ESCAPED = re.compile("[\udc80-\udcfe]")  # what surrogateescape makes of invalid UTF-8 bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml types whose data gguf-py (and so this reader) shows as typed elements; every other type
# is shown as bytes, the last dimension in bytes per row.
_ELEMENT_DTYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32,
                   27: np.int64, 28: np.float64}


class _Damaged(Exception):
    """What is wrong with the header, without the path (the caller adds it)."""


@functools.lru_cache(maxsize=1)
def ggml_type_sizes() -> dict[int, tuple[int, int]]:
    """``{ggml type id: (block size in elements, bytes per block)}`` from the gguf package.

    Taken from gguf rather than copied so that types added to ggml are known as soon as the
    installed gguf knows them (tests compare a few with the block layouts ggml documents).
    """
    import gguf

    return {int(k): (int(b), int(s)) for k, (b, s) in gguf.GGML_QUANT_SIZES.items()}


@dataclass
class Field:
    """One metadata key/value (or one of the ``GGUF.*`` pseudo-fields of the fixed header).

    ``offset``/``end``: the record's bytes in the file (from the key's length prefix to the end
    of the value), which is what ``parts`` returns for callers that copy records verbatim.
    Values are decoded on the first ``contents()`` call and cached.
    """

    name: str
    offset: int
    end: int
    types: list  # [ValueType, ...]: [STRING], [ARRAY, UINT32], [ARRAY, ARRAY, STRING], ...
    count: int  # array length; 1 for a scalar
    value_offset: int  # where the value (for arrays: the first item) starts
    _header: "GGUFHeader" = field(repr=False, compare=False)
    _offsets: array | None = field(default=None, repr=False, compare=False)  # string arrays: item offsets
    _value: Any = field(default=None, repr=False, compare=False)
    _decoded: bool = field(default=False, repr=False, compare=False)

    def contents(self) -> Any:
        """The value as Python objects: int/float/bool/str, or a list of them for an array."""
        if not self._decoded:
            self._value = self._header._decode(self)
            self._decoded = True
        return self._value

    def joined_bytes(self, sep: bytes = b"\x00") -> bytes:
        """A string array's raw items, each preceded by the one byte ``sep``, in one ``bytes``.

        Hashing this is hashing every item without decoding 100k+ strings into Python objects
        (the vocabulary fingerprint needs exactly this stream).
        """
        if self._offsets is None:
            raise TypeError(f"{self.name} is not an array of strings")
        return self._header._joined(self._offsets, self.end, sep)

    @property
    def parts(self) -> list[np.ndarray]:
        """The record's raw bytes as one uint8 view (gguf-py splits them into several parts)."""
        return [self._header._bytes(self.offset, self.end)]

    @property
    def data(self) -> range:
        """One index per value; only its length is meaningful (gguf-py's ``ReaderField.data``)."""
        return range(self.count)


@dataclass
class TensorInfo:
    """One tensor info record plus what follows from it (element count, bytes, absolute offset)."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne0)
    type_id: int  # ggml type
    data_offset: int  # absolute offset of the data in the file
    n_elements: int
    n_bytes: int
    info_offset: int  # the tensor info record's bytes in the file
    info_end: int
    _header: "GGUFHeader" = field(repr=False, compare=False)
    _data: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def tensor_type(self):
        """The type as ``gguf.GGMLQuantizationType`` (``.name`` like ``Q4_K``, int value)."""
        import gguf

        return gguf.GGMLQuantizationType(self.type_id)

    @property
    def data(self) -> np.ndarray:
        """A read-only zero-copy view of the data, shaped as gguf-py shapes it (numpy order)."""
        if self._data is None:
            self._data = self._header._tensor_view(self)
        return self._data

    @property
    def field(self) -> Field:
        """The info record as a field (``offset``, ``parts``), as gguf-py's ``ReaderTensor.field``."""
        return Field(self.name, self.info_offset, self.info_end, [], 1, self.info_offset, self._header)

    def _replace(self, **changes) -> "TensorInfo":
        """A copy with some attributes changed (``data=`` replaces the data), like a NamedTuple's."""
        if "data" in changes:
            changes["_data"] = changes.pop("data")
        return dataclasses.replace(self, **changes)


class GGUFHeader:
    """A parsed GGUF header over a read-only ``mmap`` of the file (kept open for lazy values).

    ``fields``: ordered ``{key: Field}``, the ``GGUF.version``/``GGUF.tensor_count``/
    ``GGUF.kv_count`` pseudo-fields first (as gguf-py has them), then the KV pairs in file order.
    ``tensors``: ``TensorInfo`` in file order. ``data_offset``: start of the tensor data section.
    """

    byte_order = "I"  # gguf-py: "I" = same byte order as the (little-endian) host

    def __init__(self, path: Path, mm: mmap.mmap):
        self.path = path
        self._mm = mm
        self.file_size = len(mm)
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.fields: dict[str, Field] = {}
        self.tensors: list[TensorInfo] = []

    @property
    def endianess(self):
        import gguf

        return gguf.GGUFEndian.LITTLE

    def get(self, key: str, default=None) -> Any:
        """The value of ``key``, or ``default`` when the file has no such key."""
        f = self.fields.get(key)
        return default if f is None else f.contents()

    # -- lazy access ---------------------------------------------------------------------------
    def _bytes(self, start: int, end: int) -> np.ndarray:
        return np.frombuffer(self._mm, dtype=np.uint8, count=end - start, offset=start)

    def _tensor_view(self, t: TensorInfo) -> np.ndarray:
        np_shape = tuple(reversed(t.shape))
        dtype = _ELEMENT_DTYPES.get(t.type_id)
        if dtype is not None:
            return np.frombuffer(self._mm, dtype=dtype, count=t.n_elements, offset=t.data_offset).reshape(np_shape)
        block, size = ggml_type_sizes()[t.type_id]
        byte_shape = (*np_shape[:-1], np_shape[-1] // block * size) if np_shape else (t.n_bytes,)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset).reshape(byte_shape)

    def _joined(self, offsets: array, end: int, sep: bytes) -> bytes:
        """The strings whose length prefixes are at ``offsets`` (the last ends at ``end``),
        each 8-byte prefix replaced by ``sep``: vectorized, no per-string Python work."""
        if len(sep) != 1:
            raise ValueError("sep must be one byte")
        if not offsets:
            return b""
        start = offsets[0]
        region = np.frombuffer(self._mm, dtype=np.uint8, count=end - start, offset=start).copy()
        prefixes = np.frombuffer(offsets, dtype=np.int64) - start
        keep = np.ones(region.size, dtype=bool)
        keep[(prefixes[:, None] + np.arange(7)).ravel()] = False
        region[prefixes + 7] = sep[0]
        return region[keep].tobytes()

    def _string_items(self, f: Field) -> list[str]:
        """A string array decoded strictly as UTF-8, fast: one decode of all items joined by a
        0xFF byte (which valid UTF-8 never contains), split on it. Any invalid item shows up as
        an escaped surrogate or an extra piece, and then the per-item decoder reports it."""
        text = self._joined(f._offsets, f.end, b"\xff").decode("utf-8", "surrogateescape")
        if _ESCAPED.search(text) is None:
            pieces = text.split("\udcff")
            if len(pieces) == f.count + 1:
                return pieces[1:]
        return self._decode_array(ValueType.STRING, f.count, f.value_offset)[0]

    def _decode(self, f: Field) -> Any:
        if not f.types:  # a tensor info record seen as a field has no value
            return None
        try:
            if f._offsets is not None:
                return self._string_items(f)
            if f.types[0] == ValueType.ARRAY:
                return self._decode_array(f.types[1] if len(f.types) > 1 else None, f.count, f.value_offset)[0]
            return self._decode_scalar(f.types[0], f.value_offset)[0]
        except UnicodeDecodeError as exc:
            raise UserError(f"{self.path}: metadata {f.name} holds text that is not valid UTF-8 "
                            f"({exc.reason}); the file is damaged, re-create or re-download it") from None

    def _decode_scalar(self, vtype: int, pos: int) -> tuple[Any, int]:
        """(value, end) of the string or fixed-size value at ``pos``."""
        mm = self._mm
        if vtype == ValueType.STRING:
            n = _U64.unpack_from(mm, pos)[0]
            return str(mm[pos + 8:pos + 8 + n], "utf-8"), pos + 8 + n
        st = _SCALARS[vtype][0]
        return st.unpack_from(mm, pos)[0], pos + st.size

    def _decode_array(self, item: int | None, count: int, pos: int) -> tuple[list, int]:
        """(list, end) of ``count`` items of type ``item`` starting at ``pos``."""
        mm = self._mm
        if item is None or count == 0:
            return [], pos
        if item == ValueType.STRING:
            out, unpack = [], _U64.unpack_from
            for _ in range(count):
                n = unpack(mm, pos)[0]
                out.append(str(mm[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
            return out, pos
        if item == ValueType.ARRAY:  # nested: each inner array carries its own item type and count
            out = []
            for _ in range(count):
                inner_item, inner_count = _U32.unpack_from(mm, pos)[0], _U64.unpack_from(mm, pos + 4)[0]
                value, pos = self._decode_array(inner_item, inner_count, pos + 12)
                out.append(value)
            return out, pos
        dtype = _SCALARS[item][1]
        return np.frombuffer(mm, dtype=dtype, count=count, offset=pos).tolist(), pos + count * dtype.itemsize


# -- parsing ---------------------------------------------------------------------------------------
class _Parser:
    """One pass over the header; every read is bounds-checked against the file size."""

    def __init__(self, mm: mmap.mmap):
        self.mm = mm
        self.size = len(mm)

    def need(self, pos: int, n: int, what: str) -> None:
        if n < 0 or pos + n > self.size:
            raise _Damaged(f"{what} at byte {pos} runs past the end of the file ({self.size} bytes)")

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return _U32.unpack_from(self.mm, pos)[0]

    def u64(self, pos: int, what: str) -> int:
        self.need(pos, 8, what)
        return _U64.unpack_from(self.mm, pos)[0]

    def string(self, pos: int, what: str) -> tuple[str, int]:
        n = self.u64(pos, what)
        self.need(pos + 8, n, what)
        try:
            return str(self.mm[pos + 8:pos + 8 + n], "utf-8"), pos + 8 + n
        except UnicodeDecodeError:
            raise _Damaged(f"{what} at byte {pos} is not valid UTF-8") from None

    def value_type(self, pos: int, what: str) -> ValueType:
        raw = self.u32(pos, what)
        try:
            return ValueType(raw)
        except ValueError:
            raise _Damaged(f"{what} at byte {pos} has unknown value type {raw}") from None

    def skip_value(self, vtype: ValueType, pos: int, what: str) -> tuple[int, list, int, array | None]:
        """(end, types, count, item offsets of a string array) of a value at ``pos``, not decoded."""
        if vtype == ValueType.STRING:
            n = self.u64(pos, what)
            self.need(pos + 8, n, what)
            return pos + 8 + n, [vtype], 1, None
        if vtype != ValueType.ARRAY:
            size = _SCALARS[vtype][0].size
            self.need(pos, size, what)
            return pos + size, [vtype], 1, None
        item = self.value_type(pos, what + " (array item type)")
        count = self.u64(pos + 4, what + " (array length)")
        pos += 12
        if item == ValueType.STRING:
            self.need(pos, 8 * count, what)  # every string has at least its 8-byte length
            mm, unpack, size = self.mm, _U64.unpack_from, self.size
            offsets = array("q")
            add = offsets.append
            try:
                for _ in range(count):  # the one per-item Python loop: lengths chain the offsets
                    add(pos)
                    pos += 8 + unpack(mm, pos)[0]
            except (struct.error, OverflowError):
                pos = size + 1
            if pos > size:
                raise _Damaged(f"{what} (array of {count} strings) runs past the end of the file ({size} bytes)")
            return pos, [ValueType.ARRAY, item], count, offsets
        if item == ValueType.ARRAY:
            self.need(pos, 12 * count, what)
            inner_types = [ValueType.ARRAY]
            for _ in range(count):
                pos, inner_types, _n, _offsets = self.skip_value(ValueType.ARRAY, pos, what)
            return pos, [ValueType.ARRAY, *inner_types], count, None
        size = _SCALARS[item][0].size
        self.need(pos, size * count, what)
        return pos + size * count, [ValueType.ARRAY, item], count, None


def _parse(header: GGUFHeader) -> None:
    p = _Parser(header._mm)
    p.need(0, 24, "the fixed header")
    if header._mm[:4] != GGUF_MAGIC:
        raise _Damaged("it does not start with the GGUF magic")
    version = p.u32(4, "version")
    if version & 0xFFFF == 0 and version != 0:
        raise UserError(f"{header.path} is a big-endian GGUF file; only little-endian files are supported "
                        "(convert it with gguf-py's gguf_convert_endian.py)")
    if version not in SUPPORTED_VERSIONS:
        raise UserError(f"{header.path} is GGUF version {version}; only versions 2 and 3 are supported "
                        "(re-convert it with a current llama.cpp)")
    header.version = version
    n_tensors, n_kv = p.u64(8, "tensor count"), p.u64(16, "KV count")
    fields = header.fields
    fields["GGUF.version"] = Field("GGUF.version", 4, 8, [ValueType.UINT32], 1, 4, header)
    fields["GGUF.tensor_count"] = Field("GGUF.tensor_count", 8, 16, [ValueType.UINT64], 1, 8, header)
    fields["GGUF.kv_count"] = Field("GGUF.kv_count", 16, 24, [ValueType.UINT64], 1, 16, header)
    p.need(24, 13 * n_kv + 24 * n_tensors, "the KV pairs and tensor infos")  # smallest possible records

    pos = 24
    for k in range(n_kv):
        start = pos
        key, pos = p.string(pos, f"key of KV pair {k}")
        vtype = p.value_type(pos, f"type of {key}")
        end, types, count, offsets = p.skip_value(vtype, pos + 4, f"value of {key}")
        value_offset = pos + 4 + (12 if vtype == ValueType.ARRAY else 0)
        if key in fields:
            raise _Damaged(f"key {key} appears twice")
        fields[key] = Field(key, start, end, types, count, value_offset, header, offsets)
        pos = end

    infos = []
    for k in range(n_tensors):
        start = pos
        name, pos = p.string(pos, f"name of tensor info {k}")
        n_dims = p.u32(pos, f"n_dims of tensor {name}")
        p.need(pos + 4, 8 * n_dims + 12, f"tensor info of {name}")
        dims = struct.unpack_from(f"<{n_dims}Q", header._mm, pos + 4)
        pos += 4 + 8 * n_dims
        type_id, rel_offset = _U32.unpack_from(header._mm, pos)[0], _U64.unpack_from(header._mm, pos + 4)[0]
        pos += 12
        infos.append((name, dims, type_id, rel_offset, start, pos))

    align_field = fields.get(ALIGNMENT_KEY)
    if align_field is not None:
        if align_field.types != [ValueType.UINT32]:
            raise _Damaged(f"{ALIGNMENT_KEY} is not a uint32")
        align = align_field.contents()
        if align == 0 or align & (align - 1):
            raise _Damaged(f"{ALIGNMENT_KEY} = {align} is not a power of two")
        header.alignment = align
    header.data_offset = -(-pos // header.alignment) * header.alignment

    sizes = ggml_type_sizes()
    names = set()
    for name, dims, type_id, rel_offset, start, end in infos:
        if name in names:
            raise _Damaged(f"tensor {name} appears twice")
        names.add(name)
        if type_id not in sizes:
            raise _Damaged(f"tensor {name} has ggml type {type_id}, which the installed gguf package does not "
                           "know (update gguf / llama.cpp)")
        block, type_size = sizes[type_id]
        if dims and dims[0] % block:
            raise _Damaged(f"tensor {name} has rows of {dims[0]} elements, not a multiple of its type's block "
                           f"size {block}")
        n_elements = math.prod(dims)
        n_bytes = n_elements * type_size // block
        data_offset = header.data_offset + rel_offset
        if data_offset + n_bytes > header.file_size:
            raise UserError(f"{header.path} is truncated (tensor {name} runs past the end of the file); "
                            "re-create or re-download it")
        header.tensors.append(TensorInfo(name, tuple(dims), type_id, data_offset, n_elements, n_bytes,
                                         start, end, header))


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path``; a damaged or truncated file is a UserError.

    The file stays mapped (read-only) as long as the header or any tensor view is alive.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < 4:
                raise UserError(f"{path} is not a GGUF file ({size} bytes); re-create or re-download it")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    header = GGUFHeader(path, mm)
    try:
        _parse(header)
    except _Damaged as exc:
        raise UserError(f"{path} is damaged or truncated ({exc}); re-create or re-download it") from None
    return header
