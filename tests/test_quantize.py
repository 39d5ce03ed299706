"""In-process quantization on the synthetic model: types, sizes, dry runs, overrides, errors.

Sizes and bits per weight are checked against an independent computation from the written
file's tensor table and gguf-py's own block-size table (not the ggml library the engine uses).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from ggufopt_ray.cli import main
from ggufopt_ray.engine.imatrix import collect_imatrix
from ggufopt_ray.engine.quantize import (RECIPE_KEY, file_types, output_name, quantize_model,
                                         quantize_types, resolve_file_type)
from ggufopt_ray.errors import UserError
from ggufopt_ray.gguf.inspect import inspect_model, open_reader

# type -> (main ggml type of the 2-D weights, bpw range of the whole file)
EXPECTED = {
    "Q8_0": ("Q8_0", 8.45, 8.56),
    "Q6_K": ("Q6_K", 6.50, 6.62),
    "Q5_K_M": ("Q5_K", 5.50, 6.00),
    "Q4_K_M": ("Q4_K", 4.50, 5.20),
    "Q4_0": ("Q4_0", 4.50, 5.00),
    "IQ4_XS": ("IQ4_XS", 4.25, 4.80),
    "IQ2_XS": ("IQ2_XS", 2.30, 3.00),
}
PLAIN = [t for t in EXPECTED if t != "IQ2_XS"]


def _chunks(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1024, size=length).astype(np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def imatrix(tiny_model):
    return collect_imatrix(tiny_model, _chunks(2, 64), n_threads=1)


@pytest.fixture(scope="module")
def quantized(tiny_model, imatrix, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant")
    results = quantize_types(tiny_model, PLAIN, out_dir=out, threads=1)
    results += quantize_types(tiny_model, ["iq2_xs"], out_dir=out, imatrix=imatrix, threads=1)
    return out, {r.type: r for r in results}


def _independent_bpw(path):
    """Bits per weight from the tensor table and gguf-py's block sizes."""
    import gguf

    reader = open_reader(path)
    n_bytes = n_params = 0
    for t in reader.tensors:
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        n = int(t.n_elements)
        assert n % block == 0
        n_bytes += n // block * size
        n_params += n
    return 8.0 * n_bytes / n_params


def test_type_names_come_from_the_binding():
    types = file_types()
    for name in ["Q8_0", "Q4_K_M", "IQ4_XS", "IQ2_XS", "IQ1_S", "F16", "F32", "BF16"]:
        assert name in types
    assert resolve_file_type("q4_k_m") == ("Q4_K_M", types["Q4_K_M"])
    assert resolve_file_type("iq2_xs")[0] == "IQ2_XS"
    assert resolve_file_type("Q4_K")[0] == "Q4_K_M"  # llama-quantize's alias
    assert output_name("/m/model-f32.gguf", "q8_0") == "model-Q8_0.gguf"
    assert output_name("/m/model-f32.gguf", "q8_0", name="x") == "x-Q8_0.gguf"


@pytest.mark.parametrize("qtype", list(EXPECTED))
def test_types_and_bits_per_weight_of_written_files(quantized, qtype):
    out, results = quantized
    r = results[qtype]
    assert not r.skipped and not r.dry_run
    info = inspect_model(r.path)
    main_type, lo, hi = EXPECTED[qtype]
    assert info.file_type == f"MOSTLY_{qtype}"
    weights = {n: t for n, t in info.tensor_types.items() if not n.endswith("norm.weight")}
    norms = {n: t for n, t in info.tensor_types.items() if n.endswith("norm.weight")}
    assert set(norms.values()) == {"F32"}
    counts = {t: list(weights.values()).count(t) for t in set(weights.values())}
    assert max(counts, key=counts.get) == main_type, counts
    if qtype in ("Q8_0", "Q6_K"):
        assert set(weights.values()) == {main_type}  # no mixture rules for these
    assert lo <= r.bits_per_weight <= hi, r.bits_per_weight
    assert r.bits_per_weight == pytest.approx(_independent_bpw(r.path), rel=1e-12)
    assert r.bits_per_weight == pytest.approx(info.bits_per_weight, rel=1e-12)
    assert r.size_bytes == info.file_size == (out / f"tiny-seed0-{qtype}.gguf").stat().st_size
    assert r.tensor_types == info.tensor_types
    assert r.seconds > 0
    assert not list(out.glob("*.partial"))


def test_lower_bit_types_are_smaller(quantized):
    _, results = quantized
    order = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "IQ2_XS"]
    sizes = [results[t].size_bytes for t in order]
    assert sizes == sorted(sizes, reverse=True)


def test_dry_run_predicts_written_size_and_types(tiny_model, imatrix, quantized, tmp_path):
    _, results = quantized
    dry = quantize_types(tiny_model, PLAIN, out_dir=tmp_path, dry_run=True)
    dry += quantize_types(tiny_model, ["IQ2_XS"], out_dir=tmp_path, imatrix=imatrix, dry_run=True)
    assert not list(tmp_path.iterdir())  # nothing written
    for d in dry:
        written = results[d.type]
        assert d.dry_run and not d.skipped
        assert d.size_bytes == written.size_bytes, d.type
        assert d.bits_per_weight == pytest.approx(written.bits_per_weight, rel=1e-12)
        assert d.tensor_types == written.tensor_types


def test_override_changes_exactly_the_matched_tensors(tiny_model, tmp_path):
    base = quantize_model(tiny_model, "Q4_K_M", tmp_path / "base.gguf", threads=1)
    pattern = r"attn_q|blk\.1\.ffn_up"
    over = quantize_model(tiny_model, "Q4_K_M", tmp_path / "over.gguf", threads=1,
                          tensor_types=[f"{pattern}=q8_0"])
    a, b = inspect_model(base.path).tensor_types, inspect_model(over.path).tensor_types
    changed = {n for n in a if a[n] != b[n]}
    assert changed == {n for n in a if re.search(pattern, n)} == {
        "blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.1.ffn_up.weight"}
    assert {b[n] for n in changed} == {"Q8_0"}
    # the first matching override wins, as in llama.cpp
    first = quantize_types(tiny_model, ["Q4_0"], out_dir=tmp_path, dry_run=True,
                           tensor_types={"attn_q": "q8_0", r"blk\.0\.attn_q": "q5_0"})[0]
    assert first.tensor_types["blk.0.attn_q.weight"] == "Q8_0"


def test_output_and_embedding_types_and_pure(tiny_model, tmp_path):
    r = quantize_model(tiny_model, "Q4_K_M", tmp_path / "p.gguf", threads=1, output_type="q8_0",
                       embd_type="F16", pure=True)
    types = inspect_model(r.path).tensor_types
    assert types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "F16"
    others = {t for n, t in types.items() if n not in ("output.weight", "token_embd.weight")
              and not n.endswith("norm.weight")}
    assert others == {"Q4_K"}  # pure: no Q6_K bumps for attn_v / ffn_down


def test_existing_outputs_are_skipped_unless_overwrite(tiny_model, tmp_path):
    first = quantize_types(tiny_model, ["Q8_0", "Q4_0"], out_dir=tmp_path, threads=1)
    stamp = {r.type: (tmp_path / f"tiny-seed0-{r.type}.gguf").stat().st_mtime_ns for r in first}
    again = quantize_types(tiny_model, ["q8_0", "Q4_0", "Q6_K"], out_dir=tmp_path, threads=1)
    assert [r.skipped for r in again] == [True, True, False]
    assert again[0].size_bytes == first[0].size_bytes
    assert again[0].bits_per_weight == pytest.approx(first[0].bits_per_weight)
    assert (tmp_path / "tiny-seed0-Q8_0.gguf").stat().st_mtime_ns == stamp["Q8_0"]
    redo = quantize_types(tiny_model, ["Q8_0"], out_dir=tmp_path, threads=1, overwrite=True)
    assert not redo[0].skipped
    # a file made with another recipe is not silently reused
    with pytest.raises(UserError, match="different recipe"):
        quantize_types(tiny_model, ["Q4_0"], out_dir=tmp_path, tensor_types=["attn_v=q8_0"])
    reader = open_reader(tmp_path / "tiny-seed0-Q4_0.gguf")
    assert reader.fields[RECIPE_KEY].contents() == first[1].recipe


def test_imatrix_is_used_and_recorded(tiny_model, imatrix, tmp_path):
    plain = quantize_model(tiny_model, "IQ4_XS", tmp_path / "a.gguf", threads=1)
    with_im = quantize_model(tiny_model, "IQ4_XS", tmp_path / "b.gguf", threads=1, imatrix=imatrix)
    assert with_im.imatrix_hash == imatrix.hash()
    fields = open_reader(with_im.path).fields
    assert fields["quantize.imatrix.entries_count"].contents() == len(imatrix.entries)
    assert fields["quantize.imatrix.chunks_count"].contents() == imatrix.chunk_count
    a = {t.name: np.array(t.data) for t in open_reader(plain.path).tensors}
    b = {t.name: np.array(t.data) for t in open_reader(with_im.path).tensors}
    assert not np.array_equal(a["blk.0.attn_q.weight"], b["blk.0.attn_q.weight"])
    assert np.array_equal(a["output.weight"], b["output.weight"])  # no imatrix entry for output


def test_error_unknown_type_lists_valid_names(tiny_model, tmp_path):
    with pytest.raises(UserError, match="unknown quantization type 'Q9_9'; valid types: .*Q4_K_M.*IQ2_XS"):
        quantize_types(tiny_model, ["Q8_0", "Q9_9"], out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # validated before anything was written
    with pytest.raises(UserError, match="unknown override type"):
        quantize_types(tiny_model, ["Q8_0"], out_dir=tmp_path, tensor_types=["attn_v=q9"])
    with pytest.raises(UserError, match="not a valid regular expression"):
        quantize_types(tiny_model, ["Q8_0"], out_dir=tmp_path, tensor_types=["attn_(v=q8_0"])


@pytest.mark.parametrize("qtype", ["IQ2_XS", "iq1_s", "IQ2_XXS"])
def test_error_iq2_class_without_imatrix(tiny_model, tmp_path, qtype):
    with pytest.raises(UserError, match="needs an importance matrix"):
        quantize_types(tiny_model, ["Q8_0", qtype], out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_error_imatrix_for_another_model(tiny_model, imatrix, tmp_path):
    wrong_size = imatrix.copy()
    e = wrong_size.entries["blk.0.ffn_down.weight"]
    e.sums = e.sums[:, :256].copy()
    with pytest.raises(UserError, match="ffn_down.weight has 256 values, the model's tensor needs 768"):
        quantize_types(tiny_model, ["Q4_K_M"], out_dir=tmp_path, imatrix=wrong_size)
    wrong_name = imatrix.copy()
    wrong_name.entries["blk.7.attn_q.weight"] = wrong_name.entries["blk.0.attn_q.weight"].copy()
    with pytest.raises(UserError, match="not in the model .e.g. blk.7.attn_q.weight"):
        quantize_types(tiny_model, ["Q4_K_M"], out_dir=tmp_path, imatrix=wrong_name)
    partial = imatrix.copy()
    del partial.entries["blk.1.ffn_up.weight"]
    with pytest.raises(UserError, match="needs importance data for blk.1.ffn_up.weight"):
        quantize_types(tiny_model, ["IQ2_XS"], out_dir=tmp_path, imatrix=partial)


def _cli_error(capsys, argv, needle):
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ggufopt quantize: error:") and needle in err[0], err


def test_cli_errors_are_one_line(tiny_model, imatrix, tmp_path, capsys):
    m, d = str(tiny_model), str(tmp_path)
    _cli_error(capsys, ["quantize", m, "--types", "Q4_K_X", "--out-dir", d], "valid types: F32")
    _cli_error(capsys, ["quantize", m, "--types", "IQ2_XS", "--out-dir", d], "needs an importance matrix")
    bad = imatrix.copy()
    bad.entries["blk.0.attn_q.weight"].sums = bad.entries["blk.0.attn_q.weight"].sums[:, :128].copy()
    bad.save(tmp_path / "bad.gguf")
    _cli_error(capsys, ["quantize", m, "--types", "Q4_0", "--imatrix", str(tmp_path / "bad.gguf"),
                        "--out-dir", d], "does not match the model")
    _cli_error(capsys, ["quantize", m, "--types", "Q4_0", "--imatrix", str(tiny_model), "--out-dir", d],
               "not an imatrix")
    _cli_error(capsys, ["quantize", m, "--types", "Q4_0", "--tensor-type", "attn_v", "--out-dir", d],
               "REGEX=TYPE")
    (tmp_path / "a-file").write_text("x")
    _cli_error(capsys, ["quantize", m, "--types", "Q4_0", "--out-dir", str(tmp_path / "a-file")],
               "is a file, not a folder")


def test_cli_creates_a_missing_out_dir(tiny_model, tmp_path):
    out = tmp_path / "new" / "q"
    assert main(["quantize", str(tiny_model), "--types", "Q8_0", "--out-dir", str(out), "--threads", "1"]) == 0
    assert (out / "tiny-seed0-Q8_0.gguf").exists()


def test_cli_writes_skips_and_dry_runs(tiny_model, tmp_path, capsys):
    argv = ["quantize", str(tiny_model), "--types", "q8_0", "Q4_0", "--out-dir", str(tmp_path),
            "--threads", "1", "--name", "t"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Q8_0" in out and "written" in out
    assert (tmp_path / "t-Q8_0.gguf").exists() and (tmp_path / "t-Q4_0.gguf").exists()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert main(["quantize", str(tiny_model), "--types", "Q6_K", "--dry-run", "--json",
                 "--out-dir", str(tmp_path)]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["dry_run"] and rows[0]["type"] == "Q6_K"
    assert not (tmp_path / "tiny-seed0-Q6_K.gguf").exists()


def test_requantizing_needs_consent(quantized, tmp_path):
    _, results = quantized
    q8 = results["Q8_0"].path
    with pytest.raises(UserError, match="already quantized .* allow_requantize"):
        quantize_model(q8, "Q4_0", tmp_path / "r.gguf", threads=1)
    assert not list(tmp_path.iterdir())
    r = quantize_model(q8, "Q4_0", tmp_path / "r.gguf", threads=1, allow_requantize=True)
    assert r.type_histogram()["Q4_0"] == 15
