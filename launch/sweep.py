"""Run a ggufopt-ray sweep: `python launch/sweep.py [group=option ...] [key=value ...] [-m]`.

Hydra composes conf/config.yaml with one option per group (model, dataset, metrics, search,
cluster) and any overrides; everything the sweep writes goes under Hydra's run directory.
Examples:
    python launch/sweep.py                                   # default sweep on the built-in tiny model
    python launch/sweep.py search=zfp                        # ZFP rate x dimensionality
    python launch/sweep.py model=gguf model.path=/m/llama-f16.gguf dataset=local dataset.path='/d/*.txt'
    python launch/sweep.py -m search=quant_types,zfp         # two experiments, same Ray instance
    python launch/sweep.py cluster=ray cluster.address=auto  # an existing Ray cluster
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ggufopt_ray.config import register_configs  # noqa: E402

register_configs()
# hydra.run.dir: the user's output_dir when given, else Hydra's dated default (conf/config.yaml).
OmegaConf.register_new_resolver("run_dir", lambda output_dir, default: output_dir or default, replace=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    from ggufopt_ray.errors import UserError
    from ggufopt_ray.run_dir import RUN_LOG
    from ggufopt_ray.sweep import main_from_hydra

    try:
        main_from_hydra(cfg)
    except UserError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        RUN_LOG.error(f"sweep: error: {exc}")  # the run directory's sweep.log says why it stopped too
        sys.exit(2)


def check_output_dir(argv: list[str]) -> None:
    """``output_dir=...`` is Hydra's run directory, which Hydra creates before the sweep starts:
    a path that cannot be created would end in Hydra's traceback. Say it in one line instead."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") != "output_dir" or value in ("", "null", "None"):
            continue
        path = Path(value).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"sweep: error: cannot create output_dir {path} ({exc.strerror or exc}); choose a writable "
                  "output_dir", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    check_output_dir(sys.argv[1:])
    main()
