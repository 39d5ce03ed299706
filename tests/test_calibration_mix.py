"""The calibration-mix search: mixes made of per-language collections, and a real sweep over two
languages whose answer (best mix, references, gain) is checked against the per-chunk results.

Numbers are compared with independent computations: the imatrix of a mix with a collection on the
mix's chunks (``collect_imatrix`` on the listed chunks), each language's mean KLD with the
per-token results in the results stores.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import small_sweep_config
from ggufopt_ray.calibration import combine_parts, mix_file_label, mix_label, mix_parts, normalize_mix
from ggufopt_ray.candidates import Recipe
from ggufopt_ray.engine.imatrix import Imatrix, ImatrixEntry, collect_imatrix, load_imatrix
from ggufopt_ray.errors import UserError

BUILTIN = Path(__file__).resolve().parents[1] / "ggufopt_ray" / "data" / "builtin"


# -- plain arithmetic ------------------------------------------------------------------------------
def test_normalize_mix_gives_proportions_and_drops_zeros():
    assert normalize_mix({"en": 2, "code": 2, "de": 0}) == (("code", 0.5), ("en", 0.5))
    assert normalize_mix({"en": 1, "code": 2}) == (("code", 0.6667), ("en", 0.3333))
    assert normalize_mix({"en": 0, "code": 0}) == ()
    with pytest.raises(UserError, match=">= 0"):
        normalize_mix({"en": -1})
    assert mix_label((("code", 0.6667), ("en", 0.3333))) == "code66.7+en33.3"
    assert mix_file_label((("my lang/x", 1.0),)) == "mylangx100"


def test_mix_parts_take_each_languages_first_chunks():
    langs = ["en", "code", "de", "en", "code", "de", "en", "code"]
    parts = mix_parts((("code", 0.5), ("en", 0.5)), 4, langs)
    assert [(p.lang, p.indices, p.chunks, p.factor) for p in parts] == [("code", (1, 4), 2.0, 1.0),
                                                                       ("en", (0, 3), 2.0, 1.0)]
    (en,) = mix_parts((("en", 1.0),), 1, langs)
    assert en.indices == (0,) and en.factor == 1.0
    # 1.5 chunks each of German and English: their first 2 chunks, each weighted 0.75
    frac = mix_parts((("de", 0.5), ("en", 0.5)), 3, langs)
    assert [(p.indices, p.factor) for p in frac] == [((2, 5), 0.75), ((0, 3), 0.75)]
    # more chunks than the language has: all of them, each weighted more
    (de,) = mix_parts((("de", 1.0),), 6, langs)
    assert de.indices == (2, 5) and de.factor == 3.0 and de.extrapolated
    with pytest.raises(UserError, match="names 'fr'.*add it to dataset.langs"):
        mix_parts((("fr", 1.0),), 2, langs)


def test_combined_importance_is_the_weighted_mean_of_squares():
    """Closed form: sums and counts scale with each part's factor; importance = sums / counts."""
    def im(sums, count):
        out = Imatrix()
        out.entries["blk.0.ffn_up.weight"] = ImatrixEntry(np.array([sums], dtype=np.float32),
                                                          np.array([count], dtype=np.int64))
        out.chunk_count = 2
        return out

    parts = mix_parts((("a", 0.25), ("b", 0.75)), 4, ["a", "b", "a", "b"])
    assert [(p.indices, p.chunks) for p in parts] == [((0,), 1.0), ((1, 3), 3.0)]
    a, b = im([2.0, 4.0], 10), im([6.0, 6.0], 20)
    a.chunk_count = 1
    mixed = combine_parts(parts, [a, b], label="mix:test")
    e = mixed.entries["blk.0.ffn_up.weight"]
    # a counts once (1 chunk of 1), b 1.5 times (3 chunks' worth of 2): sums 2+9, 4+9; counts 10+30
    np.testing.assert_allclose(e.sums[0], [11.0, 13.0])
    assert e.counts.tolist() == [40]
    assert mixed.chunk_count == 4 and "mix:test" in mixed.datasets
    with pytest.raises(ValueError, match="holds 2 chunks"):
        combine_parts(parts, [b, b], label="x")


def test_recipe_keeps_old_keys_and_round_trips_a_mix():
    plain = Recipe(kind="quant", ftype="Q4_K_M", imatrix_chunks=8)
    assert "imatrix_mix" not in plain.to_dict()  # recipes made before mixes keep their cache keys
    mixed = Recipe(kind="quant", ftype="Q4_K_M", imatrix_chunks=8, imatrix_mix=(("code", 0.5), ("en", 0.5)))
    back = Recipe.from_dict(json.loads(json.dumps(mixed.to_dict())))
    assert back == mixed and back.key() == mixed.key() != plain.key()
    assert mixed.file_label() == "Q4_K_M-imx8-code50-en50"
    with pytest.raises(UserError, match="total number of chunks"):
        Recipe(kind="quant", ftype="Q4_K_M", imatrix_mix=(("en", 1.0),)).validate()


# -- a real sweep ----------------------------------------------------------------------------------
LANGS = ["en", "code"]


@pytest.fixture(scope="module")
def mix_sweep(ray_local, tmp_path_factory):
    from ggufopt_ray.sweep import run_sweep

    root = tmp_path_factory.mktemp("calmix")
    for lang in LANGS:
        shutil.copy(BUILTIN / f"{lang}.txt", root / f"{lang}.txt")
    cfg = small_sweep_config(root / "cache", name="calibration_mix")
    cfg.dataset.source, cfg.dataset.path, cfg.dataset.langs = "local", str(root / "{lang}.txt"), LANGS
    cfg.dataset.eval_chunks, cfg.dataset.calib_chunks = 4, 4
    lines: list[str] = []
    result = run_sweep(cfg, root / "out", log=lines.append)
    return cfg, root, result, lines


def _language_means(row: dict) -> dict[str, float]:
    import h5py

    store = Path(row["results_store"])
    with h5py.File(store / "header.h5", "r") as f:
        langs = json.loads(f.attrs["langs"])
    values: dict[str, list[np.ndarray]] = {}
    for i, lang in enumerate(langs[:int(row["chunks"])]):
        with h5py.File(store / f"chunk_{i:06d}.h5", "r") as f:
            values.setdefault(lang, []).append(np.asarray(f["kld"], dtype=np.float64))
    return {lang: float(np.concatenate(v).mean()) for lang, v in values.items()}


@pytest.mark.slow
def test_calibration_mix_sweep_answers_with_the_worst_language(mix_sweep):
    cfg, root, result, lines = mix_sweep
    assert not result.errors
    labels = sorted(r["label"] for r in result.rows)
    assert labels == sorted(["Q3_K_S (no imatrix)", "Q3_K_S imatrix en100 (4 chunks)",
                             "Q3_K_S imatrix code100 (4 chunks)", "Q3_K_S imatrix code50+en50 (4 chunks)"])
    assert not any(r["fitted_to_budget"] for r in result.rows)  # every plan is what was sampled
    worst = {}
    for row in result.rows:
        means = _language_means(row)
        assert set(means) == set(LANGS)
        worst[row["label"]] = max(means.values())
        assert row["worst_language"] == max(means, key=means.get)
        assert row["worst_language_kld"] == pytest.approx(worst[row["label"]], rel=1e-6)
        assert row["language_mean_kld"] == pytest.approx(np.mean(list(means.values())), rel=1e-6)
        assert row["objective"] == pytest.approx(worst[row["label"]], rel=1e-6)  # the worst language is minimised
    # the imatrix matters: every mix differs from no imatrix
    plain = worst["Q3_K_S (no imatrix)"]
    assert all(v != plain for k, v in worst.items() if "imatrix " in k)
    notes = json.loads((root / "out" / "sweep.json").read_text())["search"]
    best = min(worst, key=worst.get)
    assert notes["best"]["label"] == best and notes["best"]["value"] == pytest.approx(worst[best], rel=1e-9)
    uniform = "Q3_K_S imatrix code50+en50 (4 chunks)"
    assert notes["references"]["uniform"]["label"] == uniform
    assert notes["references"]["reference_language"]["label"] == "Q3_K_S imatrix en100 (4 chunks)"
    assert notes["gain_vs_uniform"] == pytest.approx(1 - worst[best] / worst[uniform], rel=1e-9)
    assert set(notes["single_languages"]) == set(LANGS)
    assert any(line.startswith("calib    best mix") for line in lines)


@pytest.mark.slow
def test_the_uniform_mix_equals_a_collection_on_its_chunks(mix_sweep):
    """The sweep's uniform imatrix (2 English + 2 code chunks, each once) equals collect_imatrix on
    those four calibration chunks."""
    from ggufopt_ray.sweep import prepare_data

    cfg, root, result, _ = mix_sweep
    model = json.loads((root / "out" / "sweep.json").read_text())["provenance"]["model"]
    _, cal = prepare_data(cfg, Path(model), Path(cfg.cache_dir))
    assert sorted(cal.langs) == ["code", "code", "en", "en"]
    files = list((Path(cfg.cache_dir) / "imatrix").rglob(f"{cal.fingerprint}-mix*.gguf"))
    mixes = {f: load_imatrix(f) for f in files}
    (uniform,) = [im for im in mixes.values() if "mix:code50+en50" in im.datasets]
    direct = collect_imatrix(model, cal.chunks, n_threads=1)
    assert set(uniform.entries) == set(direct.entries)
    for name, e in uniform.entries.items():
        assert e.counts.tolist() == direct.entries[name].counts.tolist(), name
        np.testing.assert_allclose(e.sums, direct.entries[name].sums, rtol=2e-6, err_msg=name)
    # each language was collected once, with a snapshot per prefix: the first snapshot is the
    # collection on the language's first chunk alone
    root = Path(cfg.cache_dir) / "imatrix"
    for lang in ("en", "code"):
        snaps = sorted(root.rglob(f"{cal.fingerprint}-lang-{lang}100-*.gguf"))
        assert [load_imatrix(f).chunk_count for f in snaps] == [1, 2]
        first = next(c for c, label in zip(cal.chunks, cal.langs) if label == lang)
        one = collect_imatrix(model, [first], n_threads=1)
        for name, e in load_imatrix(snaps[0]).entries.items():
            np.testing.assert_allclose(e.sums, one.entries[name].sums, rtol=2e-6, err_msg=name)
    # single-language mixes were made from that language's chunks alone, weighted twice
    (en,) = [im for im in mixes.values() if "mix:en100" in im.datasets]
    en_chunks = [c for c, lang in zip(cal.chunks, cal.langs) if lang == "en"]
    direct_en = collect_imatrix(model, en_chunks, n_threads=1)
    for name, e in en.entries.items():
        np.testing.assert_allclose(e.sums, 2.0 * direct_en.entries[name].sums.astype(np.float64), rtol=2e-6)
        assert math.isclose(e.counts[0], 2 * direct_en.entries[name].counts[0])
