"""Mixes assembled from per-type source files are the very files llama-quantize writes.

Each case builds a mix with :func:`ggufopt_ray.gguf.assemble.build_mix` and compares it, by SHA-256
of the whole file, with (a) our in-process ``quantize_model`` given the same overrides (works
everywhere) and (b) the ``llama-quantize`` binary built from the llama.cpp that llama-cpp-python
vendors (``.ci/build-llama-tools``; skipped without it unless CI=true). The cases cover the base
types' counting rules (a partial ffn_down / attn_v override moves the other layers' types), shape
fallbacks (rows of 288: Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL), an F16 input with tensors
copied as they are, and imatrix types (IQ4_XS base, IQ2_XS overrides) with our own imatrix.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from ggufopt_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# name -> (model, base type, overrides, with imatrix)
CASES = {
    "q4km-mix": ("tiny4", "Q4_K_M", ["attn_v=Q6_K", r"blk\.[02]\.ffn_down=Q5_K", r"^output\.weight=Q8_0",
                                     "token_embd=Q4_K"], False),
    "q3km-partial": ("tiny4", "Q3_K_M", [r"blk\.1\.attn_v=Q8_0", "attn_k=Q4_K"], False),
    "q3km-plain": ("tiny2", "Q3_K_M", [], False),
    "iq4xs-imatrix": ("tiny4", "IQ4_XS", ["ffn_gate=IQ2_XS", r"blk\.0\.attn_v=Q6_K", "attn_q=IQ3_S"], True),
    "odd-rows-fallback": ("odd", "Q4_K_M", [r"blk\.0\.ffn_down=IQ4_XS", r"blk\.1\.ffn_down=Q6_K",
                                            "attn_output=Q4_0"], False),
    "f16-copies": ("f16", "Q5_K_M", ["attn_k=F16", "ffn_up=Q4_0", "token_embd=q8_0"], False),
}

# the imatrix case quantizes IQ2_XS/IQ3_S sources (~20 s on 2 cores)
PARAMS = [pytest.param(c, marks=pytest.mark.slow) if CASES[c][3] else c for c in CASES]


# -- the llama-quantize binary (as tests/test_llama_cpp_parity.py finds it) -------------------------------
def _tools_bin() -> Path | None:
    env = os.environ.get("GGUFOPT_LLAMA_TOOLS")
    if env:
        return Path(env) / "bin"
    version = importlib.metadata.version("llama-cpp-python")
    default = Path.home() / ".cache" / "ggufopt_ray-llama-tools" / version / "bin"
    return default if (default / "llama-quantize").exists() else None


@pytest.fixture(scope="module")
def llama_quantize() -> Path:
    d = _tools_bin()
    if d is None or not (d / "llama-quantize").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("llama-quantize not built; CI must run .ci/build-llama-tools")
        pytest.skip("llama-quantize not built; run .ci/build-llama-tools")
    return d / "llama-quantize"


# -- models, imatrix, built mixes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_model, tiny_model_f16, tmp_path_factory):
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    class OddRows(SynthSpec):
        """n_ff = 288: ffn_down rows are 288 wide, a multiple of 32 but not of 256."""

        def validate(self) -> None:
            pass

    d = tmp_path_factory.mktemp("assemble-models")
    return {
        "tiny2": Path(tiny_model),
        "tiny4": write_synthetic_model(d / "tiny4-f32.gguf", SynthSpec(seed=1, n_layer=4)),
        "odd": write_synthetic_model(d / "odd-f32.gguf", OddRows(seed=2, n_ff=288)),
        "f16": Path(tiny_model_f16),
    }


@pytest.fixture(scope="module")
def imatrix_file(models, tmp_path_factory):
    """Our imatrix of the 4-layer model on 4 chunks of built-in text, saved as GGUF."""
    from ggufopt_ray.engine.imatrix import collect_imatrix, imatrix_settings
    from ggufopt_ray.engine.tokenizer import VocabTokenizer, text_chunks

    text = (ROOT / "ggufopt_ray" / "data" / "builtin" / "en.txt").read_text()[:8000]
    with VocabTokenizer(models["tiny4"]) as tok:
        chunks = text_chunks(tok, text, 128, 4)
    im = collect_imatrix(models["tiny4"], chunks, settings=imatrix_settings(chunks, n_threads=2),
                         dataset_name="builtin-en")
    return im.save(tmp_path_factory.mktemp("assemble-imatrix") / "tiny4-imatrix.gguf")


@pytest.fixture(scope="module")
def built(models, imatrix_file, tmp_path_factory):
    """Build each case once (sources shared per model and imatrix, as a sweep shares them)."""
    from ggufopt_ray.gguf.assemble import build_mix

    d = tmp_path_factory.mktemp("assemble-mixes")
    cache: dict = {}

    def get(case: str):
        if case not in cache:
            model, base, overrides, with_im = CASES[case]
            cache[case] = build_mix(models[model], d / f"{case}.gguf", base, overrides,
                                    imatrix=str(imatrix_file) if with_im else None,
                                    sources_dir=d / "sources", threads=2)
        return cache[case]

    return get


def _sha(path) -> str:
    from ggufopt_ray.gguf.assemble import file_sha256

    return file_sha256(path)


# -- against llama-quantize itself ----------------------------------------------------------------------
@pytest.mark.parametrize("case", PARAMS)
def test_mix_is_byte_identical_to_llama_quantize(case, built, models, imatrix_file, llama_quantize, tmp_path):
    model, base, overrides, with_im = CASES[case]
    res = built(case)
    theirs = tmp_path / f"{case}-llama-quantize.gguf"
    # the command line build_mix prints, run as it is (only the output path changed)
    argv = shlex.split(res.command)
    assert argv[0] == "llama-quantize" and argv[-3:] == [str(models[model]), res.path, base]
    assert ("--imatrix" in argv) == with_im
    argv = [str(llama_quantize), *argv[1:-2], str(theirs), base, "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert theirs.stat().st_size == res.size_bytes
    assert _sha(theirs) == _sha(res.path)


# -- against our in-process quantizer (no binary needed) ------------------------------------------------
@pytest.mark.parametrize("case", PARAMS)
def test_mix_is_byte_identical_to_in_process_quantize(case, built, models, imatrix_file, tmp_path):
    from gguf import GGUFReader

    from ggufopt_ray.engine.imatrix import load_imatrix
    from ggufopt_ray.engine.quantize import RECIPE_KEY, quantize_model, resolve_file_type
    from ggufopt_ray.gguf.assemble import assemble_mix, binary_imatrix_kv, binary_patterns

    model, base, overrides, with_im = CASES[case]
    res = built(case)
    ref = quantize_model(models[model], base, tmp_path / "inproc.gguf", tensor_types=binary_patterns(overrides),
                         imatrix=str(imatrix_file) if with_im else None, threads=2)
    assert ref.tensor_types == res.tensor_types
    # quantize_model appends its own recipe key after the ones llama-quantize adds; with that key
    # as one more KV override the assembled file must be the same bytes
    recipe = str(GGUFReader(ref.path).fields[RECIPE_KEY].contents())
    kv = binary_imatrix_kv(load_imatrix(imatrix_file), str(imatrix_file)) if with_im else []
    again = assemble_mix(models[model], tmp_path / "again.gguf", res.tensor_types, res.sources,
                         file_type=resolve_file_type(base)[1], extra_kv=[*kv, (RECIPE_KEY, recipe)])
    assert again.size_bytes == ref.size_bytes
    assert _sha(again.path) == _sha(ref.path)


def test_partial_override_moves_the_base_rules_of_other_layers(built, models):
    """Q4_K_M gives ffn_down Q6_K by a running count of the ffn_down tensors it decides; a tensor taken
    by an override is not counted, so "the base type's choice unless a pattern matches" is wrong."""
    from ggufopt_ray.gguf.assemble import mix_plan

    res = built("q4km-mix")  # blk.0 and blk.2 ffn_down overridden on a 4-layer model
    naive = mix_plan(models["tiny4"], "Q4_K_M")  # no overrides: layers 2 and 3 of 4 get Q6_K
    assert naive["blk.3.ffn_down.weight"] == "Q6_K"
    # the counted tensors are blk.1 (count 0) and blk.3 (count 1): both Q4_K under Q4_K_M's rule
    assert res.tensor_types["blk.1.ffn_down.weight"] == "Q4_K"
    assert res.tensor_types["blk.3.ffn_down.weight"] == "Q4_K"


def test_sources_by_override_equal_pure_quantization(models, tmp_path):
    """A source made with `.*=Q4_K` holds the same tensor bytes as llama.cpp's --pure Q4_K_M."""
    from gguf import GGUFReader

    from ggufopt_ray.engine.quantize import quantize_model
    from ggufopt_ray.gguf.assemble import ensure_sources

    sources, seconds = ensure_sources(models["tiny2"], ["Q4_K"], tmp_path / "src", threads=2)
    assert seconds > 0
    pure = quantize_model(models["tiny2"], "Q4_K_M", tmp_path / "pure.gguf", pure=True, threads=2)

    def tensors(path):
        return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in GGUFReader(path).tensors}

    a, b = tensors(sources["Q4_K"]), tensors(pure.path)
    assert a == b
    assert a["blk.0.attn_v.weight"][0] == "Q4_K" and a["output.weight"][0] == "Q4_K"
    again, seconds = ensure_sources(models["tiny2"], ["q4_k"], tmp_path / "src", threads=2)
    assert again == sources and seconds == 0  # cached


def test_tensor_order_and_dims_follow_llama_cpp():
    from ggufopt_ray.gguf.assemble import ggml_n_dims, llama_tensor_order

    names = ["output.weight", "blk.10.attn_q.weight", "blk.2.ffn_up.weight", "token_embd.weight",
             "blk.2.attn_k.weight", "output_norm.weight"]
    assert llama_tensor_order(names) == ["output.weight", "output_norm.weight", "token_embd.weight",
                                         "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]
    assert [ggml_n_dims(s) for s in ([256], [256, 1], [256, 4], [256, 1, 1, 1], [1, 1])] == [1, 1, 2, 1, 1]


def test_bad_inputs_raise_and_leave_nothing(built, models, imatrix_file, tmp_path):
    from ggufopt_ray.gguf.assemble import assemble_mix, build_mix

    res = built("q4km-mix")
    plan, sources = res.tensor_types, dict(res.sources)
    out = tmp_path / "bad.gguf"
    with pytest.raises(UserError, match="no source file for type Q5_K"):
        assemble_mix(models["tiny4"], out, plan, {t: p for t, p in sources.items() if t != "Q5_K"}, file_type=15)
    with pytest.raises(UserError, match="holds .* as Q6_K"):
        assemble_mix(models["tiny4"], out, plan, {**sources, "Q5_K": sources["Q6_K"]}, file_type=15)
    with pytest.raises(UserError, match="plan does not match"):
        assemble_mix(models["tiny4"], out, {**plan, "blk.9.attn_q.weight": "Q4_K"}, sources, file_type=15)
    with pytest.raises(UserError, match="other tensors"):
        assemble_mix(models["tiny2"], out, {n: t for n, t in plan.items() if not n.startswith(("blk.2", "blk.3"))},
                     sources, file_type=15)
    with pytest.raises(UserError, match="overwrite"):
        assemble_mix(models["tiny4"], models["tiny4"], plan, sources, file_type=15)
    with pytest.raises(UserError, match="needs an importance matrix"):
        build_mix(models["tiny4"], out, "Q4_K_M", ["ffn_up=IQ2_XXS"], sources_dir=tmp_path / "s")
    # ggml aborts the process on IQ2_XS without importance data; token_embd never has any
    with pytest.raises(UserError, match="needs importance data"):
        build_mix(models["tiny4"], out, "Q4_K_M", ["token_embd=IQ2_XS"], sources_dir=tmp_path / "s")
    with pytest.raises(UserError, match="the imatrix lacks"):
        build_mix(models["tiny4"], out, "Q4_K_M", ["token_embd=IQ2_XS"], imatrix=str(imatrix_file),
                  sources_dir=tmp_path / "s")
    assert not list(tmp_path.glob("*.gguf*"))


def test_cli_assemble(built, models, tmp_path, capsys):
    from ggufopt_ray.cli import main

    res = built("q4km-mix")
    model, base, overrides, _ = CASES["q4km-mix"]
    tt_file = tmp_path / "types.txt"
    tt_file.write_text("\n".join(overrides[2:]) + "\n")
    out = tmp_path / "cli.gguf"
    argv = ["assemble", str(models[model]), str(out), "--base-type", base.lower(),
            "--tensor-type", overrides[0], "--tensor-type", overrides[1], "--tensor-type-file", str(tt_file),
            "--sources-dir", str(Path(res.sources["Q6_K"]).parent), "--threads", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "(all cached)" in text and "same file as: llama-quantize" in text
    assert _sha(out) == _sha(res.path)
    assert main(["assemble", str(models[model]), str(tmp_path / "x.gguf"), "--base-type", "Q4_K_M",
                 "--tensor-type", "attn_v"]) == 2
    assert "REGEX=TYPE" in capsys.readouterr().err
