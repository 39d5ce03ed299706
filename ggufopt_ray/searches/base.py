"""What every search is: a typed config, its trial configs, and how a config becomes a candidate.

A search used to be a string checked in five places; now it is one class per module in this
package (the pattern of the baseline encodings in ``metrics/encodings.py``): the class names its
typed config (a subclass of :class:`~ggufopt_ray.config.SearchConfig`, registered with Hydra as
``<name>_schema``), validates it before Ray starts, prepares itself against the model (size
budgets, calibration sizes, memory guards), produces the grid or the Optuna define-by-run space,
turns a trial's config into a :class:`TrialPlan` (the recipe to build, and what was sampled), and
scores a finished evaluation. ``distributed/`` runs searches; it does not define them.

Adding a search: one module here with a ``@register_search`` class, and one YAML under
``conf/search/`` whose defaults name ``<name>_schema``.

Optuna's define-by-run functions must be module-level (Tune pickles the searcher), so each
search keeps its space function at module level and binds its settings with ``functools.partial``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

from ggufopt_ray.candidates import Recipe
from ggufopt_ray.config import SearchConfig
from ggufopt_ray.engine.quantize import needs_imatrix, resolve_file_type
from ggufopt_ray.errors import UserError

MODES = ("grid", "optuna")
SCHEDULERS = ("none", "asha", "median")
OBJECTIVES = {"composite": "composite", "mean": "kld_mean", "median": "kld_median", "p99": "kld_p99"}


@dataclass(frozen=True)
class SearchFacts:
    """What a search must know about the model and the data before it can make trial configs."""

    model_path: str
    n_layer: int
    n_ctx: int
    n_calib: int  # calibration chunks available for importance matrices
    calib_langs: tuple = ()  # language (or source) of each calibration chunk
    n_threads: int = 1  # llama.cpp threads of one trial
    n_gpu_layers: int = 0
    flash_attn: bool = False
    cache_dir: str = ""  # the project cache (candidates, baselines, bub results)
    eval_tokens: tuple = field(default=(), repr=False)  # the evaluation chunks (speed searches time them)


@dataclass(frozen=True)
class TrialPlan:
    """A trial config made concrete: the recipe to build and the label of what was sampled.

    The two labels differ when the search repaired the sampled point (a mix over the size budget
    stepped down to the nearest one that fits)."""

    recipe: Recipe
    sampled_label: str
    name: str = ""  # a label of the search's own (else the recipe's)
    # Evaluate every chunk whatever the stop rules say (racing still sees its values): a
    # reference that other candidates are compared with chunk by chunk (allocate/paired.py).
    every_chunk: bool = False

    @property
    def label(self) -> str:
        return self.name or self.recipe.label()

    @property
    def fitted(self) -> bool:
        return self.label != self.sampled_label


class Search:
    """Base class of the searches; subclasses set ``name``, ``config_class`` and the hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[SearchConfig]] = SearchConfig
    trial_kind: ClassVar[str] = "quality"  # quality: candidate vs baseline; speed: logits throughput
    about: ClassVar[str] = ""  # one line for --help and errors
    # The objective reads per-language statistics (worst_language_kld, language_mean_kld), so
    # trials compute them at every report, not only at the end.
    by_language: ClassVar[bool] = False
    # Final rows carry ``chunk_kld``, each evaluated chunk's mean KLD (JSON), for searches that
    # compare candidates on shared chunks (allocate/paired.py).
    chunk_values: ClassVar[bool] = False

    def __init__(self, cfg: SearchConfig):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"search {self.name} needs a {self.config_class.__name__}, not {type(cfg).__name__}")
        self.cfg = cfg
        self.facts: SearchFacts | None = None
        self.notes: dict = {}  # what prepare() resolved (budgets, ladders), for sweep.json

    # -- before Ray --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Checks that need nothing but the config, so a bad setting never costs a Ray start."""
        c = self.cfg
        if c.mode not in MODES:
            raise UserError(f"search.mode must be grid or optuna, not {c.mode!r}")
        if c.scheduler not in SCHEDULERS:
            raise UserError(f"search.scheduler must be none, asha or median, not {c.scheduler!r}")
        if c.mode == "optuna" and c.num_samples < 1:
            raise UserError(f"search.num_samples must be at least 1, not {c.num_samples}")
        unknown = [o for o in c.objectives if o not in OBJECTIVES and o != "bits_per_weight"]
        if not c.objectives or unknown:
            raise UserError(f"search.objectives {list(c.objectives)} must start with one of "
                            f"{', '.join(OBJECTIVES)} (optionally followed by bits_per_weight)")
        if len(c.objectives) > 1 and c.scheduler != "none":
            raise UserError("schedulers rank trials by one metric; use search.scheduler=none with "
                            "several search.objectives")

    def prepare(self, facts: SearchFacts, log: Callable[[str], None] = print) -> "Search":
        """Bind the search to the model and data (budgets, calibration sizes); returns self.

        The evaluation tokens are not kept (trials get them from their context); a search that
        needs them takes what it needs here."""
        self.facts = replace(facts, eval_tokens=())
        return self

    # -- trial configs -----------------------------------------------------------------------------
    def grid(self) -> list[dict]:
        raise NotImplementedError

    def space(self):
        """Optuna define-by-run function (module level, settings bound by functools.partial)."""
        raise NotImplementedError

    def start_points(self) -> list[dict] | None:
        """Configs Optuna evaluates first (the reference a search must beat)."""
        return None

    def n_trials(self) -> int:
        return len(self.grid()) if self.cfg.mode == "grid" else int(self.cfg.num_samples)

    # -- one trial ---------------------------------------------------------------------------------
    def plan(self, config: dict) -> TrialPlan:
        """Trial config (flat JSON values) -> what to build."""
        raise NotImplementedError

    def over_budget(self, plan: TrialPlan) -> dict | None:
        """Size of a plan that breaks the search's budget (None when it fits or there is none)."""
        return None

    def objective(self, summary: dict, bits_per_weight: float) -> float:
        """The number Tune minimises for a finished (or running) evaluation."""
        key = OBJECTIVES.get(self.cfg.objectives[0] if self.cfg.objectives else "composite", "composite")
        return float(summary.get(key, math.nan))

    def races(self) -> bool:
        """Whether the racing rule may stop this search's trials. Racing ranks candidates by the
        pooled statistic; a search whose objective is another number (a language's) says no."""
        return True

    def stops_per_language(self) -> bool:
        """Whether a trial's precision stop must hold in every language (``metrics.per_language``
        asks for it too)."""
        return False

    def follow_up(self, rows: list[dict], run_round, output_dir, log: Callable[[str], None] = print) -> None:
        """Later rounds, for searches that decide what to measure next from what was measured.

        ``run_round(configs, name) -> rows`` runs ``configs`` as trials (a Tune experiment of its
        own, resumable) and returns their final rows; the sweep adds them to its results."""
        return None

    def finish(self, rows: list[dict], t0: float) -> dict:
        """After the trials: anything the search keeps (caches), and notes for sweep.json."""
        return {}

    def summary_lines(self, notes: dict) -> list[str]:
        """Lines the sweep prints at the end from what :meth:`finish` returned (the answer)."""
        return []

    def finalize_options(self) -> dict:
        """Keyword arguments for ``report.tables.finalize_results``."""
        return {}

    def table_kind(self) -> str:
        return "speed" if self.trial_kind == "speed" else "quality"

    def table_rows(self, rows: list[dict]) -> tuple[list[dict], str]:
        """The rows of the results table a sweep prints at its end, and a line about any it leaves
        out (results.csv and results.parquet always hold every row)."""
        return rows, ""


SEARCHES: dict[str, type[Search]] = {}


def register_search(cls: type[Search]) -> type[Search]:
    """Class decorator: make ``cls`` available as ``search=<cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    SEARCHES[cls.name] = cls
    return cls


def search_class(name: str) -> type[Search]:
    from ggufopt_ray import searches  # noqa: F401  (importing the package registers every search)

    cls = SEARCHES.get(name)
    if cls is None:
        raise UserError(f"search.name={name!r} is not a search; choose one of {', '.join(SEARCHES)}")
    return cls


def make_search(cfg: SearchConfig) -> Search:
    """The search object for a typed search config."""
    cls = search_class(cfg.name)
    if not isinstance(cfg, cls.config_class):
        # A plain SearchConfig (or another search's) carrying this name: rebuild it as the right
        # type so its own defaults apply, keeping the common fields that were set.
        common = {f: getattr(cfg, f) for f in SearchConfig.__dataclass_fields__}
        cfg = cls.config_class(**common)
    return cls(cfg)


def search_config(name: str, **values) -> SearchConfig:
    """A typed config of search ``name`` with ``values`` set (library callers and tests)."""
    cls = search_class(name)
    return cls.config_class(**{"name": name, **values})


def check_quant_types(types, *, imatrix: bool, key: str = "search.types") -> list[str]:
    """Every name a llama.cpp file type, and none that needs an imatrix when there is none.

    Both mistakes would otherwise surface as one failed (and retried) trial per candidate."""
    names = [resolve_file_type(t)[0] for t in types]
    if not imatrix:
        need = [t for t in names if needs_imatrix(t)]
        if need:
            raise UserError(f"{key} {need} need an importance matrix, which this search does not build; "
                            "set search.imatrix=true (with dataset.calib_chunks > 0) or drop them")
    return names


def superseded(rows: list[dict], newer: list[dict]) -> list[dict]:
    """``rows`` with each row of a label in ``newer`` replaced by the newer row: a later round's
    row of a candidate measured before (its results store was continued, so the new row holds
    every chunk of the old one, and more)."""
    labels = {r.get("label") for r in newer}
    return [r for r in rows if r.get("label") not in labels] + list(newer)
