"""``search=bub``: the llama.cpp batch/ubatch pair that computes logits fastest, as trials.

The same machinery as ``ggufopt bub`` (:mod:`ggufopt_ray.tuning.bub`): the size ladder (powers of
two, plus n_ctx itself), the memory guard that drops configurations llama.cpp would not fit, the
measurement (median tokens/s over timed chunks after a warm-up) and the result cache. A sweep
answers from ``ggufopt bub``'s cached measurements, and leaves its own in the same cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ggufopt_ray.config import SearchConfig
from ggufopt_ray.errors import UserError
from ggufopt_ray.searches.base import Search, register_search
from ggufopt_ray.tuning import bub


@dataclass
class BubSearchConfig(SearchConfig):
    name: str = "bub"
    bub_min_log2: int = 4  # smallest batch/ubatch size: 2**bub_min_log2
    bub_max_log2: int = 9  # largest: 2**bub_max_log2 (and never above n_ctx)
    bub_chunks: int = 5  # timed chunks per configuration (after one untimed warm-up)


def space_bub(trial, ladder: list[int], u_max: list[int]):
    """Ladder levels; the ubatch level's bound depends on the batch level (ubatch <= batch and
    within the memory guard), the conditional form Optuna's TPE accepts."""
    b = trial.suggest_int("batch_level", 0, len(u_max) - 1)
    u = trial.suggest_int("ubatch_level", 0, u_max[b])
    return {"n_batch": ladder[b], "n_ubatch": ladder[u]}


@register_search
class BatchUbatch(Search):
    name = "bub"
    config_class = BubSearchConfig
    trial_kind = "speed"
    about = "n_batch/n_ubatch for logits throughput (same ladder, memory guard and cache as ggufopt bub)"

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        if c.bub_min_log2 < 0 or c.bub_min_log2 > c.bub_max_log2:
            raise UserError(f"search.bub_min_log2 ({c.bub_min_log2}) must be between 0 and search.bub_max_log2 "
                            f"({c.bub_max_log2}); every trial would otherwise measure the same configuration")
        if c.bub_chunks < 1:
            raise UserError(f"search.bub_chunks must be at least 1, not {c.bub_chunks}")

    def prepare(self, facts, log=print):
        super().prepare(facts, log)
        c = self.cfg
        top = min(2 ** c.bub_max_log2, facts.n_ctx)
        sizes = [s for s in bub.size_ladder(facts.n_ctx, min_size=2 ** c.bub_min_log2) if s <= top]
        if not sizes:
            raise UserError(f"no batch size between 2**{c.bub_min_log2} and 2**{c.bub_max_log2} fits n_ctx="
                            f"{facts.n_ctx}; lower search.bub_min_log2")
        self.setup = bub.prepare_setup(facts.model_path, facts.n_ctx, facts.n_threads, None, 1, sizes)
        self.ladder = self.setup.ladder
        fits = set(self.setup.fitting)
        self.u_max = []
        for i, b in enumerate(self.ladder):
            levels = [j for j, u in enumerate(self.ladder) if j <= i and bub.BubConfig(b, u) in fits]
            if not levels:
                break  # the estimate grows with n_batch: no larger batch fits either
            self.u_max.append(max(levels))
        tokens = facts.eval_tokens
        stream = np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens]) if len(tokens) else None
        self.chunks = bub.make_chunks(self.setup.dims, facts.n_ctx, c.bub_chunks, tokens=stream, seed=c.seed)
        self.fingerprint = bub.cache_fingerprint(self.setup, facts.n_gpu_layers, facts.flash_attn)
        self.cache_key = bub.cache_key(self.fingerprint)
        self.cache_path = (Path(facts.cache_dir) / "bub" if facts.cache_dir else bub.default_cache_dir()) / \
            f"{self.cache_key}.json"
        cached = bub.load_cached(self.cache_path, self.cache_key) if self.cache_path.is_file() else None
        self.cached = {(m.n_batch, m.n_ubatch): m for m in (cached.evaluations if cached else [])
                       if m.status == "complete" and len(m.chunk_tokens_per_s) >= c.bub_chunks}
        self.notes["bub"] = {"ladder": self.ladder, "memory_budget": self.setup.budget,
                             "skipped_memory": [x.label() for x in self.setup.skipped],
                             "cache": str(self.cache_path), "cached_configs": len(self.cached)}
        if self.setup.skipped:
            log(f"bub      {len(self.setup.skipped)} configurations over the memory budget of "
                f"{self.setup.budget / 2**20:,.0f} MiB are skipped")
        return self

    def grid(self) -> list[dict]:
        return [{"n_batch": x.n_batch, "n_ubatch": x.n_ubatch} for x in self.setup.fitting]

    def space(self):
        return partial(space_bub, ladder=list(self.ladder), u_max=list(self.u_max))

    def start_points(self) -> list[dict] | None:
        """llama.cpp's own default first, when it is on the ladder and fits: the one to beat."""
        d = bub.llama_default_config(self.facts.n_ctx)
        if d in set(self.setup.fitting):
            return [{"batch_level": self.ladder.index(d.n_batch), "ubatch_level": self.ladder.index(d.n_ubatch)}]
        return None

    # -- one trial (run by distributed.tune_adapter.speed_trial) ---------------------------------------
    def measure(self, n_batch: int, n_ubatch: int, report=None) -> tuple[bub.ConfigMeasurement, bool]:
        """The measurement of one configuration, from the shared cache when it has it."""
        hit = self.cached.get((int(n_batch), int(n_ubatch)))
        if hit is not None:
            return hit, True
        m = bub.measure_config(self.facts.model_path, self.facts.n_ctx, bub.BubConfig(int(n_batch), int(n_ubatch)),
                               self.chunks, n_threads=self.facts.n_threads, n_gpu_layers=self.facts.n_gpu_layers,
                               flash_attn=self.facts.flash_attn, report=report)
        m.memory_estimate = self.setup.memory.get(m.config, 0)
        return m, False

    def objective(self, summary: dict, bits_per_weight: float) -> float:
        return -float(summary.get("tokens_per_s", np.nan))

    def finish(self, rows: list[dict], t0: float) -> dict:
        """Keep the sweep's measurements in the cache ``ggufopt bub`` reads (merged with what it had)."""
        found = {}
        for r in rows:
            if r.get("measurement"):
                m = bub.ConfigMeasurement.from_dict(json.loads(r["measurement"]))
                found[(m.n_batch, m.n_ubatch)] = m
        merged = {**self.cached, **found}
        if not any(m.status == "complete" for m in found.values()):
            return {}
        result = bub.finish_result(self.setup, f"sweep-{self.cfg.mode}", list(merged.values()),
                                   bub.DEFAULT_NEAR_BEST_PCT, self.cfg.bub_chunks, self.cfg.seed, t0,
                                   self.fingerprint, self.cache_key)
        bub.save_cached(self.cache_path, result)
        return {"bub_cache": str(self.cache_path), "bub_best": result.best_config.label()}

    def table_kind(self) -> str:
        return "speed"
