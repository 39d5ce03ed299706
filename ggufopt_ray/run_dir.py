"""A sweep's run directory: what it was made by, and when a rerun may continue in it.

Rerunning into an existing ``output_dir`` resumes the sweep that is there — which is only right
when it is the same sweep. The run directory therefore records the sweep's identity (its resolved
config without the keys that cannot change a number: logging, where Ray runs, the dashboard, the
cache location) in ``identity.json``. A rerun with another identity is refused, naming the keys
that changed, unless ``overwrite=true`` asks to discard the old results. Tune's state in
``ray_results/`` is unpickled on resume, so a run directory is trusted input: only this check
stands between a foreign directory and ``Tuner.restore``, and it refuses any directory whose
identity file is missing or different.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from ggufopt_ray.config import SweepConfig
from ggufopt_ray.errors import UserError

IDENTITY_FILE = "identity.json"
# Keys that never change a result: how much is logged, where the results and caches go, how Ray
# is reached and shown, how many trials run at once and how often a failure is retried.
COSMETIC = {"verbose", "output_dir", "overwrite", "cache_dir",
            "cluster.mode", "cluster.address", "cluster.num_cpus", "cluster.num_gpus", "cluster.dashboard",
            "cluster.dashboard_host", "cluster.dashboard_port", "cluster.max_concurrent_trials",
            "cluster.max_failures", "cluster.logits_workers"}
# What a sweep writes into its run directory (Hydra's .hydra/ is left alone).
OUTPUTS = ("ray_results", "results.parquet", "results.csv", "pareto.csv", "best.json", "chunks.parquet",
           "tokens.parquet", "events.jsonl", "sweep.json", "report.html", "report.md", "plots", "racing.json",
           "languages.parquet", IDENTITY_FILE)

# What a sweep says as it runs (the lines it prints, each finished trial, the results table), for
# the run directory's log file. Not propagated: the console has them already, printed as they are;
# without a file (a sweep run from Python) they go to the null handler, never to Python's
# last-resort stderr handler, which would print an error line a second time.
RUN_LOG = logging.getLogger("ggufopt_ray.run")
RUN_LOG.propagate = False
RUN_LOG.setLevel(logging.INFO)
_NOWHERE = logging.NullHandler()
RUN_LOG.handlers = [_NOWHERE]


def log_to_run_files() -> None:
    """Write RUN_LOG to the files the root logger writes to now: under Hydra, the job's
    ``<job>.log`` in the run directory (``sweep.log``). Replaces earlier handlers: each job of a
    multirun has its own file, and a handler of a job before would reopen that job's file."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    RUN_LOG.handlers = [_NOWHERE, *files]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def sweep_identity(cfg: SweepConfig) -> dict:
    """The resolved config as flat ``key: value`` pairs, without the cosmetic keys."""
    flat = _flatten(json.loads(json.dumps(asdict(cfg), default=str)))
    return {k: v for k, v in sorted(flat.items()) if k not in COSMETIC}


def claim_run_dir(output_dir: Path, cfg: SweepConfig, overwrite: bool = False) -> bool:
    """Make ``output_dir`` this sweep's; returns whether an earlier run of the same sweep is there.

    Refuses (one line naming the changed keys and the two ways out) a directory holding another
    sweep's results, or results of unknown origin.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output_dir {output_dir} ({exc.strerror or exc}); choose a writable "
                        "output_dir") from None
    ident = sweep_identity(cfg)
    path = output_dir / IDENTITY_FILE
    ours = [name for name in OUTPUTS if (output_dir / name).exists()]
    if ours and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old is None:
            raise UserError(f"{output_dir} holds results of an unknown sweep (no readable {IDENTITY_FILE}); "
                            "choose a new output_dir, or set overwrite=true to discard them")
        changed = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if changed:
            shown = ", ".join(f"{k} ({old.get(k)!r} -> {ident.get(k)!r})" for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise UserError(f"{output_dir} holds a sweep with other settings: {shown}{more}; choose a new "
                            "output_dir, or set overwrite=true to discard the old results")
        return True
    for name in ours:  # overwrite=true: the old results go, Hydra's own files stay
        target = output_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(ident, indent=1))
    tmp.replace(path)
    return False
