"""Recommendations per size class, the --tensor-type-file llama-quantize reads, the model card."""

from __future__ import annotations

import math
import shlex

import pytest

from ggufopt_ray.allocate.groups import build_groups, overrides_for
from ggufopt_ray.allocate.recommend import (Candidate, SizeClass, llama_quantize_command, model_card_table,
                                            parse_tensor_type_file, recommend, tensor_type_file_text)
from ggufopt_ray.errors import UserError


def cands():
    return [
        Candidate("Q4_K_M", nbytes=4_000, n_params=8_000, kld_mean=0.050, base_type="Q4_K_M"),
        Candidate("mix-a", nbytes=3_900, n_params=8_000, kld_mean=0.030, kld_mean_se=0.001),
        Candidate("mix-b", nbytes=4_990, n_params=8_000, kld_mean=0.020),
        Candidate("Q5_K_M", nbytes=5_000, n_params=8_000, kld_mean=0.025),
        Candidate("Q8_0", nbytes=8_500, n_params=8_000, kld_mean=0.002),
    ]


def test_best_measured_fit_per_class_not_the_largest_file():
    classes = [SizeClass("tiny", 1_000), SizeClass("Q4_K_M-sized", 4_000), SizeClass("Q5_K_M-sized", 5_000)]
    recs = recommend(cands(), classes)
    assert recs[0].candidate is None and recs[0].n_fitting == 0
    assert recs[1].candidate.label == "mix-a"  # smaller than Q4_K_M and better
    assert recs[2].candidate.label == "mix-b" and recs[2].n_fitting == 4  # not Q5_K_M, the largest that fits
    # ties on KLD go to the smaller file
    tie = [Candidate("big", 900, 1000, 0.01), Candidate("small", 800, 1000, 0.01)]
    assert recommend(tie, [SizeClass("x", 1000)])[0].candidate.label == "small"


def test_tensor_type_file_is_what_llama_quantize_parses():
    names = [f"blk.{i}.{k}.weight" for i in range(4) for k in ("attn_q", "ffn_down")] + ["output.weight"]
    groups = build_groups(names, 4, 2)
    overrides = overrides_for(groups, {g.name: "q6_k" for g in groups})
    text = tensor_type_file_text(overrides)
    lines = text.splitlines()
    assert len(lines) == len(groups) and text.endswith("\n")
    assert all(line.count("=") == 1 and line.endswith("=Q6_K") for line in lines)
    # llama-quantize reads whitespace-separated words, splits each at the first '=', lower-cases the pattern
    assert [w.partition("=")[0].lower() for w in text.split()] == [g.pattern for g in groups]
    assert parse_tensor_type_file(text) == overrides
    for bad, why in [("ATTN_Q=Q8_0", "lower-cases"), ("a b=Q8_0", "whitespace"), ("# note", "PATTERN=TYPE"),
                     ("a=b=Q8_0", "first '='")]:
        with pytest.raises(UserError, match=why):
            tensor_type_file_text([bad])


def test_command_line_round_trips_through_a_shell():
    cmd = llama_quantize_command("/m/model f16.gguf", "/out/x.gguf", "Q8_0", tensor_type_file="/out/x.types.txt",
                                 imatrix="/m/imatrix.gguf")
    assert shlex.split(cmd) == ["llama-quantize", "--imatrix", "/m/imatrix.gguf", "--tensor-type-file",
                                "/out/x.types.txt", "/m/model f16.gguf", "/out/x.gguf", "Q8_0"]


def test_model_card_table():
    summary = {"kld_mean": 0.0301, "kld_mean_se": 0.0012, "kld_p99": 0.41, "same_top": 0.9312,
               "ln_ppl_ratio": math.log(1.0123)}
    c = Candidate.from_summary("model-mix-Q4.gguf", nbytes=3 * 2**30, n_params=6 * 2**30, summary=summary)
    assert c.bits_per_weight == 4.0 and c.ppl_ratio == pytest.approx(1.0123)
    recs = recommend([c], [SizeClass("Q4_K_M-sized", 4 * 2**30), SizeClass("Q2_K-sized", 2**30)])
    table = model_card_table(recs)
    rows = table.splitlines()
    assert rows[0].startswith("| size class | file | size | bpw | mean KLD ± SE | p99 KLD | same top | PPL ratio |")
    cells = [x.strip() for x in rows[2].strip("|").split("|")]
    assert cells == ["Q4_K_M-sized", "model-mix-Q4.gguf", "3.00 GiB", "4.000", "0.03010 ± 0.00120", "0.4100",
                     "93.12%", "1.0123"]
    assert "nothing measured fits 1.00 GiB" in rows[3]
    plain = model_card_table([Candidate("Q8_0", 2**20, 2**20, 0.002)])  # candidates without classes
    assert "| Q8_0 | 1.0 MiB | 8.000 | 0.00200 | – | – | – |" in plain
    # a very good file keeps its digits: two significant ones of the SE, three of the p99
    good = Candidate.from_summary("Q8_0", nbytes=2**20, n_params=2**20,
                                  summary={**summary, "kld_mean": 4.87e-5, "kld_mean_se": 1.23e-6, "kld_p99": 3.14e-4})
    cells = [x.strip() for x in model_card_table([good]).splitlines()[2].strip("|").split("|")]
    assert cells[4:6] == ["0.0000487 ± 0.0000012", "0.000314"]
