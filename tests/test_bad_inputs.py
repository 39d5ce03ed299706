"""Bad inputs, damaged files and a hostile environment: one line of error, non-zero exit, nothing half-made.

Every row of ``CASES`` runs one command as a user would (a subprocess with its own stderr) and
checks that it exits non-zero with exactly one line on stderr, no traceback, that the line names
the problem (``needle``), and that no output it was asked for is left behind (``absent``) or half
written (no ``*.partial``/``*.tmp`` file anywhere in the case's folder).

Adding a row: ``Case(id, argv, needle, ...)``. ``argv[0]`` picks the program (``ggufopt`` or
``sweep`` for ``launch/sweep.py``); the other items are formatted with the workspace paths below
(``{model}``, ``{tmp}``, ...). ``prepare(ws, tmp)`` makes damaged or conflicting inputs in the
case's own folder first; ``file_limit`` (bytes) runs the command under ``ulimit -f``, i.e. a disk
that is full for it.

Workspace (made once per module): ``{model}`` tiny F32 model, ``{other_vocab}`` a model with
another tokenizer, ``{other_model}`` another model with the same tokenizer, ``{text}`` a text
corpus, ``{base}`` a float16 baseline store (chunks 0..1 of ctx 64), ``{base_u16}`` the same in
``llamacpp_uint16``, ``{kld}`` that store exported as a llama-perplexity base file, ``{results}`` a
results store. ``{tmp}`` is the case's own empty folder.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "ggufopt_ray" / "data" / "builtin" / "en.txt"
PROGRAMS = {"ggufopt": [sys.executable, "-m", "ggufopt_ray.cli"],
            "sweep": [sys.executable, str(ROOT / "launch" / "sweep.py")]}


@dataclass
class Case:
    id: str
    argv: list[str]
    needle: str  # a regular expression the error line must contain
    absent: tuple[str, ...] = ()  # paths (formatted like argv) that must not exist afterwards
    prepare: Callable | None = None  # prepare(ws: dict, tmp: Path) makes the case's inputs
    file_limit: int | None = None  # bytes: RLIMIT_FSIZE of the command (a full disk)
    prefix: str | None = None  # the error line's start; default "ggufopt CMD: error: "


# -- helpers that make damaged inputs ---------------------------------------------------------
def _copy_store(src_key: str, name: str = "store"):
    def prepare(ws, tmp):
        shutil.copytree(ws[src_key], tmp / name)
    return prepare


def _garbage_chunk(src_key: str, index: int):
    def prepare(ws, tmp):
        shutil.copytree(ws[src_key], tmp / "store")
        (tmp / "store" / f"chunk_{index:06d}.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 16)
    return prepare


def _truncated_header(src_key: str):
    def prepare(ws, tmp):
        shutil.copytree(ws[src_key], tmp / "store")
        h = tmp / "store" / "header.h5"
        h.write_bytes(h.read_bytes()[:300])
    return prepare


def _garbage_kld_payload(ws, tmp):
    from ggufopt_ray.store.llamacpp_kld import read_kld_base

    kf = read_kld_base(ws["kld"])
    raw = bytearray(Path(ws["kld"]).read_bytes())
    start = 20 + kf.tokens.nbytes
    raw[start:] = np.random.default_rng(1).integers(0, 256, len(raw) - start, dtype=np.uint8).tobytes()
    (tmp / "garbage.kld").write_bytes(bytes(raw))


def _truncated_kld(ws, tmp):
    (tmp / "short.kld").write_bytes(Path(ws["kld"]).read_bytes()[:-7])


def _a_file(name: str, text: str = "not a model\n"):
    def prepare(ws, tmp):
        (tmp / name).write_text(text)
    return prepare


def _exported_file(ws, tmp):
    shutil.copy(ws["kld"], tmp / "out.kld")


LOGITS = ["ggufopt", "logits", "{model}", "--text-file", "{text}", "--ctx", "64", "--threads", "1"]
BENCH = ["ggufopt", "bench", "{model}", "--baseline", "{base}", "--threads", "1"]
ZFP = ["ggufopt", "zfp", "{model}"]

SWEEP_COMMON = ["output_dir={tmp}/out", "cache_dir={tmp}/cache", "cluster.dashboard=false", "dataset.eval_chunks=2",
                "dataset.calib_chunks=1"]


def _other_sweep_in_output(ws, tmp):
    """The run directory of an earlier sweep with other quant types (its identity and a result)."""
    import json

    from ggufopt_ray.config import SweepConfig
    from ggufopt_ray.run_dir import sweep_identity

    cfg = SweepConfig()
    cfg.search.types = ["Q2_K"]
    (tmp / "out").mkdir()
    (tmp / "out" / "identity.json").write_text(json.dumps(sweep_identity(cfg)))
    (tmp / "out" / "results.csv").write_text("label\nQ2_K\n")


def _foreign_results_in_output(ws, tmp):
    (tmp / "out" / "ray_results").mkdir(parents=True)


CASES = [
    # ggufopt logits
    Case("logits-missing-model", ["ggufopt", "logits", "{tmp}/nope.gguf", "--text-file", "{text}", "-o", "{tmp}/s"],
         r"nope\.gguf does not exist", absent=("{tmp}/s",)),
    Case("logits-not-gguf", ["ggufopt", "logits", "{tmp}/m.gguf", "--text-file", "{text}", "-o", "{tmp}/s"],
         r"m\.gguf is not a GGUF file", absent=("{tmp}/s",), prepare=_a_file("m.gguf")),
    Case("logits-missing-text", ["ggufopt", "logits", "{model}", "--text-file", "{tmp}/none.txt", "-o", "{tmp}/s"],
         r"text file .*none\.txt does not exist", absent=("{tmp}/s",)),
    Case("logits-ctx-too-long", LOGITS[:5] + ["--ctx", "4096", "-o", "{tmp}/s"],
         r"--ctx 4096 is longer than the model's training context", absent=("{tmp}/s",)),
    Case("logits-first-too-late", LOGITS + ["--first", "63", "-o", "{tmp}/s"],
         r"--first 63 leaves nothing to score", absent=("{tmp}/s",)),
    Case("logits-bad-encoding", LOGITS + ["--encoding", "bogus", "-o", "{tmp}/s"],
         r"bogus", absent=("{tmp}/s",)),
    Case("logits-bad-range", LOGITS + ["--from", "5", "--to", "2", "-o", "{tmp}/s"],
         r"chunk range --from 5 --to 2", absent=("{tmp}/s",)),
    Case("logits-output-is-a-file", LOGITS + ["-o", "{tmp}/f"], r"f is a file, not a baseline store folder",
         prepare=_a_file("f", "x")),
    Case("logits-output-below-a-file", LOGITS + ["-o", "{tmp}/f/store"], r"cannot write .*f/store \(Not a directory\)",
         prepare=_a_file("f", "x")),
    Case("logits-other-identity", LOGITS + ["--to", "1", "--encoding", "exact", "-o", "{tmp}/store"],
         r"store was made with encoding='float16', not 'exact'.*--overwrite", prepare=_copy_store("base")),
    Case("logits-damaged-header", LOGITS + ["--to", "1", "-o", "{tmp}/store"],
         r"header\.h5 is damaged .*--overwrite", prepare=_truncated_header("base")),
    Case("logits-disk-full", LOGITS + ["--to", "1", "-o", "{tmp}/s"],
         r"cannot write .*chunk_000000\.h5 \(File too large\); free disk space", file_limit=24 << 10,
         absent=("{tmp}/s/chunk_000000.h5",)),
    # ggufopt bench
    Case("bench-no-baseline", BENCH[:3] + ["--baseline", "{tmp}/none", "-o", "{tmp}/r"],
         r"none is not a baseline store", absent=("{tmp}/r",)),
    Case("bench-baseline-is-results", BENCH[:3] + ["--baseline", "{results}", "-o", "{tmp}/r"],
         r"holds a 'results' store, not a 'baseline' store", absent=("{tmp}/r",)),
    Case("bench-other-vocabulary", ["ggufopt", "bench", "{other_vocab}", "--baseline", "{base}", "-o", "{tmp}/r"],
         r"another vocabulary than the baseline", absent=("{tmp}/r",)),
    Case("bench-other-model-same-tokenizer",
         ["ggufopt", "bench", "{other_model}", "--baseline", "{base}", "-o", "{tmp}/r"],
         r"is not made from the model of the baseline", absent=("{tmp}/r",)),
    Case("bench-to-chunk-outside", BENCH + ["--to-chunk", "100000", "-o", "{tmp}/r"],
         r"--to-chunk 100000 is outside the baseline's", absent=("{tmp}/r",)),
    Case("bench-to-chunk-not-computed", BENCH + ["--to-chunk", "5", "-o", "{tmp}/r"],
         r"needs baseline chunks up to 5, but .* has 0\.\.1", absent=("{tmp}/r",)),
    Case("bench-keep-without-store", BENCH + ["--keep", "2", "-o", "{tmp}/r"],
         r"--keep bounds --candidate-store", absent=("{tmp}/r",)),
    Case("bench-damaged-header", BENCH[:3] + ["--baseline", "{tmp}/store", "-o", "{tmp}/r"],
         r"header\.h5 is damaged", absent=("{tmp}/r",), prepare=_truncated_header("base")),
    Case("bench-garbage-chunk", BENCH[:3] + ["--baseline", "{tmp}/store", "-o", "{tmp}/r"],
         r"chunk_000000\.h5 is damaged .*ggufopt logits", prepare=_garbage_chunk("base", 0),
         absent=("{tmp}/r/chunk_000000.h5",)),
    Case("bench-disk-full", BENCH + ["-o", "{tmp}/r"], r"cannot write .*r.*\(File too large\)",
         file_limit=4 << 10, absent=("{tmp}/r/chunk_000000.h5",)),
    # ggufopt kld-base
    Case("kld-import-garbage-payload", ["ggufopt", "kld-base", "import", "{tmp}/garbage.kld", "--model", "{model}",
                                        "-o", "{tmp}/s"],
         r"garbage\.kld: chunk 0 is not valid log-probabilities", absent=("{tmp}/s",), prepare=_garbage_kld_payload),
    Case("kld-import-truncated", ["ggufopt", "kld-base", "import", "{tmp}/short.kld", "--model", "{model}",
                                  "-o", "{tmp}/s"],
         r"short\.kld has .* bytes but its header", absent=("{tmp}/s",), prepare=_truncated_kld),
    Case("kld-import-other-vocabulary", ["ggufopt", "kld-base", "import", "{kld}", "--model", "{other_vocab}",
                                         "-o", "{tmp}/s"],
         r"has a vocabulary of 1024 tokens but .* has 512", absent=("{tmp}/s",)),
    Case("kld-export-float16", ["ggufopt", "kld-base", "export", "{base}", "-o", "{tmp}/out.kld"],
         r"encoded as float16; llama-perplexity reads only llamacpp_uint16", absent=("{tmp}/out.kld",)),
    Case("kld-export-zero-chunks", ["ggufopt", "kld-base", "export", "{base_u16}", "--chunks", "0",
                                    "-o", "{tmp}/out.kld"],
         r"--chunks 0 is outside 1\.\.", absent=("{tmp}/out.kld",)),
    Case("kld-export-missing-chunks", ["ggufopt", "kld-base", "export", "{base_u16}", "-o", "{tmp}/out.kld"],
         r"lacks .* chunks to export", absent=("{tmp}/out.kld",)),
    Case("kld-export-exists", ["ggufopt", "kld-base", "export", "{base_u16}", "--chunks", "2", "-o", "{tmp}/out.kld"],
         r"out\.kld exists; pass --overwrite", prepare=_exported_file),
    Case("kld-export-missing-folder", ["ggufopt", "kld-base", "export", "{base_u16}", "--chunks", "2",
                                       "-o", "{tmp}/no/out.kld"],
         r"cannot write .*out\.kld .*folder does not exist", absent=("{tmp}/no",)),
    Case("kld-export-disk-full", ["ggufopt", "kld-base", "export", "{base_u16}", "--chunks", "2",
                                  "-o", "{tmp}/out.kld"],
         r"cannot write .*out\.kld \(File too large\); free disk space", file_limit=16 << 10,
         absent=("{tmp}/out.kld",)),
    # ggufopt zfp
    Case("zfp-huge-rate", ZFP + ["--rate", "1e9", "-o", "{tmp}/z.gguf"], r"rate 1e\+09 is above zfp's useful maximum",
         absent=("{tmp}/z.gguf",)),
    Case("zfp-zero-rate", ZFP + ["--rate", "0", "-o", "{tmp}/z.gguf"], r"rate must be a positive number",
         absent=("{tmp}/z.gguf",)),
    Case("zfp-nan-rate", ZFP + ["--rate", "nan", "-o", "{tmp}/z.gguf"], r"rate must be a positive number",
         absent=("{tmp}/z.gguf",)),
    Case("zfp-unknown-mode", ZFP + ["--mode", "bogus", "-o", "{tmp}/z.gguf"], r"unknown ZFP mode 'bogus'",
         absent=("{tmp}/z.gguf",)),
    Case("zfp-bad-dims", ZFP + ["--rate", "8", "--dims", "9", "-o", "{tmp}/z.gguf"], r"dims must be 1, 2, 3 or 4",
         absent=("{tmp}/z.gguf",)),
    Case("zfp-precision-missing", ZFP + ["--mode", "precision", "-o", "{tmp}/z.gguf"], r"needs a precision",
         absent=("{tmp}/z.gguf",)),
    Case("zfp-precision-too-high", ZFP + ["--mode", "precision", "--precision", "65", "-o", "{tmp}/z.gguf"],
         r"precision must be an integer number of bit planes in 1\.\.64", absent=("{tmp}/z.gguf",)),
    Case("zfp-bad-regex", ZFP + ["--rate", "8", "--include", "(", "-o", "{tmp}/z.gguf"], r"bad tensor-name regex",
         absent=("{tmp}/z.gguf",)),
    Case("zfp-missing-folder", ZFP + ["--rate", "8", "-o", "{tmp}/no/z.gguf"], r"output folder .*no does not exist",
         absent=("{tmp}/no",)),
    Case("zfp-disk-full", ZFP + ["--rate", "8", "-o", "{tmp}/z.gguf"], r"cannot write .*z\.gguf \(.*\); free disk space",
         file_limit=64 << 10, absent=("{tmp}/z.gguf",)),
    # ggufopt stats
    Case("stats-not-a-store", ["ggufopt", "stats", "{tmp}"], r"is not a results store"),
    # -- the sweep: every setting is checked before Ray starts ----------------------------------
    *[Case(f"sweep-{name}", ["sweep", *SWEEP_COMMON, *args], needle, absent=("{tmp}/out/results.parquet",),
           prepare=prep, prefix="sweep: error: ") for name, args, needle, prep in [
        ("confidence", ["metrics.confidence=1.5"], r"metrics: confidence 1.5 must lie strictly between 0 and 1", None),
        ("margin", ["metrics.margin=-1"], r"metrics: margin -1.0 must be > 0", None),
        ("min-chunks", ["metrics.min_chunks=1"], r"metrics: min_chunks 1 must be at least 2", None),
        ("encoding", ["metrics.encoding=bogus"], r"unknown baseline encoding 'bogus'", None),
        ("scored-from", ["metrics.scored_from=300"], r"metrics.scored_from=300 leaves nothing to score", None),
        ("ubatch", ["model.n_batch=128", "model.n_ubatch=256"], r"model.n_ubatch \(256\) must be between 1 and", None),
        ("ctx-too-long", ["model.n_ctx=4096", "model.n_batch=4096", "model.n_ubatch=512"],
         r"longer than the model's training context", None),
        ("unknown-type", ["search.types=[Q9_X]"], r"Q9_X", None),
        ("iq-without-imatrix", ["search.types=[IQ2_XS]"], r"need an importance matrix.*search.imatrix=true", None),
        ("zfp-dims", ["search=zfp", "search.zfp_dims=[9]"], r"search.zfp_dims \[9\] are not ZFP layouts", None),
        ("zfp-rate", ["search=zfp", "search.zfp_rates=[0]"], r"rate must be a positive number", None),
        ("zfp-huge-rate", ["search=zfp", "search.zfp_rates=[1e9]"], r"above zfp's useful maximum", None),
        ("bub-range", ["search=bub", "search.bub_min_log2=8", "search.bub_max_log2=5"],
         r"search.bub_min_log2 \(8\) must be between 0 and search.bub_max_log2", None),
        ("mix-group", ["search=quant_mix", "search.mix_groups=[attn_z]"], r"unknown tensor group", None),
        ("mix-budget", ["search=quant_mix", "search.target_bpw=1.0"], r"search.target_bpw=1 is below the smallest mix", None),
        ("allocate-optuna", ["search=allocate", "search.mode=optuna"], r"use search.mode=grid", None),
        ("allocate-link", ["search=allocate", "search.link_powers=[2]"],
         r"search.link_powers must list numbers in \[0, 1\] \(1: KLDs add, 0: log KLDs add\), not \[2", None),
        ("calmix-iq-base", ["search=calibration_mix", "search.base_type=IQ2_XS"],
         r"no-imatrix reference is impossible; choose a K-quant", None),
        ("calmix-objective", ["search=calibration_mix", "search.language_objective=best"],
         r"search.language_objective must be one of worst, mean, pooled", None),
        ("calmix-one-language", ["search=calibration_mix", "dataset.langs=[en]"],
         r"needs calibration chunks of at least two languages", None),
        ("object-store-min", ["cluster.object_store_gib=0.01"], r"cluster.object_store_gib=0.01 is below Ray's minimum",
         None),
        # The memory plan: a baseline bigger than the object store is refused with settings that fit.
        ("baseline-too-big", ["cluster.object_store_gib=0.075", "metrics.encoding=exact", "model.n_ctx=1024",
                              "model.n_batch=1024", "model.n_ubatch=512", "dataset.eval_chunks=40",
                              "dataset.langs=[en,code]"],
         r"the exact baseline needs 0\.08 GiB, more than the object store's 0\.07 GiB at vocabulary 1,024; use "
         r"metrics.encoding=compact, dataset.eval_chunks<=38", None),
        ("scheduler", ["search.scheduler=hyperband"], r"search.scheduler must be none, asha or median", None),
        ("stale-output", [], r"holds a sweep with other settings: .*search.types", _other_sweep_in_output),
        ("unknown-output", [], r"holds results of an unknown sweep", _foreign_results_in_output),
        ("unwritable-output", ["output_dir={tmp}/afile/out"], r"cannot create output_dir .*afile/out", _a_file("afile")),
    ]],
]


# -- workspace --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model) -> dict:
    from ggufopt_ray.cli import main as cli
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    d = tmp_path_factory.mktemp("bad-inputs")
    other_vocab = write_synthetic_model(d / "other-vocab.gguf", SynthSpec(seed=0, n_vocab=512))
    other_model = write_synthetic_model(d / "other-model.gguf", SynthSpec(seed=0, n_layer=1))
    common = ["--text-file", str(TEXT), "--ctx", "64", "--threads", "1", "--to", "1"]
    assert cli(["logits", str(tiny_model), *common, "-o", str(d / "base")]) == 0
    assert cli(["logits", str(tiny_model), *common, "--encoding", "llamacpp_uint16", "-o", str(d / "base_u16")]) == 0
    assert cli(["kld-base", "export", str(d / "base_u16"), "--chunks", "2", "-o", str(d / "base.kld")]) == 0
    assert cli(["bench", str(tiny_model), "--baseline", str(d / "base"), "--threads", "1",
                "-o", str(d / "results")]) == 0
    return {"model": tiny_model, "other_vocab": other_vocab, "other_model": other_model, "text": TEXT,
            "base": d / "base", "base_u16": d / "base_u16", "kld": d / "base.kld", "results": d / "results"}


def _run(case: Case, ws: dict, tmp: Path) -> subprocess.CompletedProcess:
    paths = {k: str(v) for k, v in ws.items()} | {"tmp": str(tmp)}
    argv = PROGRAMS[case.argv[0]] + [a.format(**paths) for a in case.argv[1:]]
    limit = case.file_limit

    def preexec():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp, preexec_fn=preexec)


def test_the_table_is_big_enough_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing_half_made(case: Case, ws, tmp_path):
    tmp = tmp_path / "case"
    tmp.mkdir()
    if case.prepare is not None:
        case.prepare(ws, tmp)
    proc = _run(case, ws, tmp)
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    prefix = case.prefix if case.prefix is not None else f"ggufopt {case.argv[1]}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(case.needle, lines[0]), (case.needle, lines[0])
    paths = {k: str(v) for k, v in ws.items()} | {"tmp": str(tmp)}
    for pattern in case.absent:
        assert not Path(pattern.format(**paths)).exists(), f"{pattern} was left behind"
    leftovers = [p for p in tmp.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert not leftovers, leftovers
