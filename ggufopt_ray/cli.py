"""``ggufopt``: every stage of the workflow as a subcommand.

Each subcommand lives in its own module under ``ggufopt_ray.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that runs it.
New commands are picked up without editing this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ggufopt_ray import __version__
from ggufopt_ray.errors import UserError
from ggufopt_ray import commands as _commands_pkg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggufopt",
        description="Build, quantize and judge GGUF models against a full-precision baseline "
        "by KL-divergence. Each subcommand is one stage; `ggufopt CMD --help` explains it.",
    )
    parser.add_argument("--version", action="version", version=f"ggufopt-ray {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_commands_pkg.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"ggufopt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`ggufopt ... | head`): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"ggufopt {args.command}: interrupted; completed work is kept and a rerun resumes it",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
