"""What a publisher ships: per size class the best *measured* mix that fits, its recipe, its table.

Why measured and per size class: publishers ship one file per size (Q3/Q4/Q5-sized...), and the
question for each is "the least divergence that fits", which a prediction can only propose and a
ranking by size ("the largest file wins") never answers. A class with no measured candidate that
fits says so instead of borrowing a bigger one.

The recipe is llama-quantize's ``--tensor-type-file``. Its format, from tools/quantize/quantize.cpp
(``parse_tensor_type_file``, in the vendored llama.cpp and upstream): the file is read as
whitespace-separated words (``file >> arg``), each parsed like one ``--tensor-type`` argument:
``PATTERN=TYPE``, split at the *first* ``=``, the pattern lower-cased, the type matched
case-insensitively against ggml type names. There is no comment syntax (a ``#`` word without ``=``
aborts the run), so the file holds one ``PATTERN=TYPE`` per line and nothing else, and a pattern
must contain no whitespace, no ``=`` and no upper-case letters.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ggufopt_ray.errors import UserError
from ggufopt_ray.report.format import decimals


@dataclass(frozen=True)
class SizeClass:
    """A size a file is published at: a name ("Q4_K_M-sized") and its byte budget."""

    name: str
    max_bytes: int


@dataclass(frozen=True)
class Candidate:
    """A measured model file: its recipe and the statistics a model card reports."""

    label: str
    nbytes: int  # tensor bytes, as llama.cpp's dry run counts them
    n_params: int
    kld_mean: float
    kld_mean_se: float = math.nan
    kld_p99: float = math.nan
    same_top: float = math.nan  # fraction of tokens whose top-1 token is the baseline's
    ppl_ratio: float = math.nan  # PPL(candidate) / PPL(baseline)
    overrides: tuple[str, ...] = ()  # PATTERN=TYPE, empty for a stock type
    base_type: str = ""  # the llama-quantize file type argument
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_params

    @classmethod
    def from_summary(cls, label: str, nbytes: int, n_params: int, summary: Mapping, **kw) -> "Candidate":
        """From a :class:`~ggufopt_ray.metrics.stats.KLDSummary` (or its ``to_dict()``)."""
        get = summary.get if isinstance(summary, Mapping) else (lambda k, d=math.nan: getattr(summary, k, d))
        ln_ratio = get("ln_ppl_ratio", math.nan)
        return cls(label=label, nbytes=int(nbytes), n_params=int(n_params), kld_mean=float(get("kld_mean")),
                   kld_mean_se=float(get("kld_mean_se", math.nan)), kld_p99=float(get("kld_p99", math.nan)),
                   same_top=float(get("same_top", math.nan)),
                   ppl_ratio=math.exp(ln_ratio) if ln_ratio is not None and math.isfinite(ln_ratio) else math.nan,
                   **kw)


@dataclass(frozen=True)
class Recommendation:
    size_class: SizeClass
    candidate: Candidate | None  # None: nothing measured fits
    n_fitting: int  # measured candidates that fit the class


def recommend(candidates: Sequence[Candidate], size_classes: Sequence[SizeClass], key: str = "kld_mean"
              ) -> list[Recommendation]:
    """Per size class, the fitting candidate with the lowest ``key`` (ties: the smaller file)."""
    out = []
    for sc in size_classes:
        fits = [c for c in candidates if c.nbytes <= sc.max_bytes and math.isfinite(getattr(c, key))]
        best = min(fits, key=lambda c: (getattr(c, key), c.nbytes)) if fits else None
        out.append(Recommendation(size_class=sc, candidate=best, n_fitting=len(fits)))
    return out


def check_override(override: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` -> (pattern, type), or an error if llama-quantize would read it differently."""
    pattern, sep, qtype = override.partition("=")
    if not sep or not pattern or not qtype:
        raise UserError(f"override {override!r} is not PATTERN=TYPE")
    if "=" in qtype:
        raise UserError(f"override {override!r}: llama-quantize splits at the first '=', so the pattern "
                        "cannot contain '='")
    if any(ch.isspace() for ch in override):
        raise UserError(f"override {override!r} contains whitespace; a --tensor-type-file is split at whitespace")
    if pattern != pattern.lower():
        raise UserError(f"override {override!r}: llama-quantize lower-cases patterns, which would change "
                        "this one's meaning")
    return pattern, qtype.upper()


def tensor_type_file_text(overrides: Sequence[str]) -> str:
    """The ``--tensor-type-file`` contents: one ``PATTERN=TYPE`` per line, in order, nothing else."""
    lines = []
    for o in overrides:
        pattern, qtype = check_override(o)
        lines.append(f"{pattern}={qtype}")
    return "".join(line + "\n" for line in lines)


def parse_tensor_type_file(text: str) -> list[str]:
    """Read a ``--tensor-type-file`` the way llama-quantize does (whitespace-separated words)."""
    words = text.split()
    for w in words:
        check_override(w)
    return words


def llama_quantize_command(model: str, out: str, base_type: str, tensor_type_file: str | None = None,
                           imatrix: str | None = None, binary: str = "llama-quantize") -> str:
    """The shell command that writes the recommended file."""
    argv = [binary]
    if imatrix:
        argv += ["--imatrix", str(imatrix)]
    if tensor_type_file:
        argv += ["--tensor-type-file", str(tensor_type_file)]
    argv += [str(model), str(out), str(base_type)]
    return shlex.join(argv)


def quantize_script(commands: Sequence[tuple[str, str]]) -> str:
    """A POSIX shell script that runs ``(comment, command)`` pairs in order and stops at the first
    that fails (llama-quantize on PATH)."""
    lines = ["#!/bin/sh", "# The recommended files, written by llama.cpp's llama-quantize (on PATH).", "set -e"]
    for comment, command in commands:
        lines += ["", "# " + " ".join(comment.split()), command]
    return "\n".join(lines) + "\n"


def _size(nbytes: int) -> str:
    gib = nbytes / 2**30
    return f"{gib:.2f} GiB" if gib >= 1 else f"{nbytes / 2**20:.1f} MiB"


def _num(x: float, fmt: str) -> str:
    return format(x, fmt) if math.isfinite(x) else "–"


def format_kld(mean: float, se: float = math.nan) -> str:
    """Mean ± SE with two significant digits of the SE (three of the mean when there is no SE),
    in fixed point and never fewer than five decimals, so a model card's column lines up: a good
    file's KLD is ~1e-5, which a fixed five decimals alone would print as 0.00001 ± 0.00000."""
    if not math.isfinite(mean):
        return "–"
    if math.isfinite(se) and se > 0:
        d = max(5, decimals(se))
        return f"{mean:.{d}f} ± {se:.{d}f}"
    return f"{mean:.{max(5, decimals(mean, 3))}f}"


def model_card_table(recommendations: Sequence[Recommendation] | Sequence[Candidate]) -> str:
    """A Markdown table: size class, file, size, bpw, mean KLD ± SE, p99 KLD, same top, PPL ratio."""
    head = ("| size class | file | size | bpw | mean KLD ± SE | p99 KLD | same top | PPL ratio |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    rows = []
    for r in recommendations:
        rec = r if isinstance(r, Recommendation) else Recommendation(SizeClass("", r.nbytes), r, 1)
        c = rec.candidate
        if c is None:
            rows.append(f"| {rec.size_class.name} | (nothing measured fits {_size(rec.size_class.max_bytes)}) "
                        "| | | | | | |")
            continue
        kld = format_kld(c.kld_mean, c.kld_mean_se)
        top = _num(100.0 * c.same_top, ".2f") + ("%" if math.isfinite(c.same_top) else "")
        p99 = _num(c.kld_p99, f".{max(4, decimals(c.kld_p99, 3))}f")
        rows.append(f"| {rec.size_class.name} | {c.label} | {_size(c.nbytes)} | {c.bits_per_weight:.3f} | {kld} "
                    f"| {p99} | {top} | {_num(c.ppl_ratio, '.4f')} |")
    return head + "".join(row + "\n" for row in rows)
