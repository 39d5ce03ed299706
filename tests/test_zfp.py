"""ZFP weight compression on the synthetic model: sizes, errors, exactness, and the written GGUF."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import zfpy

from ggufopt_ray.cli import main
from ggufopt_ray.compress import (ZfpConfig, compress_matrix, compress_model, decompress_matrix,
                                  select_tensors)
from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
from ggufopt_ray.errors import UserError

LAYER0 = (r"^blk\.0\.",)  # a small but varied selection (7 matrices) keeps the sweeps fast


def _matrices(path):
    """name -> float32 (rows, cols) matrix of every tensor with 2+ dims, plus raw reader tensors."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        if len(t.shape) >= 2:
            out[t.name] = np.asarray(t.data).astype(np.float32).reshape(-1, int(t.shape[0]))
    return reader, out


def _layout_by_hand(w, dims):
    """The documented zfp layout, written independently of the module (no padding needed here)."""
    r, c = w.shape
    return {1: w.reshape(r * c), 2: w, 3: w.reshape(r, c // 4, 4), 4: w.reshape(r // 4, 4, c // 4, 4)}[dims]


@pytest.mark.parametrize("dims", [1, 2, 3, 4])
def test_error_falls_as_rate_rises(tiny_model, dims):
    reports = [compress_model(tiny_model, ZfpConfig(mode="rate", rate=r, dims=dims, include=LAYER0))
               for r in (4, 8, 12, 16)]
    for lo, hi in zip(reports, reports[1:]):
        assert hi.rmse < lo.rmse and hi.snr_db > lo.snr_db
        assert hi.bits_per_weight > lo.bits_per_weight
        for a, b in zip(lo.tensors, hi.tensors):
            assert b.rmse < a.rmse and b.snr_db > a.snr_db and b.max_abs_error < a.max_abs_error
    # Fixed-rate mode spends exactly the requested bits when the rate is a whole number.
    assert [round(r.bits_per_weight, 9) for r in reports] == [4, 8, 12, 16]
    # At 16 bits/value the error is far below the weights' spread.
    assert all(t.rel_rmse < 1e-3 for t in reports[-1].tensors)


@pytest.mark.parametrize("mode,param", [("precision", [8, 12, 16, 20]), ("accuracy", [1e-2, 1e-3, 1e-4, 1e-5])])
def test_error_falls_with_precision_and_tolerance(tiny_model, mode, param):
    key = {"precision": "precision", "accuracy": "tolerance"}[mode]
    reports = [compress_model(tiny_model, ZfpConfig(mode=mode, dims=2, include=LAYER0, **{key: p}))
               for p in param]
    rmse = [r.rmse for r in reports]
    assert rmse == sorted(rmse, reverse=True) and len(set(rmse)) == len(rmse)
    if mode == "accuracy":
        for r, tol in zip(reports, param):
            assert r.max_abs_error <= tol


@pytest.mark.parametrize("dims,mode,kw", [(1, "rate", {"rate": 6.5}), (2, "rate", {"rate": 8}),
                                          (3, "precision", {"precision": 14}),
                                          (4, "accuracy", {"tolerance": 1e-3}), (2, "reversible", {})])
def test_bits_per_weight_is_the_real_byte_count(tiny_model, dims, mode, kw):
    config = ZfpConfig(mode=mode, dims=dims, **kw)
    report = compress_model(tiny_model, config)
    reader, mats = _matrices(tiny_model)
    assert [t.name for t in report.tensors] == list(mats)  # every 2-D weight, in file order
    total = 0
    for t in report.tensors:
        w = mats[t.name]
        n_bytes = len(zfpy.compress_numpy(np.ascontiguousarray(_layout_by_hand(w, dims)),
                                          write_header=False, **kw))
        assert t.compressed_bytes == n_bytes
        assert t.n_params == w.size
        assert t.bits_per_weight == 8 * n_bytes / w.size
        total += n_bytes
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    other_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name not in mats)
    assert report.compressed_bytes == total
    assert report.bits_per_weight == pytest.approx(8 * total / sum(m.size for m in mats.values()), rel=1e-12)
    assert report.model_bits_per_weight == pytest.approx(8 * (total + other_bytes) / n_params, rel=1e-12)
    d = report.to_dict()
    assert d["compressed_bytes"] == total and json.dumps(d)


@pytest.mark.parametrize("dims", [1, 2, 3, 4])
def test_reversible_f32_is_bit_exact_in_the_written_gguf(tiny_model, tmp_path, dims):
    out = tmp_path / f"rev-d{dims}.gguf"
    report = compress_model(tiny_model, ZfpConfig(mode="reversible", dims=dims), out)
    assert report.rmse == 0 and report.max_abs_error == 0
    assert all(t.snr_db == float("inf") for t in report.tensors)
    assert not (tmp_path / f"rev-d{dims}.gguf.partial").exists()
    src, dst = gguf.GGUFReader(str(tiny_model)), gguf.GGUFReader(str(out))
    src_bytes, dst_bytes = tiny_model.read_bytes(), out.read_bytes()
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    for a, b in zip(src.tensors, dst.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
        region_a = src_bytes[a.data_offset:a.data_offset + a.n_bytes]
        region_b = dst_bytes[b.data_offset:b.data_offset + b.n_bytes]
        assert region_a == region_b, a.name
    # All metadata copied; the only addition is the provenance key.
    src_kv = {f.name: f.contents() for f in src.fields.values() if not f.name.startswith("GGUF.")}
    dst_kv = {f.name: f.contents() for f in dst.fields.values() if not f.name.startswith("GGUF.")}
    provenance = json.loads(dst_kv.pop("ggufopt.zfp.config"))
    assert provenance["mode"] == "reversible" and provenance["dims"] == dims
    assert src_kv == dst_kv


def test_reversible_f16_round_trips_bit_exactly(tiny_model_f16, tmp_path):
    out = tmp_path / "rev-f16.gguf"
    report = compress_model(tiny_model_f16, ZfpConfig(mode="reversible", dims=4), out)
    assert report.max_abs_error == 0 and report.tensors[0].source_type == "F16"
    src, dst = gguf.GGUFReader(str(tiny_model_f16)), gguf.GGUFReader(str(out))
    for a, b in zip(src.tensors, dst.tensors):
        assert a.tensor_type == b.tensor_type
        np.testing.assert_array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8))


def test_bf16_source(tmp_path):
    """BF16 weights are decoded to float32 exactly and written back as BF16."""
    src, out = tmp_path / "bf16.gguf", tmp_path / "bf16-rev.gguf"
    w = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16),
                      raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = compress_model(src, ZfpConfig(mode="reversible", dims=2), out)
    assert report.tensors[0].source_type == "BF16" and report.max_abs_error == 0
    a, b = gguf.GGUFReader(str(src)).tensors[0], gguf.GGUFReader(str(out)).tensors[0]
    assert b.tensor_type == gguf.GGMLQuantizationType.BF16
    np.testing.assert_array_equal(a.data, b.data)
    lossy = compress_model(src, ZfpConfig(mode="rate", rate=12, dims=2), out)
    decoded = gguf.quants.dequantize(gguf.GGUFReader(str(out)).tensors[0].data, gguf.GGMLQuantizationType.BF16)
    original = gguf.quants.dequantize(a.data, gguf.GGMLQuantizationType.BF16)
    assert lossy.tensors[0].max_abs_error == pytest.approx(np.abs(decoded - original).max(), rel=1e-6)
    assert 0 < lossy.tensors[0].max_abs_error < 0.05


@pytest.mark.parametrize("dims", [1, 2, 3, 4])
def test_matrix_round_trip_with_padding(dims):
    """Shapes that are not multiples of 4: reversible is exact, lossy keeps the shape."""
    w = np.random.default_rng(dims).standard_normal((7, 10)).astype(np.float32)
    rev = ZfpConfig(mode="reversible", dims=dims)
    np.testing.assert_array_equal(decompress_matrix(compress_matrix(w, rev), 7, 10, rev), w)
    lossy = ZfpConfig(mode="rate", rate=16, dims=dims)
    back = decompress_matrix(compress_matrix(w, lossy), 7, 10, lossy)
    assert back.shape == (7, 10) and np.abs(back - w).max() < 1e-2
    # The dims-4 layout really is 16x16 tiles: a matrix constant on each tile costs the minimum.
    if dims == 4:
        tiles = np.kron(np.arange(4, dtype=np.float32).reshape(2, 2), np.ones((16, 16), np.float32))
        n_tiles = len(compress_matrix(tiles, rev))
        shifted = np.roll(tiles, 8, axis=1)
        assert n_tiles < len(compress_matrix(shifted, rev))


def test_written_gguf_runs_in_llama_cpp_close_to_the_original(tiny_model, tmp_path):
    out = tmp_path / "rate16.gguf"
    compress_model(tiny_model, ZfpConfig(mode="rate", rate=16, dims=2), out)
    low = tmp_path / "rate4.gguf"
    compress_model(tiny_model, ZfpConfig(mode="rate", rate=4, dims=2, exclude=("token_embd",)), low)
    settings = RuntimeSettings(n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1)
    tokens = np.random.default_rng(0).integers(3, 1024, size=48).astype(np.int32)
    results = {}
    for path in (tiny_model, out, low):
        with LogitsEngine(path, settings) as engine:
            results[path] = engine.logits(engine.prepare_chunk(tokens))
    ref = results[tiny_model]
    assert all(np.isfinite(x).all() for x in results.values())
    rms16 = np.sqrt(np.mean((results[out] - ref) ** 2))
    rms4 = np.sqrt(np.mean((results[low] - ref) ** 2))
    # 16 bits/value: weights within ~1e-4 relative, logits within 1e-3 of their spread (the
    # random 2-layer model amplifies weight noise a few times); 4 bits/value is far worse.
    assert rms16 < 1e-3 * ref.std() and np.abs(results[out] - ref).max() < 1e-2 * ref.std()
    assert rms4 > 10 * rms16


def test_include_exclude_selection(tiny_model):
    all_2d = select_tensors(tiny_model, ZfpConfig(mode="rate", rate=8))
    assert "token_embd.weight" in all_2d and "output.weight" in all_2d
    assert not any(n.endswith("norm.weight") for n in all_2d)
    kept = select_tensors(tiny_model, ZfpConfig(mode="rate", rate=8, exclude=(r"^token_embd\.", r"^output\.")))
    assert set(all_2d) - set(kept) == {"token_embd.weight", "output.weight"}
    only = select_tensors(tiny_model, ZfpConfig(mode="rate", rate=8, include=(r"ffn_down",)))
    assert only == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]


def test_config_validation():
    for bad in (dict(mode="rate"), dict(mode="rate", rate=0), dict(mode="rate", rate=-1),
                dict(mode="rate", rate=8, dims=0), dict(mode="rate", rate=8, dims=5),
                dict(mode="precision", precision=0), dict(mode="accuracy", tolerance=0),
                dict(mode="reversible", rate=8), dict(mode="lossy", rate=8),
                dict(mode="rate", rate=8, include=("[",)),
                dict(mode="rate", rate=2.0, dims=1), dict(mode="rate", rate=0.5, dims=2)):
        with pytest.raises(UserError):
            ZfpConfig(**bad).validate()
    assert ZfpConfig(mode="rate", rate=8, dims=4).label == "zfp-rate8-d4"
    # zfp's smallest fixed rate is 9 bits per block of 4^dims values; zfpy crashes below it.
    for dims in (1, 2, 3, 4):
        ZfpConfig(mode="rate", rate=9 / 4 ** dims, dims=dims).validate()
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    assert len(compress_matrix(w, ZfpConfig(mode="rate", rate=9 / 256, dims=4))) * 8 / w.size < 0.05


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized_model(tmp_path_factory):
    """A GGUF holding one Q8_0 matrix and one F32 matrix."""
    path = tmp_path_factory.mktemp("q") / "q8.gguf"
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), "llama")
    q = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_k.weight", rng.standard_normal((8, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _one_line_error(capsys, rc, needle):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("ggufopt zfp: error:") and needle in lines[0], lines[0]


def test_cli_bad_input(tiny_model, quantized_model, tmp_path, capsys):
    _one_line_error(capsys, main(["zfp", str(quantized_model), "--rate", "8"]), "Q8_0")
    _one_line_error(capsys, main(["zfp", str(tmp_path / "missing.gguf"), "--rate", "8"]), "does not exist")
    _one_line_error(capsys, main(["zfp", str(tiny_model), "--rate", "0"]), "rate")
    _one_line_error(capsys, main(["zfp", str(tiny_model), "--rate", "-2"]), "rate")
    _one_line_error(capsys, main(["zfp", str(tiny_model), "--rate", "8", "--dims", "5"]), "dims")
    _one_line_error(capsys, main(["zfp", str(tiny_model), "--rate", "8", "--dims", "0"]), "dims")
    _one_line_error(capsys, main(["zfp", str(tiny_model)]), "needs a rate")
    _one_line_error(capsys, main(["zfp", str(tiny_model), "--mode", "precision", "--rate", "8"]), "rate")
    _one_line_error(capsys, main(["zfp", str(tiny_model), "--rate", "8", "--include", "nothing-matches"]),
                    "no tensor")
    _one_line_error(capsys, main(["zfp", str(tiny_model), "--rate", "8", "-o", str(tmp_path / "no/dir.gguf")]),
                    "does not exist")
    assert not list(tmp_path.iterdir())


def test_cli_writes_and_reports(tiny_model, quantized_model, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    rc = main(["zfp", str(tiny_model), "--mode", "rate", "--rate", "8", "--dims", "3",
               "--exclude", r"^(token_embd|output)\.", "--output", str(out), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and out.is_file()
    assert d["bits_per_weight"] == 8.0 and d["n_tensors_compressed"] == 14
    assert d["config"]["dims"] == 3 and d["output"] == str(out)
    assert d["model_bits_per_weight"] > 8.0  # the two F32 embeddings count at 32 bits
    # Quantized tensors left out with --exclude are copied unchanged.
    out_q = tmp_path / "q.gguf"
    assert main(["zfp", str(quantized_model), "--rate", "8", "--exclude", "attn_q", "-o", str(out_q)]) == 0
    table = capsys.readouterr().out
    assert "blk.0.attn_k.weight" in table and "bits/weight" in table
    a, b = gguf.GGUFReader(str(quantized_model)), gguf.GGUFReader(str(out_q))
    np.testing.assert_array_equal(a.tensors[0].data, b.tensors[0].data)
    assert b.tensors[0].tensor_type == gguf.GGMLQuantizationType.Q8_0
