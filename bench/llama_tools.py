"""llama.cpp's own tools for the benches that measure against them: where they are, how to run
one, and how to read llama-perplexity's KL-divergence report.

The tools are the ones ``.ci/build-llama-tools`` builds from exactly the llama.cpp that the
installed llama-cpp-python vendors: ``$GGUFOPT_LLAMA_TOOLS/bin`` or
``~/.cache/ggufopt_ray-llama-tools/VERSION/bin``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import time
from pathlib import Path

LOST_OUTPUT_RETRIES = 5


def find_tools() -> Path:
    """The folder that holds llama-quantize and llama-perplexity (SystemExit naming the fix if not)."""
    env = os.environ.get("GGUFOPT_LLAMA_TOOLS")
    base = (Path(env) if env else
            Path.home() / ".cache" / "ggufopt_ray-llama-tools" / importlib.metadata.version("llama-cpp-python"))
    missing = [t for t in ("llama-quantize", "llama-perplexity") if not (base / "bin" / t).exists()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found in {base / 'bin'}; build them with .ci/build-llama-tools")
    return base / "bin"


def run_tool(cmd: list[str]) -> tuple[float, str]:
    """Run one tool; its wall seconds and its output (stdout + stderr). SystemExit when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


_STAT = re.compile(r"^(.+?)\s*:\s*(-?[\d.]+(?:e[-+]?\d+)?)\s*(?:±\s*([\d.]+(?:e[-+]?\d+)?))?\s*(%?)\s*$")


def parse_kld_output(text: str) -> dict:
    """llama-perplexity's KL-divergence statistics (``Mean    KLD:   0.0123 ±   0.0004`` ...)."""
    out: dict = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("======"):
            section = line.strip("= ").lower()
            continue
        if section is None:
            continue
        m = _STAT.match(line)
        if not m:
            continue
        key = re.sub(r"\s+", " ", m.group(1)).strip()
        val = float(m.group(2))
        out[key] = {"value": val, "se": float(m.group(3)) if m.group(3) else None,
                    "percent": bool(m.group(4))}
    if "Mean KLD" not in out:
        raise SystemExit("no 'Mean KLD' in llama-perplexity's output:\n" + text[-3000:])
    return out


def kl_divergence_pass(tools: Path, model: Path, base_file: Path, common: list[str]) -> tuple[float, str, dict]:
    """One ``llama-perplexity --kl-divergence`` pass of ``model`` against ``base_file``: wall seconds
    of the pass that counted, its output, and the runs lost (``{"runs", "seconds"}``).

    llama.cpp's logger is asynchronous and now and then loses its last lines at exit (see
    tests/test_llama_cpp_parity.py); a person at a terminal would have seen them, so a pass whose
    report is missing is run again (up to LOST_OUTPUT_RETRIES times) and reported as lost."""
    lost = {"runs": 0, "seconds": 0.0}
    for _ in range(LOST_OUTPUT_RETRIES):
        wall, log = run_tool([str(tools / "llama-perplexity"), "-m", str(model), "--kl-divergence-base",
                              str(base_file), "--kl-divergence", *common])
        if "Mean    KLD" in log:
            return wall, log, lost
        lost["runs"] += 1
        lost["seconds"] += wall
    return wall, log, lost  # parse_kld_output then says what is missing


def kld_summary(stats: dict) -> dict:
    """The figures a model card quotes, from parse_kld_output's statistics."""
    return {"kld_mean": stats["Mean KLD"]["value"], "kld_mean_se": stats["Mean KLD"]["se"],
            "kld_median": stats.get("Median KLD", {}).get("value"),
            "kld_p99": stats.get("99.0% KLD", {}).get("value"),
            "same_top_pct": stats.get("Same top p", {}).get("value"),
            "ln_ppl_ratio": stats.get("Mean ln(PPL(Q)/PPL(base))", {}).get("value")}
