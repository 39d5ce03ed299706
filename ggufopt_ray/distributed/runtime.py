"""Start or join a Ray cluster with settings that suit long llama.cpp jobs, securely.

Facts behind the defaults (probed on Ray 2.60, see DESIGN.md): OOM-killed tasks are retried
forever unless ``RAY_task_oom_retries`` is set, usage stats must be opted out of, and one Ray
instance should be reused across Hydra multirun jobs because starting one costs ~8-10 s.

Security of a local cluster (``cluster.mode=local``), which runs whatever code reaches it:

- Ray 2.60's token authentication stays on (Ray sets ``RAY_AUTH_MODE=token`` for a new local
  cluster; the token is ``~/.ray/auth_token``, or ``$RAY_AUTH_TOKEN`` / ``$RAY_AUTH_TOKEN_PATH``).
  Turning it off lets any host that reaches the node's ports run code in the sweep; an explicit
  ``RAY_AUTH_MODE=disabled`` from the user is honoured but warned about.
- The node runs on ``127.0.0.1``: Ray's GCS, raylet, object manager, worker, dashboard-agent and
  metrics servers then listen on loopback only, so other hosts cannot even connect. Ray 2.60 turns
  ``ray.init(_node_ip_address="127.0.0.1")`` back into the machine's network address
  (``services.resolve_ip_for_localhost``); what it honours is its single-machine switch
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the default on macOS and Windows), under which the
  node's address is loopback and every server binds to it.
- The dashboard listens on ``cluster.dashboard_host`` (loopback by default). A busy dashboard port
  (another sweep's) falls back to a free one, reported in ``RayInfo.notes``.

A cluster started with ``ray start`` (``cluster.mode=ray``) is the user's: we only connect to it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass, field

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
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's nodes use 127.0.0.1


@dataclass
class RayInfo:
    address: str
    dashboard_url: str | None
    num_cpus: float
    num_gpus: float
    started_here: bool
    # Things the user should know about how Ray was started (e.g. a dashboard port fallback),
    # one line each, for the caller to print.
    notes: list[str] = field(default_factory=list)


def _set_env(cluster: ClusterConfig) -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if cluster.mode == "local":
        # Token auth: Ray's own default for a new local cluster (it generates ~/.ray/auth_token and
        # sets RAY_AUTH_MODE=token itself). Setting the variable here instead would be wrong once
        # ``ray`` is imported: Ray caches the mode at import and refreshes it only on its own path.
        # A single-machine cluster: the node's address is loopback (inherited by Ray's processes).
        os.environ.setdefault(SINGLE_MACHINE_ENV, "0")
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            print("warning: RAY_AUTH_MODE=disabled: any process that can reach this machine's Ray ports "
                  "can run code in this sweep; unset it to keep Ray's token authentication", file=sys.stderr)


def _single_machine_mode() -> None:
    """Make this process's Ray start a loopback node, even when ``ray`` was imported earlier.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported, into
    ``ray_constants.ENABLE_RAY_CLUSTER``; ``services.get_node_ip_address`` consults that constant
    at call time. The processes Ray starts read the environment variable themselves.
    """
    from ray._private import ray_constants

    single = os.environ.get(SINGLE_MACHINE_ENV, "0").lower() in ("0", "false")
    if single and getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray_constants.ENABLE_RAY_CLUSTER = False


def _port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (bound the way servers bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def dashboard_port(host: str, port: int) -> tuple[int, str | None]:
    """``port`` when free on ``host``, else a free one and a note saying so."""
    if _port_is_free(host, port):
        return port, None
    try:
        new = _free_port(host)
    except OSError as exc:
        raise UserError(f"cannot listen on {host} for the Ray dashboard ({exc.strerror or exc}); set "
                        "cluster.dashboard_host to an address of this machine, or cluster.dashboard=false") from None
    return new, (f"dashboard port {port} on {host} is in use (another sweep or Ray?); "
                 f"the dashboard listens on port {new} instead")


def start_ray(cluster: ClusterConfig, verbose: bool = False) -> RayInfo:
    """Start Ray in-process (``mode=local``) or connect to a cluster (``mode=ray``); idempotent."""
    _set_env(cluster)
    import ray

    started_here = False
    notes: list[str] = []
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
            # address="local": a new in-process instance even when a `ray start` cluster runs on
            # this machine (ray.init() would join it and refuse num_cpus with a ValueError).
            kwargs.update(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                          include_dashboard=cluster.dashboard)
            if cluster.object_store_gib:
                kwargs["object_store_memory"] = int(cluster.object_store_gib * 2**30)
            _single_machine_mode()
            if cluster.dashboard:
                port, note = dashboard_port(cluster.dashboard_host, int(cluster.dashboard_port))
                kwargs.update(dashboard_host=cluster.dashboard_host, dashboard_port=port)
                notes += [note] if note else []
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
                   started_here=started_here, notes=notes)


def object_store_bytes() -> float:
    """The cluster's total object store capacity in bytes (0 when Ray does not say)."""
    import ray

    return float(ray.cluster_resources().get("object_store_memory", 0.0))
