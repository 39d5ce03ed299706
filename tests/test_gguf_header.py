"""The fast GGUF header reader against gguf-py's GGUFReader, the reference, on real files.

Every field (value, value types, record bytes and offset) and every tensor info (name, shape,
type, sizes, absolute data offset, data view) must equal what GGUFReader reads from the same
file: the synthetic models (F32, F16), a quantized one made by llama.cpp, a file with every
value type and a custom alignment, a version-2 file, and the trained model when present.
``inspect_model`` must give the same ModelInfo as one computed from GGUFReader, and damaged
files must give one-line UserErrors.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggufopt_ray.errors import UserError
from ggufopt_ray.gguf.header import ValueType, read_header
from ggufopt_ray.gguf.inspect import inspect_model, model_fingerprint, open_reader

TRAINED = Path("/work/shared/models/tinycode-a-f16.gguf")


# -- files -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized_model(tiny_model, tmp_path_factory):
    from ggufopt_ray.engine.quantize import quantize_model

    out = tmp_path_factory.mktemp("hdr") / "tiny-Q4_K_M.gguf"
    return Path(quantize_model(tiny_model, "Q4_K_M", out, threads=1).path)


def _write(path: Path, kv: list, tensors: dict, *, alignment: int | None = None, endian=None) -> Path:
    """A GGUF file written by gguf-py's writer: ``kv`` as (key, value, type, sub_type)."""
    import gguf

    kw = {} if endian is None else {"endianess": endian}
    w = gguf.GGUFWriter(str(path), "llama", **kw)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub in kv:
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, (array, raw) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _every_type_kv() -> list:
    import gguf

    V = gguf.GGUFValueType
    return [
        ("t.u8", 200, V.UINT8, None), ("t.i8", -100, V.INT8, None), ("t.u16", 60000, V.UINT16, None),
        ("t.i16", -30000, V.INT16, None), ("t.u32", 4_000_000_000, V.UINT32, None),
        ("t.i32", -2_000_000_000, V.INT32, None), ("t.f32", 1e-5, V.FLOAT32, None),
        ("t.bool", True, V.BOOL, None), ("t.bool0", False, V.BOOL, None), ("t.str", "héllo ✓", V.STRING, None),
        ("t.empty_str", "", V.STRING, None), ("t.u64", 2**63 + 5, V.UINT64, None),
        ("t.i64", -(2**62), V.INT64, None), ("t.f64", 0.1, V.FLOAT64, None),
        ("t.a_u8", [1, 2, 255], V.ARRAY, V.UINT8), ("t.a_i8", [-1, 2], V.ARRAY, V.INT8),
        ("t.a_u16", [7, 65535], V.ARRAY, V.UINT16), ("t.a_i16", [-7], V.ARRAY, V.INT16),
        ("t.a_u32", [1, 2, 3], V.ARRAY, V.UINT32), ("t.a_i32", [-1, 0, 1], V.ARRAY, V.INT32),
        ("t.a_f32", [0.5, -1.25, 3e38], V.ARRAY, V.FLOAT32), ("t.a_bool", [True, False, True], V.ARRAY, V.BOOL),
        ("t.a_u64", [2**64 - 1], V.ARRAY, V.UINT64), ("t.a_i64", [-(2**63)], V.ARRAY, V.INT64),
        ("t.a_f64", [1.5, -2.5], V.ARRAY, V.FLOAT64),
        ("t.a_str", ["a", "", "\x00nul", "日本語", "<0x0A>"], V.ARRAY, V.STRING),
    ]


@pytest.fixture(scope="module")
def every_type_model(tmp_path_factory):
    """Every value type, a 64-byte alignment, and tensors of typed and block-quantized types."""
    import gguf

    rng = np.random.default_rng(0)
    q8 = rng.integers(0, 255, size=(3, 2 * 34), dtype=np.uint8)  # 3 rows of 64 Q8_0 values
    tensors = {
        "w.f32": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "w.f16": (rng.standard_normal((2, 7)).astype(np.float16), None),
        "w.i32": (np.arange(6, dtype=np.int32).reshape(2, 3), None),
        "w.q8_0": (q8, gguf.GGMLQuantizationType.Q8_0),
        "w.vec": (np.ones(9, dtype=np.float32), None),
    }
    path = tmp_path_factory.mktemp("hdr") / "every-type.gguf"
    return _write(path, _every_type_kv(), tensors, alignment=64)


@pytest.fixture(scope="module")
def v2_model(tiny_model_f16, tmp_path_factory):
    """The f16 tiny model with its version field set to 2 (versions 2 and 3 share one layout)."""
    data = bytearray(Path(tiny_model_f16).read_bytes())
    data[4:8] = (2).to_bytes(4, "little")
    path = tmp_path_factory.mktemp("hdr") / "v2.gguf"
    path.write_bytes(bytes(data))
    return path


# -- comparison with gguf-py -----------------------------------------------------------------------
def _assert_same_as_gguf_py(path) -> None:
    import gguf

    ref = gguf.GGUFReader(str(path))
    ours = read_header(path)
    assert list(ours.fields) == list(ref.fields)
    for key, rf in ref.fields.items():
        f = ours.fields[key]
        assert f.offset == rf.offset, key
        assert b"".join(p.tobytes() for p in f.parts) == b"".join(p.tobytes() for p in rf.parts), key
        assert sum(p.nbytes for p in f.parts) == sum(p.nbytes for p in rf.parts), key
        assert [int(t) for t in f.types] == [int(t) for t in rf.types], key
        assert len(f.data) == len(rf.data), key
        a, b = f.contents(), rf.contents()
        assert a == b, key
        items_a, items_b = (a, b) if isinstance(a, list) else ([a], [b])
        assert [type(x) for x in items_a] == [type(x) for x in items_b], key
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    assert ours.byte_order == ref.byte_order and ours.endianess == ref.endianess
    assert len(ours.tensors) == len(ref.tensors)
    for t, rt in zip(ours.tensors, ref.tensors):
        assert t.name == rt.name
        assert t.shape == tuple(int(d) for d in rt.shape), t.name
        assert t.tensor_type == rt.tensor_type and t.tensor_type.name == rt.tensor_type.name, t.name
        assert (t.n_elements, t.n_bytes, t.data_offset) == (rt.n_elements, rt.n_bytes, rt.data_offset), t.name
        assert t.data.shape == rt.data.shape and t.data.dtype == rt.data.dtype, t.name
        assert t.data.tobytes() == rt.data.tobytes(), t.name
        assert t.field.offset == rt.field.offset, t.name
        assert sum(p.nbytes for p in t.field.parts) == sum(p.nbytes for p in rt.field.parts), t.name


def test_synthetic_models_read_as_gguf_py_reads_them(tiny_model, tiny_model_f16):
    _assert_same_as_gguf_py(tiny_model)
    _assert_same_as_gguf_py(tiny_model_f16)


def test_quantized_model_reads_as_gguf_py_reads_it(quantized_model):
    types = {t.tensor_type.name for t in read_header(quantized_model).tensors}
    assert {"Q4_K", "Q6_K"} <= types  # block types really are there
    _assert_same_as_gguf_py(quantized_model)


def test_every_value_type_and_custom_alignment(every_type_model):
    _assert_same_as_gguf_py(every_type_model)
    h = read_header(every_type_model)
    assert h.alignment == 64 and h.data_offset % 64 == 0
    assert all(t.data_offset % 64 == 0 for t in h.tensors)
    # The values are the ones written, too (not only equal to gguf-py's reading of them).
    for key, value, vtype, _ in _every_type_kv():
        got = h.get(key)
        if key in ("t.f32", "t.a_f32"):  # float32 storage rounds the written doubles
            assert got == pytest.approx(value, rel=1e-7), key
        else:
            assert got == value, key
    assert h.fields["t.a_str"].types == [ValueType.ARRAY, ValueType.STRING]
    assert h.fields["t.a_str"].joined_bytes(b"\x00") == b"".join(b"\x00" + s.encode() for s in h.get("t.a_str"))
    q8 = next(t for t in h.tensors if t.name == "w.q8_0")
    assert q8.shape == (64, 3) and q8.n_bytes == 3 * 2 * 34  # Q8_0: 32 values in 34 bytes


def test_version_2_reads_like_version_3(v2_model, tiny_model_f16):
    _assert_same_as_gguf_py(v2_model)
    assert read_header(v2_model).version == 2 and read_header(tiny_model_f16).version == 3


@pytest.mark.skipif(not TRAINED.is_file(), reason=f"{TRAINED} not present")
def test_trained_model_reads_as_gguf_py_reads_it():
    _assert_same_as_gguf_py(TRAINED)


def test_type_table_matches_ggml_block_layouts():
    import gguf

    from ggufopt_ray.gguf.header import _ELEMENT_DTYPES, ggml_type_sizes

    sizes = ggml_type_sizes()
    # ggml's block structs: F32/F16 scalars, Q4_0 = f16 scale + 16 bytes of nibbles per 32,
    # Q8_0 = f16 + 32 int8 per 32, Q4_K = 2 f16 + 12 scale bytes + 128 nibble bytes per 256,
    # Q6_K = 128 + 64 + 16 + f16 per 256.
    assert sizes[0] == (1, 4) and sizes[1] == (1, 2)
    assert sizes[2] == (32, 2 + 16) and sizes[8] == (32, 2 + 32)
    assert sizes[12] == (256, 4 + 12 + 128) and sizes[14] == (256, 128 + 64 + 16 + 2)
    names = {int(t): t.name for t in gguf.GGMLQuantizationType}
    assert {names[k]: np.dtype(v).name for k, v in _ELEMENT_DTYPES.items()} == {
        "F32": "float32", "F16": "float16", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
        "F64": "float64"}


# -- inspect_model against a ModelInfo made from gguf-py's reader ------------------------------------
def _reference_info(path) -> dict:
    """inspect_model's figures computed from gguf.GGUFReader and decoded token strings."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture", "unknown")
    tokens = get("tokenizer.ggml.tokens", []) or []
    h = hashlib.sha256(str(get("tokenizer.ggml.model", "") or "").encode())
    for tok in tokens:
        h.update(b"\x00" + tok.encode("utf-8", "surrogatepass"))
    by_type: dict = {}
    for t in r.tensors:
        s = by_type.setdefault(t.tensor_type.name, [0, 0, 0])
        s[0], s[1], s[2] = s[0] + 1, s[1] + int(t.n_elements), s[2] + int(t.n_bytes)
    n_params = sum(int(t.n_elements) for t in r.tensors)
    tensor_bytes = sum(int(t.n_bytes) for t in r.tensors)
    return {
        "architecture": arch, "name": get("general.name", ""), "vocab_size": get(f"{arch}.vocab_size") or len(tokens),
        "context_length": get(f"{arch}.context_length"), "n_params": n_params, "tensor_bytes": tensor_bytes,
        "bits_per_weight": 8.0 * tensor_bytes / n_params, "file_size": Path(path).stat().st_size,
        "file_type": gguf.LlamaFileType(get("general.file_type")).name, "vocab_fingerprint": h.hexdigest()[:16],
        "add_bos": bool(get("tokenizer.ggml.add_bos_token", True)),
        "by_type": {k: {"count": c, "n_params": n, "n_bytes": b, "bits_per_weight": 8.0 * b / n}
                    for k, (c, n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][1])},
        "tensor_types": {t.name: t.tensor_type.name for t in r.tensors},
    }


def _models(tiny_model, tiny_model_f16, quantized_model):
    return [tiny_model, tiny_model_f16, quantized_model] + ([TRAINED] if TRAINED.is_file() else [])


def test_inspect_model_equals_the_gguf_py_computation(tiny_model, tiny_model_f16, quantized_model):
    for path in _models(tiny_model, tiny_model_f16, quantized_model):
        info = inspect_model(path)
        got = info.to_dict()
        got.pop("path")
        got["tensor_types"] = info.tensor_types
        ref = _reference_info(path)
        assert got == ref, path
        assert list(got["by_type"]) == list(ref["by_type"])  # same order, too


def test_model_fingerprint_is_unchanged(tiny_model):
    # Recorded from the GGUFReader-based implementation (also in tests/test_report.py's PROV):
    # stores keyed by these fingerprints stay valid.
    assert model_fingerprint(tiny_model) == "b6d64fbd1df9b23d"
    assert inspect_model(tiny_model).vocab_fingerprint == "38d602624a5d0c64"


def test_invalid_utf8_token_is_a_user_error_on_decoding(tiny_model, tmp_path):
    data = bytearray(Path(tiny_model).read_bytes())
    f = read_header(tiny_model).fields["tokenizer.ggml.tokens"]
    first = f.value_offset  # first token: u64 length, then its bytes
    n = int.from_bytes(data[first:first + 8], "little")
    assert n >= 1
    data[first + 8] = 0xFF  # never valid in UTF-8
    bad = tmp_path / "bad-utf8.gguf"
    bad.write_bytes(bytes(data))
    h = read_header(bad)  # opening does not decode the tokens
    with pytest.raises(UserError, match="not valid UTF-8") as exc:
        h.get("tokenizer.ggml.tokens")
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


# -- damaged files ---------------------------------------------------------------------------------
def _one_line_user_error(path, match: str | None = None) -> str:
    with pytest.raises(UserError, match=match) as exc:
        open_reader(path)
    msg = str(exc.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_truncated_files_are_one_line_user_errors(tiny_model, tmp_path):
    data = Path(tiny_model).read_bytes()
    h = read_header(tiny_model)
    tokens = h.fields["tokenizer.ggml.tokens"]
    cuts = {"in-tokens": (tokens.offset + tokens.end) // 2, "in-tensor-infos": h.tensors[3].info_offset + 5,
            "in-data": h.tensors[-1].data_offset + 100, "in-kv-key": 30}
    for label, cut in cuts.items():
        path = tmp_path / f"cut-{label}.gguf"
        path.write_bytes(data[:cut])
        msg = _one_line_user_error(path, "truncated")
        assert "re-create or re-download" in msg, label
        with pytest.raises(UserError):
            inspect_model(path)


def test_garbage_files_are_one_line_user_errors(tmp_path):
    rng = np.random.default_rng(1)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _one_line_user_error(garbage, "not a GGUF file")
    magic_then_garbage = tmp_path / "magic-garbage.gguf"
    magic_then_garbage.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _one_line_user_error(magic_then_garbage, "damaged or truncated")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _one_line_user_error(empty)
    with pytest.raises(UserError, match="not a GGUF file"):
        read_header(empty)


def test_unsupported_version_and_big_endian_are_refused(tiny_model_f16, tmp_path):
    import gguf

    data = bytearray(Path(tiny_model_f16).read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(bytes(data))
    _one_line_user_error(v1, "version 1; only versions 2 and 3")
    big = _write(tmp_path / "big.gguf", [("t.u32", 5, gguf.GGUFValueType.UINT32, None)],
                 {"w": (np.ones((2, 4), dtype=np.float32), None)}, endian=gguf.GGUFEndian.BIG)
    assert gguf.GGUFReader(str(big)).byte_order == "S"  # the reference sees a byte-swapped file too
    _one_line_user_error(big, "big-endian")


def test_corrupted_headers_never_raise_anything_but_user_errors(tiny_model_f16, tmp_path):
    """Random byte damage in the header: either it still parses (and every value and tensor view
    is readable) or it is a UserError; never another exception, never a hang."""
    data = Path(tiny_model_f16).read_bytes()
    header_end = read_header(tiny_model_f16).data_offset
    rng = random.Random(7)
    outcomes = {"ok": 0, "error": 0}
    for k in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(4, header_end)
            buf[pos] = rng.randrange(256) if rng.random() < 0.8 else 0xFF
        path = tmp_path / "fuzz.gguf"
        path.write_bytes(bytes(buf))
        try:
            h = read_header(path)
            for f in h.fields.values():
                f.contents()
            for t in h.tensors:
                assert t.data.nbytes == t.n_bytes
            outcomes["ok"] += 1
        except UserError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0  # damage noticed; harmless damage tolerated


# -- speed -----------------------------------------------------------------------------------------
def test_262144_strings_decode_fast_and_exactly(tmp_path):
    """A vocabulary-sized string array: values equal to what was written; times printed."""
    import gguf

    pieces = ["", "▁", "é", "日本", "🙂", "\x00", "<0x0A>", "ab"]  # 1- to 4-byte UTF-8, NUL, empty
    tokens = [f"{pieces[i % 8]}{i:x}{pieces[i // 8 % 8]}" if i % 97 else "" for i in range(262_144)]
    path = _write(tmp_path / "vocab.gguf", [
        ("tokenizer.ggml.model", "llama", gguf.GGUFValueType.STRING, None),
        ("tokenizer.ggml.tokens", tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
        ("tokenizer.ggml.scores", [0.5] * len(tokens), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
    ], {"token_embd.weight": (np.zeros((4, 32), dtype=np.float32), None)})
    t0 = time.perf_counter()
    h = read_header(path)
    t1 = time.perf_counter()
    got = h.get("tokenizer.ggml.tokens")
    t2 = time.perf_counter()
    assert got == tokens
    assert h.get("tokenizer.ggml.scores") == [0.5] * len(tokens)
    fp = inspect_model(path).vocab_fingerprint
    t3 = time.perf_counter()
    ref = hashlib.sha256(b"llama")
    for tok in tokens:
        ref.update(b"\x00" + tok.encode())
    assert fp == ref.hexdigest()[:16]
    print(f"\n262,144 tokens: open {t1 - t0:.3f} s, decode {t2 - t1:.3f} s, inspect_model {t3 - t2:.3f} s")


@pytest.mark.slow
def test_timing_with_a_128256_token_vocabulary(tmp_path):
    """Times printed, not asserted: `ggufopt synth-model OUT --vocab 128256 --layers 2`."""
    out = tmp_path / "v128256.gguf"
    subprocess.run([sys.executable, "-m", "ggufopt_ray.cli", "synth-model", str(out), "--vocab", "128256",
                    "--layers", "2", "--dtype", "f16"], check=True, capture_output=True)
    times = {}
    for label, fn in [("open_reader", open_reader), ("inspect_model", inspect_model),
                      ("model_fingerprint", model_fingerprint),
                      ("tokens", lambda p: read_header(p).get("tokenizer.ggml.tokens"))]:
        t0 = time.perf_counter()
        fn(out)
        times[label] = time.perf_counter() - t0
    info = inspect_model(out)
    assert info.vocab_size == 128256 and len(read_header(out).get("tokenizer.ggml.tokens")) == 128256
    print("\nV=128256: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
