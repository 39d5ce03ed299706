"""Which calibration mix protects every domain: the calibration-mix search on the trained model.

    python bench/calibration_mix.py [--quick] [--json PATH] [--base-type Q3_K_S]

The trained model's held-out corpus (../shared/models/corpus/eval.txt) is split by its manifest
into two domains: Python code (``*.py`` documents) and prose (licences and documentation). One
sweep with ``search=calibration_mix`` and ``dataset=local`` over the two files quantizes
``--base-type`` with importance matrices from weightings of the two domains' calibration chunks
(and without one), and judges every candidate on the held-out evaluation chunks of each domain,
all chunks for all candidates (early stopping off, so the comparisons are paired and equal).
``--quick``: the built-in synthetic model and the built-in English/code corpus, few chunks.

JSON keys: ``worst_language_kld`` for ``no_imatrix``, each ``single`` domain, ``uniform`` and
``best_mix`` (each ``{label, value, se, worst_language}``, SE with chunks as sampling units), and
``gain_vs_uniform`` (1 - best / uniform of the worst-domain mean KLD) with ``gain_vs_uniform_se``
from a paired bootstrap over chunks (each domain's chunks resampled, the same draw for both).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "models"
RECORD_END = "\x1e\n"


def split_corpus(corpus: Path, out: Path) -> dict[str, int]:
    """eval.txt -> code.txt (``*.py`` documents) and prose.txt (the rest), by the manifest."""
    docs = corpus.joinpath("eval.txt").read_text(encoding="utf-8").split(RECORD_END)[:-1]
    paths = [p for p in corpus.joinpath("eval.manifest.txt").read_text(encoding="utf-8").splitlines() if p.strip()]
    if len(paths) != len(docs):
        raise SystemExit(f"{corpus}: {len(docs)} documents but {len(paths)} manifest lines")
    domains: dict[str, list[str]] = {"code": [], "prose": []}
    for path, doc in zip(paths, docs):
        domains["code" if path.endswith(".py") else "prose"].append(doc)
    for name, texts in domains.items():
        (out / f"{name}.txt").write_text("\n\n".join(texts), encoding="utf-8")
    return {name: len(texts) for name, texts in domains.items()}


def per_language_chunk_means(row: dict) -> dict[str, np.ndarray]:
    """Each evaluation chunk's mean KLD, grouped by the chunk's language, from the results store."""
    import h5py

    from ggufopt_ray.store.results import ResultsStore

    store = ResultsStore.open(row["results_store"])
    with h5py.File(Path(row["results_store"]) / "header.h5", "r") as f:
        langs = json.loads(f.attrs["langs"])
    out: dict[str, list[float]] = {}
    for i in range(int(row["chunks"])):
        out.setdefault(langs[i], []).append(float(np.mean(store.read(i)["kld"], dtype=np.float64)))
    return {k: np.asarray(v) for k, v in out.items()}


def paired_gain(best: dict, uniform: dict, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """1 - worst(best) / worst(uniform) of per-domain mean KLD (equal-length chunks: the mean of
    chunk means), and its bootstrap SE resampling each domain's chunks with one draw for both."""
    b, u = per_language_chunk_means(best), per_language_chunk_means(uniform)
    rng = np.random.default_rng(seed)
    gains = np.empty(n_boot)
    for k in range(n_boot):
        wb, wu = 0.0, 0.0
        for lang in b:
            idx = rng.integers(0, len(b[lang]), len(b[lang]))
            wb, wu = max(wb, b[lang][idx].mean()), max(wu, u[lang][idx].mean())
        gains[k] = 1.0 - wb / wu
    point = 1.0 - max(v.mean() for v in b.values()) / max(v.mean() for v in u.values())
    return float(point), float(gains.std(ddof=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the built-in synthetic model and corpus, few chunks (~1 min)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--base-type", default="Q3_K_S", help="the quant type the imatrices are for (default Q3_K_S)")
    ap.add_argument("--work", help="work folder (default: a new temporary one); reusing one reuses its cache")
    ap.add_argument("--levels", default=None,
                    help="weight levels per domain, comma-separated (default 0,1,2,3; --quick 0,1)")
    args = ap.parse_args(argv)

    from ggufopt_ray.config import SweepConfig
    from ggufopt_ray.distributed.runtime import start_ray
    from ggufopt_ray.searches import make_search, search_config
    from ggufopt_ray.sweep import run_sweep

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-calibration-mix-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = SweepConfig()
    cfg.cache_dir = str(work / "cache")
    cfg.cluster.num_cpus, cfg.cluster.dashboard = 2, False
    cfg.metrics.early_stopping = False
    levels = [float(x) for x in (args.levels or ("0,1" if args.quick else "0,1,2,3")).split(",")]
    if args.quick or not (SHARED / "tinycode-a-f16.gguf").exists():
        if not args.quick:
            print(f"note: {SHARED / 'tinycode-a-f16.gguf'} not found; using the built-in model", file=sys.stderr)
        model_name, domains = "built-in synthetic (vocab 1024)", {"en": 0, "code": 0}
        cfg.dataset.langs = ["en", "code"]
        cfg.dataset.eval_chunks, cfg.dataset.calib_chunks = 8, 4
    else:
        model_name = "tinycode-a-f16 (trained, vocab 8192)"
        domains = split_corpus(SHARED / "corpus", work)
        cfg.model.path = str(SHARED / "tinycode-a-f16.gguf")
        cfg.model.n_ctx = cfg.model.n_batch = cfg.model.n_ubatch = 256
        cfg.dataset.source, cfg.dataset.path, cfg.dataset.langs = "local", str(work / "{lang}.txt"), ["code", "prose"]
        cfg.dataset.eval_chunks, cfg.dataset.calib_chunks = 32, 16
    cfg.search = search_config("calibration_mix", base_type=args.base_type, mix_levels=levels)
    start_ray(cfg.cluster)
    t0 = time.perf_counter()
    cfg.overwrite = True  # a reused work folder: the results stores in its cache are reused
    result = run_sweep(cfg, work / "sweep", log=lambda m: print(m, file=sys.stderr))
    seconds = time.perf_counter() - t0
    notes = json.loads((work / "sweep" / "sweep.json").read_text())["search"]
    by_label = {r["label"]: r for r in result.rows}
    single = notes["single_languages"]
    refs = notes["references"]
    best, uniform = notes["best"], refs.get("uniform")
    gain, gain_se = (paired_gain(by_label[best["label"]], by_label[uniform["label"]])
                     if uniform else (None, None))
    search = make_search(cfg.search)  # its value_of: the objective with its SE, as the sweep's notes give it
    values = {r["label"]: search.value_of(r) for r in result.rows if r.get("worst_language_kld") is not None}
    mixes = {k: v for k, v in values.items() if "imatrix " in k}
    best_imx = min(mixes.values(), key=lambda v: v["value"]) if mixes else None
    gain_imx, gain_imx_se = (paired_gain(by_label[best_imx["label"]], by_label[uniform["label"]])
                             if uniform and best_imx else (None, None))
    out = {
        "model": model_name, "base_type": args.base_type, "n_ctx": cfg.model.n_ctx,
        "eval_chunks": cfg.dataset.eval_chunks, "calib_chunks": cfg.dataset.calib_chunks,
        "domains": notes["languages"], "documents_per_domain": domains, "mix_levels": levels,
        "candidates": len(result.rows), "sweep_seconds": round(seconds, 1),
        "worst_language_kld": {"no_imatrix": refs.get("no_imatrix"), "single": single,
                               "uniform": uniform, "best_mix": best, "best_imatrix_mix": best_imx,
                               "all": sorted(values.values(), key=lambda v: v["value"])},
        "gain_vs_uniform": gain, "gain_vs_uniform_se": gain_se,
        "best_imatrix_mix_gain_vs_uniform": gain_imx, "best_imatrix_mix_gain_vs_uniform_se": gain_imx_se,
        "gain_vs_no_imatrix": (1.0 - best["value"] / refs["no_imatrix"]["value"]) if refs.get("no_imatrix") else None,
    }
    print(f"calibration mixes for {args.base_type} on {model_name}, {cfg.dataset.eval_chunks} evaluation chunks "
          f"of {cfg.model.n_ctx} over {', '.join(notes['languages'])}:")
    print("| candidate | worst-domain mean KLD ± SE | worst domain |")
    print("|---|---:|---|")
    for v in sorted(values.values(), key=lambda v: v["value"]):
        print(f"| {v['label']} | {v['value']:.5f} ± {v['se']:.5f} | {v['worst_language']} |")
    if gain is not None:
        print(f"gain_vs_uniform = {gain:+.4f} ± {gain_se:.4f} (best {best['label']})")
    if gain_imx is not None:
        print(f"best imatrix mix {best_imx['label']}: gain vs uniform {gain_imx:+.4f} ± {gain_imx_se:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
