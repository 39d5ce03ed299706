"""Start or join a Ray cluster with settings that suit long llama.cpp jobs.

Facts behind the defaults (probed on Ray 2.60, see DESIGN.md): token auth is on by default
(local runs disable it unless the user set RAY_AUTH_MODE), OOM-killed tasks are retried forever
unless ``RAY_task_oom_retries`` is set, usage stats must be opted out of, and one Ray instance
should be reused across Hydra multirun jobs because starting one costs ~8-10 s.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ggufopt_ray.config import ClusterConfig
from ggufopt_ray.errors import UserError

_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_task_oom_retries": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_DEDUP_LOGS": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Snapshot the experiment state every 2 s (it is a few KB): a killed driver then loses at most
    # 2 s of bookkeeping, and finished trials are known as finished on resume.
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0; our own progress line reports
}


@dataclass
class RayInfo:
    address: str
    dashboard_url: str | None
    num_cpus: float
    num_gpus: float
    started_here: bool


def _set_env(cluster: ClusterConfig) -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if cluster.mode == "local":
        # A cluster we start ourselves is private to this process: no token needed.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_ray(cluster: ClusterConfig, verbose: bool = False) -> RayInfo:
    """Start Ray in-process (``mode=local``) or connect to a cluster (``mode=ray``); idempotent."""
    _set_env(cluster)
    import ray

    started_here = False
    if not ray.is_initialized():
        kwargs = dict(
            ignore_reinit_error=True,
            logging_level=logging.INFO if verbose else logging.ERROR,
            log_to_driver=verbose,
            configure_logging=True,
        )
        if cluster.mode == "local":
            if cluster.address:
                raise UserError("cluster.mode=local starts its own Ray; to join a cluster use "
                                "cluster=ray cluster.address=auto (or ray://host:10001)")
            kwargs.update(num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                          include_dashboard=cluster.dashboard,
                          dashboard_host=cluster.dashboard_host, dashboard_port=cluster.dashboard_port)
            started_here = True
        elif cluster.mode == "ray":
            kwargs["address"] = cluster.address or "auto"
        else:
            raise UserError(f"cluster.mode must be local or ray, not {cluster.mode!r}")
        try:
            ctx = ray.init(**kwargs)
        except ConnectionError as exc:
            raise UserError(f"could not connect to a Ray cluster at {kwargs.get('address')}: "
                            f"{str(exc).splitlines()[0]}; start one with `ray start --head`") from None
        dashboard = getattr(ctx, "dashboard_url", None) or None
    else:
        dashboard = None
        try:
            dashboard = ray.get_runtime_context().gcs_address and ray.worker.get_dashboard_url()
        except Exception:
            pass
    res = ray.cluster_resources()
    url = f"http://{dashboard}" if dashboard and not str(dashboard).startswith("http") else dashboard
    return RayInfo(address=ray.get_runtime_context().gcs_address, dashboard_url=url or None,
                   num_cpus=float(res.get("CPU", 0)), num_gpus=float(res.get("GPU", 0)),
                   started_here=started_here)


def object_store_bytes() -> float:
    """The cluster's total object store capacity in bytes (0 when Ray does not say)."""
    import ray

    return float(ray.cluster_resources().get("object_store_memory", 0.0))
