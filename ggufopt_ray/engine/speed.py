"""How fast a model runs: prompt-processing and generation tokens/s, llama-bench style.

Size and quality alone do not pick a quantization; a candidate that is 5 % smaller but half as
fast on the hardware that serves it is rarely the better choice. This module measures speed the
way llama-bench does, so the sweep can trade size, quality and speed off together:

- ``pp N``: decode N prompt tokens from an empty KV cache in ``n_batch``-sized pieces; as in
  llama-bench only the last position of each piece asks for logits.
- ``tg M``: decode M tokens one at a time from an empty cache, each asking for its logits.
- ``pN+gM``: a prompt of N tokens followed by M single-token decode steps (llama-bench's ``pg``);
  the three usage regimes of the ZFP notes are built from it (``regime_tests``): a long prefill
  with one generated token, an 80 % prefill / 20 % generation split, and a short prompt followed
  by a few hundred generated tokens.

Token ids are random (seeded) by default, as in llama-bench: for a dense model the speed does not
depend on the text. ``greedy=True`` feeds back the arg-max token instead, which adds one arg-max
over the vocabulary per step, like a real greedy decoder.

Every test is run once as a warm-up (excluded), then ``reps`` times. A rep's tokens/s is
``(n_prompt + n_gen) / seconds``; the mean, standard deviation, min and max are over reps, as
llama-bench reports them. Prompt and generation phases are also timed separately. Several models
are measured round-robin, rep by rep (``measure_speeds``), so that a noisy machine affects all of
them alike and their ratio is meaningful.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ggufopt_ray.engine import native
from ggufopt_ray.engine.session import ModelSession
from ggufopt_ray.errors import UserError

LLAMA_DEFAULT_N_BATCH = 2048
LLAMA_DEFAULT_N_UBATCH = 512


# -- what to measure -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeedTest:
    """One workload: ``n_prompt`` tokens prefilled, then ``n_gen`` single-token decode steps."""

    name: str
    n_prompt: int
    n_gen: int

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    def validate(self) -> None:
        if self.n_prompt < 0 or self.n_gen < 0:
            raise UserError(f"speed test {self.name}: token counts must not be negative "
                            f"(prompt {self.n_prompt}, generated {self.n_gen})")
        if self.n_tokens == 0:
            raise UserError(f"speed test {self.name} has no tokens; give --pp or --tg a positive count")


def pp_test(n_prompt: int) -> SpeedTest:
    return SpeedTest(f"pp{n_prompt}", n_prompt, 0)


def tg_test(n_gen: int) -> SpeedTest:
    return SpeedTest(f"tg{n_gen}", 0, n_gen)


def regime_splits(total_tokens: int = 512) -> dict[str, tuple[int, int]]:
    """``{regime: (n_prompt, n_gen)}`` for the three regimes of the ZFP notes, ``total_tokens`` each.

    - ``prefill``: a long prompt and one generated token (``total - 1`` + 1);
    - ``mixed``: 80 % prompt, 20 % generation (the prompt share rounded half up);
    - ``generate``: a short question (1/16 of the budget, at least 1 token) and the rest generated
      (480 of 512 tokens: "a few hundred").
    """
    total = int(total_tokens)
    if total < 2:
        raise UserError(f"the regime token budget must be at least 2 tokens, not {total_tokens}")
    prompt_mixed = int(math.floor(0.8 * total + 0.5))
    prompt_mixed = min(max(prompt_mixed, 1), total - 1)
    prompt_short = max(1, total // 16)
    return {
        "prefill": (total - 1, 1),
        "mixed": (prompt_mixed, total - prompt_mixed),
        "generate": (prompt_short, total - prompt_short),
    }


def regime_tests(total_tokens: int = 512) -> list[SpeedTest]:
    return [SpeedTest(f"{name}:p{p}+g{g}", p, g) for name, (p, g) in regime_splits(total_tokens).items()]


def build_tests(pp: int = 512, tg: int = 128, regimes: bool = False,
                regime_tokens: int = 512) -> list[SpeedTest]:
    """The llama-bench ``pp``/``tg`` tests (skipped when 0) plus, optionally, the three regimes."""
    tests = []
    if pp:
        tests.append(pp_test(pp))
    if tg:
        tests.append(tg_test(tg))
    if regimes:
        tests.extend(regime_tests(regime_tokens))
    if not tests:
        raise UserError("nothing to measure: --pp and --tg are both 0 and --regimes is off")
    for t in tests:
        t.validate()
    return tests


# -- results ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (0 for one value), min and max of repeated measurements."""

    mean: float
    stdev: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
        return cls(float(v.mean()), sd, float(v.min()), float(v.max()), int(v.size))


@dataclass
class SpeedMeasurement:
    """Timings of one test on one model: seconds per rep, for the prompt and generation phases."""

    test: SpeedTest
    prompt_seconds: list[float] = field(default_factory=list)
    gen_seconds: list[float] = field(default_factory=list)

    @property
    def reps(self) -> int:
        return len(self.prompt_seconds)

    @property
    def total_seconds(self) -> list[float]:
        return [p + g for p, g in zip(self.prompt_seconds, self.gen_seconds)]

    @property
    def tokens_per_s(self) -> Spread:
        return Spread.of([self.test.n_tokens / s for s in self.total_seconds])

    @property
    def prompt_tokens_per_s(self) -> Spread | None:
        if not self.test.n_prompt:
            return None
        return Spread.of([self.test.n_prompt / s for s in self.prompt_seconds])

    @property
    def gen_tokens_per_s(self) -> Spread | None:
        if not self.test.n_gen:
            return None
        return Spread.of([self.test.n_gen / s for s in self.gen_seconds])

    @property
    def ms_per_generated_token(self) -> Spread | None:
        if not self.test.n_gen:
            return None
        return Spread.of([1000.0 * s / self.test.n_gen for s in self.gen_seconds])

    def to_dict(self) -> dict:
        def spread(s):
            return asdict(s) if s is not None else None

        return {
            "test": self.test.name, "n_prompt": self.test.n_prompt, "n_gen": self.test.n_gen,
            "reps": self.reps,
            "tokens_per_s": spread(self.tokens_per_s),
            "prompt_tokens_per_s": spread(self.prompt_tokens_per_s),
            "gen_tokens_per_s": spread(self.gen_tokens_per_s),
            "ms_per_generated_token": spread(self.ms_per_generated_token),
            "prompt_seconds": list(self.prompt_seconds), "gen_seconds": list(self.gen_seconds),
        }


@dataclass
class SpeedResult:
    """Speed of one model under one set of runtime settings, with what produced it."""

    model: str
    file_size: int
    n_params: int
    model_desc: str
    settings: dict
    measurements: list[SpeedMeasurement]
    versions: dict

    def measurement(self, name: str) -> SpeedMeasurement:
        for m in self.measurements:
            if m.test.name == name or m.test.name.split(":")[0] == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "file_size": self.file_size, "n_params": self.n_params,
            "model_desc": self.model_desc, "settings": dict(self.settings),
            "tests": [m.to_dict() for m in self.measurements], "versions": dict(self.versions),
        }


# -- the runner ------------------------------------------------------------------------------------
class SpeedRunner(ModelSession):
    """A model and a context sized for the longest test; ``run(test)`` times one repetition."""

    def __init__(self, model_path: str | Path, n_ctx: int, n_batch: int = LLAMA_DEFAULT_N_BATCH,
                 n_ubatch: int = LLAMA_DEFAULT_N_UBATCH, n_threads: int | None = None,
                 n_gpu_layers: int = 0, flash_attn: bool = False, verbose: bool = False,
                 greedy: bool = False, seed: int = 0, allow_beyond_train_ctx: bool = False):
        if n_ctx < 1:
            raise UserError(f"n_ctx must be positive, not {n_ctx}")
        if n_batch < 1 or n_ubatch < 1:
            raise UserError(f"n_batch and n_ubatch must be positive, got {n_batch} and {n_ubatch}")
        if n_ubatch > n_batch:
            raise UserError(f"n_ubatch ({n_ubatch}) must not exceed n_batch ({n_batch}); "
                            "lower the ubatch or raise the batch")
        if n_threads is not None and n_threads < 1:
            raise UserError(f"n_threads must be positive, not {n_threads}")
        self.greedy = bool(greedy)
        super().__init__(
            model_path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
            n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, verbose=verbose,
            train_ctx_error=None if allow_beyond_train_ctx else (
                lambda n, t: f"the longest test needs {n} tokens of context, more than the model's "
                             f"training context ({t}); use fewer --pp/--tg/--regime-tokens"))
        try:
            lib = self._lib
            self.file_size = Path(model_path).stat().st_size
            self.n_params = int(lib.llama_model_n_params(self._model))
            buf = ctypes.create_string_buffer(256)
            lib.llama_model_desc(self._model, buf, 256)
            self.model_desc = buf.value.decode(errors="replace")
            self._rng = np.random.default_rng(seed)
            self.settings = {
                "n_ctx": self.n_ctx, "n_batch": self.n_batch, "n_ubatch": self.n_ubatch,
                "n_threads": self.n_threads, "n_gpu_layers": int(n_gpu_layers),
                "flash_attn": bool(flash_attn), "greedy": self.greedy, "seed": int(seed),
            }
        except BaseException:
            self.close()
            raise

    def _random_tokens(self, n: int, first: bool) -> np.ndarray:
        toks = self._rng.integers(0, self.n_vocab, size=n, dtype=np.int32)
        if first and n and self.add_bos and self.bos_id >= 0:
            toks[0] = self.bos_id  # llama-bench starts every test with BOS
        return toks

    def _argmax_last(self) -> int:
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        return int(row.argmax())

    def run(self, test: SpeedTest) -> tuple[float, float]:
        """Seconds for the prompt phase and the generation phase of one repetition of ``test``."""
        test.validate()
        if test.n_tokens > self.n_ctx:
            raise UserError(f"test {test.name} needs {test.n_tokens} tokens but the context holds {self.n_ctx}")
        lib = self._lib
        prompt = self._random_tokens(test.n_prompt, first=True)
        gen = self._random_tokens(test.n_gen, first=test.n_prompt == 0)
        self.clear()
        lib.llama_synchronize(self._ctx)
        t0 = time.perf_counter()
        for start in range(0, test.n_prompt, self.n_batch):
            m = min(self.n_batch, test.n_prompt - start)
            self._tok[:m] = prompt[start:start + m]
            self._out[:m] = 0
            self._out[m - 1] = 1  # only the last position of each piece, as llama-bench
            self.decode(m, start)
        lib.llama_synchronize(self._ctx)
        t1 = time.perf_counter()
        self._out[0] = 1
        token = self._argmax_last() if (self.greedy and test.n_prompt) else None
        for i in range(test.n_gen):
            self._tok[0] = token if token is not None else gen[i]
            self.decode(1, test.n_prompt + i)
            if self.greedy:
                token = self._argmax_last()
        lib.llama_synchronize(self._ctx)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


# -- public entry points ---------------------------------------------------------------------------
def measure_speeds(model_paths: Sequence[str | Path], tests: Sequence[SpeedTest], reps: int = 3,
                   n_threads: int | None = None, n_batch: int = LLAMA_DEFAULT_N_BATCH,
                   n_ubatch: int = LLAMA_DEFAULT_N_UBATCH, n_gpu_layers: int = 0,
                   flash_attn: bool = False, greedy: bool = False, warmup: bool = True,
                   seed: int = 0, verbose: bool = False,
                   on_rep: Callable[[str, SpeedTest, int], None] | None = None) -> list[SpeedResult]:
    """Speed of each model on each test, measured round-robin (rep r of every model, then r+1).

    All models are loaded at once so that their repetitions interleave in time; the order of the
    models rotates from one rep to the next. ``on_rep(model, test, rep)`` is called after each
    timed repetition (progress bars).
    """
    if reps < 1:
        raise UserError(f"--reps must be at least 1, not {reps}")
    if not model_paths:
        raise UserError("give at least one model")
    tests = list(tests)
    for t in tests:
        t.validate()
    n_ctx = max(t.n_tokens for t in tests)
    runners: list[SpeedRunner] = []
    try:
        for path in model_paths:
            runners.append(SpeedRunner(path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                                       n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                                       flash_attn=flash_attn, verbose=verbose, greedy=greedy, seed=seed))
        results = [[SpeedMeasurement(t) for t in tests] for _ in runners]
        for ti, test in enumerate(tests):
            if warmup:
                for r in runners:
                    r.run(test)
            for rep in range(reps):
                k = rep % len(runners)
                for mi in list(range(k, len(runners))) + list(range(k)):
                    p, g = runners[mi].run(test)
                    results[mi][ti].prompt_seconds.append(p)
                    results[mi][ti].gen_seconds.append(g)
                    if on_rep is not None:
                        on_rep(runners[mi].model_path, test, rep)
        vers = native.versions()
        return [SpeedResult(model=r.model_path, file_size=r.file_size, n_params=r.n_params,
                            model_desc=r.model_desc, settings=dict(r.settings), measurements=res,
                            versions=vers)
                for r, res in zip(runners, results)]
    finally:
        for r in runners:
            r.close()


def measure_speed(model_path: str | Path, pp: int = 512, tg: int = 128, reps: int = 3,
                  regimes: bool = False, regime_tokens: int = 512, **kwargs) -> SpeedResult:
    """llama-bench-like ``pp``/``tg`` (and optionally the three regimes) for one model.

    ``kwargs`` are those of ``measure_speeds`` (n_threads, n_batch, n_ubatch, n_gpu_layers,
    flash_attn, greedy, warmup, seed, verbose, on_rep).
    """
    tests = build_tests(pp=pp, tg=tg, regimes=regimes, regime_tokens=regime_tokens)
    return measure_speeds([model_path], tests, reps=reps, **kwargs)[0]


def format_speed_table(results: Sequence[SpeedResult]) -> str:
    """A readable table: one row per model and test, tokens/s mean ± sd [min, max] by phase."""
    def fmt(s: Spread | None) -> str:
        return "-" if s is None else f"{s.mean:10.1f} ± {s.stdev:7.1f}"

    name_w = max([len(Path(r.model).name) for r in results] + [5])
    test_w = max([len(m.test.name) for r in results for m in r.measurements] + [4])
    head = (f"{'model':<{name_w}}  {'test':<{test_w}}  {'reps':>4}  {'tokens/s (all)':>20}  "
            f"{'min':>9}  {'max':>9}  {'prompt t/s':>20}  {'gen t/s':>20}")
    lines = [head, "-" * len(head)]
    for r in results:
        for m in r.measurements:
            t = m.tokens_per_s
            lines.append(f"{Path(r.model).name:<{name_w}}  {m.test.name:<{test_w}}  {m.reps:>4}  {fmt(t):>20}  "
                         f"{t.min:>9.1f}  {t.max:>9.1f}  {fmt(m.prompt_tokens_per_s):>20}  "
                         f"{fmt(m.gen_tokens_per_s):>20}")
    if len(results) > 1:
        base = results[0]
        lines.append("")
        lines.append(f"ratio of mean tokens/s to {Path(base.model).name}:")
        for r in results[1:]:
            parts = []
            for mb, m in zip(base.measurements, r.measurements):
                parts.append(f"{m.test.name} {m.tokens_per_s.mean / mb.tokens_per_s.mean:.3f}")
            lines.append(f"  {Path(r.model).name}: " + ", ".join(parts))
    return "\n".join(lines)
