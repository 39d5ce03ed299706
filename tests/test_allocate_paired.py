"""The paired (ratio) estimate of a candidate's mean KLD on its reference's chunks, against closed-form
truth: chunk effects that are multiplicative cancel exactly; too little overlap falls back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ggufopt_ray.allocate.paired import chunk_means, paired_mean, reference_mean


def test_multiplicative_chunk_effects_cancel_whatever_chunks_the_candidate_saw():
    rng = np.random.default_rng(3)
    difficulty = rng.lognormal(0.0, 0.7, 16)  # chunks differ ~2x, as on a real corpus
    reference = {i: 0.0015 * d for i, d in enumerate(difficulty)}
    true_ref = float(np.mean(0.0015 * difficulty))
    assert reference_mean(reference) == pytest.approx(true_ref, rel=1e-12)
    for subset in ([0, 1, 2, 3, 9, 10], [0, 1, 2, 3, 13, 14, 15], list(range(16))):
        cand = {i: 0.92 * reference[i] for i in subset}  # 8% better than the reference on every chunk
        assert paired_mean(cand, reference) == pytest.approx(0.92 * true_ref, rel=1e-12)
        # the candidate's own mean depends on which chunks it saw; the paired one does not
        own = float(np.mean([cand[i] for i in subset]))
        if len(subset) < 16:
            assert abs(own / (0.92 * true_ref) - 1) > 0.01


def test_too_few_shared_chunks_or_no_chunk_values_give_none():
    reference = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    assert paired_mean({0: 1.0, 1: 2.0, 7: 9.0}, reference) is None  # two shared chunks < 3
    assert paired_mean({0: 1.0, 1: 2.0, 7: 9.0}, reference, min_common=2) == pytest.approx(2.5)
    assert paired_mean({0: 1.0, 1: 1.0, 2: 1.0}, {}) is None
    assert paired_mean({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0}) is None


def test_chunk_means_reads_the_rows_field_and_tolerates_rows_without_it():
    row = {"chunk_kld": json.dumps({"0": 0.5, "12": 0.25})}
    assert chunk_means(row) == {0: 0.5, 12: 0.25}
    assert chunk_means({}) == {} and chunk_means({"chunk_kld": float("nan")}) == {}
    assert chunk_means({"chunk_kld": "not json"}) == {}


def test_the_allocators_reference_sees_every_chunk_and_the_search_asks_for_chunk_values(tiny_model):
    """The base type is planned with every_chunk (the stop rule is asked, for racing's board, and
    ignored); other stock types and singles stop as usual."""
    from ggufopt_ray.evaluation import never_stop
    from ggufopt_ray.searches import make_search, search_config
    from ggufopt_ray.searches.base import SearchFacts

    cfg = search_config("allocate")
    cfg.types, cfg.n_bands = ["Q3_K", "Q8_0"], 1
    search = make_search(cfg).prepare(SearchFacts(model_path=str(tiny_model), n_layer=2, n_ctx=128, n_calib=0),
                                      log=lambda *a: None)
    assert search.chunk_values
    plans = {p.label: p for p in map(search.plan, search.grid())}
    assert plans["Q4_K_M"].every_chunk
    assert not plans["Q3_K_M"].every_chunk and not plans["Q5_K_M"].every_chunk
    assert not any(p.every_chunk for label, p in plans.items() if "[" in label)

    asked = []

    def stop_now(per_chunk):
        asked.append(len(per_chunk))
        return True, "dominated_by=X"

    rule = never_stop(stop_now)
    assert [rule([{}] * k) for k in (1, 2, 3)] == [(False, "all_chunks")] * 3 and asked == [1, 2, 3]
