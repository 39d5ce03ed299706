"""Parity with llama.cpp's own tools, built from the very llama.cpp that llama-cpp-python vendors.

A user who already trusts llama-perplexity, llama-imatrix and llama-quantize must get the same
numbers and files from us. These tests run those binaries on the tiny model and a built-in text and
compare: perplexity (flash attention off and on), every KL-divergence statistic of
``--kl-divergence`` against our ``llamacpp_uint16`` encoding, the importance matrix (and we read
llama-imatrix's file), and llama-quantize's output with our imatrix files (GGUF and legacy .dat)
against our in-process quantization, byte for byte.

The binaries come from ``.ci/build-llama-tools`` (CI runs it; about 3 minutes once, then cached).
Without them these tests skip; with ``CI=true`` or ``GGUFOPT_LLAMA_TOOLS`` set they are required,
and a missing tool fails the run.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
N_CTX, N_CHUNKS = 128, 8


TOOL_NAMES = ("llama-perplexity", "llama-imatrix", "llama-quantize")


def _tools_required() -> bool:
    """In CI (``CI=true``, as CI services set it) or with GGUFOPT_LLAMA_TOOLS set, a missing tool is
    a failure: a parity suite that skips itself would let a green run hide that nothing was compared."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")
    return ci or bool(os.environ.get("GGUFOPT_LLAMA_TOOLS"))


def _tools_dir() -> Path:
    env = os.environ.get("GGUFOPT_LLAMA_TOOLS")
    if env:
        return Path(env)
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return Path.home() / ".cache" / "ggufopt_ray-llama-tools" / version


def find_tools() -> Path:
    """The bin/ directory of llama.cpp's tools; skips when they are absent, fails when required."""
    d = _tools_dir()
    missing = [name for name in TOOL_NAMES if not (d / "bin" / name).is_file()]
    if missing:
        why = f"llama.cpp tools missing from {d / 'bin'} ({', '.join(missing)}); run .ci/build-llama-tools"
        if _tools_required():
            pytest.fail(why + " (required: CI or GGUFOPT_LLAMA_TOOLS is set)", pytrace=False)
        pytest.skip(why)
    return d / "bin"


@pytest.fixture(scope="module")
def tools() -> Path:
    return find_tools()


@pytest.mark.parametrize("env, outcome", [
    ({"CI": "true"}, pytest.fail.Exception),
    ({"CI": "1"}, pytest.fail.Exception),
    ({"GGUFOPT_LLAMA_TOOLS": "<empty>"}, pytest.fail.Exception),
    ({"CI": "true", "GGUFOPT_LLAMA_TOOLS": "<empty>"}, pytest.fail.Exception),
    ({}, pytest.skip.Exception),
    ({"CI": "false"}, pytest.skip.Exception),
])
def test_missing_tools_fail_in_ci_and_skip_elsewhere(tmp_path, monkeypatch, env, outcome):
    """Without the binaries: a failure under CI=true or GGUFOPT_LLAMA_TOOLS, a skip otherwise."""
    empty = tmp_path / "tools"
    (empty / "bin").mkdir(parents=True)
    (empty / "bin" / "llama-perplexity").write_text("")  # one tool of three: still incomplete
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no default build under ~/.cache either
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("GGUFOPT_LLAMA_TOOLS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(empty) if value == "<empty>" else value)
    with pytest.raises(outcome, match="llama.cpp tools missing"):
        find_tools()
    for name in TOOL_NAMES:  # and once all three are there, they are found
        (empty / "bin" / name).write_text("")
    if "GGUFOPT_LLAMA_TOOLS" in env:
        assert find_tools() == empty / "bin"


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    """The tiny model, its Q4_K_M, and a text of a little more than N_CHUNKS chunks."""
    from ggufopt_ray.engine.quantize import quantize_model

    d = tmp_path_factory.mktemp("parity")
    text = d / "text.txt"
    builtin = ROOT / "ggufopt_ray" / "data" / "builtin"
    text.write_text((builtin / "en.txt").read_text()[:12000] + (builtin / "code.txt").read_text()[:12000])
    q4 = quantize_model(tiny_model, "Q4_K_M", d / "tiny-Q4_K_M.gguf").path
    return {"dir": d, "text": text, "f32": Path(tiny_model), "q4": Path(q4)}


def _run(tools: Path, tool: str, *args: str, until: str | None = None) -> str:
    for _ in range(12):
        threads = ["2"] if tool == "llama-quantize" else ["-t", "2"]  # llama-quantize: a positional
        proc = subprocess.run([str(tools / tool), *args, *threads], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        # llama.cpp's logger is asynchronous and now and then loses its last lines at exit (on a
        # loaded machine about every other run): ``until`` names a line of the final block (the
        # per-chunk table's header says "Same top p" too, the final line "Same top p:").
        if until is None or until in out:
            return out
    raise AssertionError(f"{tool} never printed {until!r}")


def _chunks(work):
    from ggufopt_ray.engine.tokenizer import VocabTokenizer, text_chunks

    with VocabTokenizer(work["f32"]) as tok:
        return text_chunks(tok, work["text"].read_text(), N_CTX, N_CHUNKS)


def _settings(flash_attn: bool = False):
    from ggufopt_ray.engine import RuntimeSettings

    return RuntimeSettings(n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=2, flash_attn=flash_attn)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("model", ["f32", "q4"])
def test_perplexity_equals_llama_perplexity(tools, work, model, flash_attn):
    from ggufopt_ray.evaluate.perplexity import model_perplexity

    out = _run(tools, "llama-perplexity", "-m", str(work[model]), "-f", str(work["text"]), "-c", str(N_CTX),
               "-b", str(N_CTX), "--chunks", str(N_CHUNKS), "-fa", "on" if flash_attn else "off",
               until="Final estimate")
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", out)]
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    ours = model_perplexity(work[model], _chunks(work), _settings(flash_attn))
    nll = np.asarray(ours.nll, np.float64).reshape(N_CHUNKS, -1)
    ours_running = [math.exp(nll[: i + 1].mean()) for i in range(N_CHUNKS)]
    print(f"{model} fa={flash_attn}: llama-perplexity {final.group(1)} ± {final.group(2)}, "
          f"ggufopt {ours.ppl:.4f} ± {ours.ppl_se:.4f}")
    assert len(running) == N_CHUNKS
    np.testing.assert_allclose(ours_running, running, rtol=2e-6)
    assert ours.ppl == pytest.approx(float(final.group(1)), rel=1e-6)
    assert ours.ppl_se == pytest.approx(float(final.group(2)), rel=1e-4)


def _stat(out: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*:\s*([-+0-9.]+)", out)
    assert m, f"llama-perplexity printed no {label!r}"
    return float(m.group(1))


def _llama_kld(tools, base_file: Path, candidate: Path, chunks: int | None = N_CHUNKS) -> str:
    """llama-perplexity's KL-divergence statistics of ``candidate`` against ``base_file``."""
    limit = ["--chunks", str(chunks)] if chunks else []
    out = _run(tools, "llama-perplexity", "-m", str(candidate), "--kl-divergence-base", str(base_file),
               "--kl-divergence", "-c", str(N_CTX), "-b", str(N_CTX), *limit, "-fa", "off", until="Same top p:")
    return out[out.index("====== Perplexity statistics"):]


@pytest.fixture(scope="module")
def llama_kld(tools, work):
    """llama-perplexity's own base file of the F32 model and its verdict on the Q4_K_M."""
    base_file = work["dir"] / "base.kld"
    _run(tools, "llama-perplexity", "-m", str(work["f32"]), "-f", str(work["text"]), "--kl-divergence-base",
         str(base_file), "-c", str(N_CTX), "-b", str(N_CTX), "--chunks", str(N_CHUNKS), "-fa", "off",
         until="Final estimate")
    return base_file, _llama_kld(tools, base_file, work["q4"])


def _assert_same_kld_statistics(ours: dict, out: str) -> None:
    pairs = [("kld_mean", "Mean    KLD"), ("kld_max", "Maximum KLD"), ("kld_p999", "99.9%   KLD"),
             ("kld_p99", "99.0%   KLD"), ("kld_p95", "95.0%   KLD"), ("kld_p90", "90.0%   KLD"),
             ("kld_median", "Median  KLD"), ("kld_min", "Minimum KLD")]
    for key, label in pairs:
        theirs = _stat(out, label)
        print(f"{label:12s} llama.cpp {theirs:.6f}  ggufopt {ours[key]:.6f}")
        # printed with 6 decimals; percentiles interpolate at a float32 fraction in llama.cpp
        assert ours[key] == pytest.approx(theirs, abs=2e-6, rel=2e-5), key
    assert ours["ppl_cand"] == pytest.approx(_stat(out, "Mean PPL(Q)"), rel=1e-6)
    # llama.cpp decodes the base NLL from its uint16 codes; we keep the reference token's exact log-prob
    assert ours["ppl_base"] == pytest.approx(_stat(out, "Mean PPL(base)"), rel=1e-4)
    assert ours["ln_ppl_ratio"] == pytest.approx(_stat(out, "Mean ln(PPL(Q)/PPL(base))"), abs=5e-6 + 1e-4)
    assert 100 * ours["same_top"] == pytest.approx(_stat(out, "Same top p"), abs=6e-4)


def test_kld_statistics_equal_llama_perplexity_kl_divergence(work, llama_kld):
    from ggufopt_ray.engine import LogitsEngine
    from ggufopt_ray.evaluation import baseline_payload, compare_chunk, summarize

    first = N_CTX // 2
    chunks = _chunks(work)
    with LogitsEngine(work["f32"], _settings()) as engine:
        payloads = [baseline_payload(engine, c, "llamacpp_uint16", first) for c in chunks]
    with LogitsEngine(work["q4"], _settings()) as engine:
        per_chunk = [compare_chunk(engine, c, p, "llamacpp_uint16", first) for c, p in zip(chunks, payloads)]
    ours = summarize(per_chunk, n_boot=10)
    _assert_same_kld_statistics(ours, llama_kld[1])
    assert ours["n_tokens"] == N_CHUNKS * (N_CTX - 1 - first)


def test_imported_llama_base_file_gives_llama_perplexity_numbers(work, llama_kld, capsys):
    """`ggufopt kld-base import` + `ggufopt bench` on llama.cpp's own base file."""
    import json

    from ggufopt_ray.cli import main

    base_file, out = llama_kld
    store, results = work["dir"] / "imported", work["dir"] / "imported-results"
    assert main(["kld-base", "import", str(base_file), "--model", str(work["f32"]), "-o", str(store),
                 "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["bench", str(work["q4"]), "--baseline", str(store), "-o", str(results), "--threads", "2",
                 "--overwrite", "--json"]) == 0
    text = capsys.readouterr().out
    ours = json.loads(text[text.index("{"):])
    ours = ours.get("overall", ours)
    _assert_same_kld_statistics(ours, out)


def test_exported_baseline_is_read_by_llama_perplexity(tools, work, llama_kld, capsys):
    """`ggufopt logits --encoding llamacpp_uint16` + `kld-base export`, judged by llama-perplexity."""
    from ggufopt_ray.cli import main
    from ggufopt_ray.store.llamacpp_kld import read_kld_base

    store, exported = work["dir"] / "ours-uint16", work["dir"] / "ours.kld"
    assert main(["logits", str(work["f32"]), "--text-file", str(work["text"]), "--ctx", str(N_CTX),
                 "--threads", "2", "--encoding", "llamacpp_uint16", "-o", str(store), "--overwrite"]) == 0
    assert main(["kld-base", "export", str(store), "-o", str(exported), "--chunks", str(N_CHUNKS),
                 "--overwrite"]) == 0
    capsys.readouterr()
    theirs_file, theirs_out = llama_kld
    ours_out = _llama_kld(tools, exported, work["q4"])  # the same chunks as llama's own file
    # Our base file's logits come from llama-cpp-python's build of llama.cpp, llama's own from the
    # tools .ci/build-llama-tools builds: the same source, but the two builds round a few logits
    # differently, and ~0.2% of the uint16 codes differ by one. A percentile picks one token, so it
    # moves with them: on this machine p99 differs by 1.75e-5 relative (the old tree gives the same
    # with these builds). Means average that away and stay at 1e-5.
    for label, rel in (("Mean    KLD", 1e-5), ("Maximum KLD", 1e-5), ("99.0%   KLD", 5e-5), ("Median  KLD", 5e-5),
                       ("Mean PPL(base)", 1e-5)):
        assert _stat(ours_out, label) == pytest.approx(_stat(theirs_out, label), rel=rel, abs=2e-6), label
    ours, theirs = read_kld_base(exported), read_kld_base(theirs_file)
    assert (ours.n_ctx, ours.n_vocab, ours.n_chunk) == (theirs.n_ctx, theirs.n_vocab, theirs.n_chunk)
    np.testing.assert_array_equal(ours.tokens[:, 1:], theirs.tokens[:, 1:])  # BOS slots aside
    same, worst = 0, 0
    for i in range(N_CHUNKS):
        a, b = ours.payload(i), theirs.payload(i)
        np.testing.assert_allclose(a["scale"], b["scale"], rtol=1e-6)
        np.testing.assert_allclose(a["min_log_prob"], b["min_log_prob"], rtol=1e-5)
        diff = np.abs(a["codes"].astype(np.int32) - b["codes"].astype(np.int32))
        same += int((diff == 0).sum())
        worst = max(worst, int(diff.max()))
    total = N_CHUNKS * (N_CTX - 1 - N_CTX // 2) * ours.n_vocab
    print(f"uint16 codes identical to llama-perplexity's: {same}/{total}; largest difference {worst}")
    assert worst <= 1 and same / total > 0.99


@pytest.fixture(scope="module")
def imatrices(tools, work):
    """llama-imatrix's file and ours, collected on the same text and chunks."""
    from ggufopt_ray.engine.imatrix import collect_imatrix

    theirs = work["dir"] / "llama-imatrix.gguf"
    _run(tools, "llama-imatrix", "-m", str(work["f32"]), "-f", str(work["text"]), "-c", str(N_CTX),
         "-b", str(N_CTX), "--chunks", str(N_CHUNKS), "-fa", "off", "-o", str(theirs))
    ours = collect_imatrix(work["f32"], _chunks(work), settings=_settings())
    return theirs, ours


def test_imatrix_equals_llama_imatrix(imatrices):
    from ggufopt_ray.engine.imatrix import load_imatrix

    path, ours = imatrices
    theirs = load_imatrix(path)  # we read llama-imatrix's own GGUF file
    assert sorted(theirs.entries) == sorted(ours.entries)
    worst = 0.0
    for name, e in theirs.entries.items():
        mine = ours.entries[name]
        np.testing.assert_array_equal(mine.counts, e.counts)
        assert e.counts.max() == N_CHUNKS * N_CTX
        rel = float(np.abs(mine.sums - e.sums).max() / np.abs(e.sums).max())
        worst = max(worst, rel)
    print(f"{len(theirs.entries)} tensors, largest relative difference of the sums {worst:.2e}")
    assert worst < 1e-5  # float32 sums accumulated in a different order


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_takes_our_imatrix_and_writes_our_bytes(tools, work, imatrices, fmt):
    from gguf import GGUFReader

    from ggufopt_ray.engine.quantize import quantize_model

    _, imatrix = imatrices
    d = work["dir"]
    imatrix_file = imatrix.save(d / f"ours.{fmt}")
    cli_out = d / f"cli-{fmt}-IQ2_XS.gguf"
    log = _run(tools, "llama-quantize", "--imatrix", str(imatrix_file), str(work["f32"]), str(cli_out), "IQ2_XS")
    assert f"loaded {len(imatrix.entries)} importance matrix entries" in log
    ours = quantize_model(work["f32"], "IQ2_XS", d / f"inproc-{fmt}-IQ2_XS.gguf", imatrix=imatrix, overwrite=True)
    plain = quantize_model(work["f32"], "Q4_K_M", d / f"plain-{fmt}-Q4_K_M.gguf", overwrite=True)
    weighted = quantize_model(work["f32"], "Q4_K_M", d / f"weighted-{fmt}-Q4_K_M.gguf", imatrix=imatrix_file,
                              overwrite=True)

    def tensors(path):
        return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}

    cli, inproc = tensors(cli_out), tensors(ours.path)
    assert cli.keys() == inproc.keys()
    differing = [n for n in cli if cli[n] != inproc[n]]
    assert not differing, f"llama-quantize wrote other data for {differing}"
    # and the imatrix mattered: without it the same type quantizes some tensors differently
    a, b = tensors(plain.path), tensors(weighted.path)
    assert any(a[n] != b[n] for n in a)
