"""Local-file data sources: plain text, JSON lines, JSON and Parquet files, and the built-in corpus.

Registered as ``local`` (alias ``files``). ``files`` (or ``source``) maps languages to files: a
glob pattern with ``{lang}`` in it (``corpus/{lang}/*.txt``), a mapping ``{lang: glob or
[globs]}`` (on the command line ``--files en=docs/*.md code=src/**/*.py``), or one glob
without ``{lang}`` that every requested language reads (use it with one language). Records
are numbered across the matching files in sorted path order, so ``skip`` and ``count`` select the
same records every time. A text file holds several documents: by default they end with a line
holding only the ASCII record separator (``"\\x1e\\n"``, as in ../shared/models/corpus) when the
file contains one, and are separated by blank lines otherwise; ``split_on`` overrides that
(``record``, ``blank``, ``line`` or ``file`` for one document per file). ``.gz`` files are read
compressed. JSON lines, JSON and Parquet records go through the usual ``text_field`` path.
"""

from __future__ import annotations

import glob as _glob
import gzip
import json
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from ggufopt_ray.data.plugins import DataSource, register_source
from ggufopt_ray.errors import UserError

RECORD_SEPARATOR = "\x1e\n"
BUILTIN_DIR = Path(__file__).parent / "builtin"

_TEXT_FORMATS = ("text", "jsonl", "json", "parquet")
_SPLITS = ("auto", "record", "blank", "line", "file")


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".json":
        return "json"
    if ext in (".parquet", ".pq"):
        return "parquet"
    return "text"


def _read_text(path: Path) -> str:
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "convert it to UTF-8 or leave it out of --files") from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc


def split_documents(text: str, split_on: str = "auto") -> list[str]:
    """Documents in one text file; whitespace-only documents are left out."""
    if split_on == "auto":
        split_on = "record" if RECORD_SEPARATOR in text else "blank"
    if split_on == "record":
        docs = text.split(RECORD_SEPARATOR)
    elif split_on == "blank":
        docs = [d.strip("\n") for d in re.split(r"\n[ \t]*\n", text)]
    elif split_on == "line":
        docs = text.splitlines()
    elif split_on == "file":
        docs = [text]
    else:
        raise UserError(f"unknown text split {split_on!r}; use one of {', '.join(_SPLITS)}")
    return [d for d in docs if d.strip()]


def _iter_file_records(path: Path, fmt: str, split_on: str) -> Iterator[Any]:
    if fmt == "text":
        yield from split_documents(_read_text(path), split_on)
    elif fmt == "jsonl":
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno} is not valid JSON ({exc.msg}); "
                                "fix the line or remove it") from exc
    elif fmt == "json":
        text = _read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_file_records(path, "jsonl", split_on)  # JSON lines named .json
            return
        yield from (data if isinstance(data, list) else [data])
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise UserError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
        for batch in parquet.iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        raise UserError(f"unknown file format {fmt!r}; use one of {', '.join(_TEXT_FORMATS)} or auto")


def _as_pattern_list(value: Any) -> list[str]:
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def parse_files_option(files: Any) -> str | dict[str, list[str]]:
    """Normalise ``files``: ``LANG=GLOB`` strings (from the CLI) become a mapping."""
    if files is None:
        raise UserError("the files source needs --files (a glob with {lang}, or LANG=GLOB entries)")
    if isinstance(files, dict):
        return {str(k): _as_pattern_list(v) for k, v in files.items()}
    patterns = _as_pattern_list(files)
    mapping: dict[str, list[str]] = {}
    plain: list[str] = []
    for p in patterns:
        head, sep, tail = p.partition("=")
        if sep and head and re.fullmatch(r"[A-Za-z0-9_.\-]+", head):
            mapping.setdefault(head, []).append(tail)
        else:
            plain.append(p)
    if mapping and plain:
        raise UserError(f"--files mixes LANG=GLOB entries with plain globs ({', '.join(plain)}); "
                        "give every file a language, or use one glob with {lang}")
    if mapping:
        return mapping
    return plain[0] if len(plain) == 1 else {"all": plain}


@register_source("local", aliases=("files",))
class LocalFilesSource(DataSource):
    """Text, JSON lines, JSON or Parquet files on the local disk, per language."""

    cache_by_default = False  # reading them again is as fast as reading a cache

    def __init__(self, source: str | None = None, *, text_field: str = "text", files: Any = None,
                 format: str = "auto", split_on: str = "auto", **options: Any):
        super().__init__(source, text_field=text_field, **options)
        self.files = parse_files_option(files if files is not None else source)
        if format not in ("auto",) + _TEXT_FORMATS:
            raise UserError(f"unknown file format {format!r}; use auto, {', '.join(_TEXT_FORMATS)}")
        if split_on not in _SPLITS:
            raise UserError(f"unknown text split {split_on!r}; use one of {', '.join(_SPLITS)}")
        self.format = format
        self.split_on = split_on

    @property
    def default_langs(self) -> tuple[str, ...] | None:  # type: ignore[override]
        if isinstance(self.files, dict):
            return tuple(self.files)
        return None if "{lang}" in self.files else ("all",)

    def describe(self) -> dict[str, Any]:
        desc = super().describe()
        files = self.files
        if isinstance(files, dict):
            files = {k: [str(Path(p).expanduser().absolute()) for p in v] for k, v in files.items()}
        else:
            files = str(Path(files).expanduser().absolute())
        desc.update(source=None, files=files, format=self.format, split_on=self.split_on)
        return desc

    def paths(self, lang: str) -> list[Path]:
        """The files of ``lang`` in the order their records are numbered."""
        if isinstance(self.files, dict):
            if lang not in self.files:
                raise UserError(f"no files are given for language {lang!r} "
                                f"(--files names {', '.join(self.files)}); add {lang}=GLOB")
            patterns = self.files[lang]
        else:
            patterns = [self.files.replace("{lang}", lang)]
        found: set[str] = set()
        for pattern in patterns:
            pattern = str(Path(pattern).expanduser())
            matches = _glob.glob(pattern, recursive=True)
            if not matches and not _glob.has_magic(pattern) and Path(pattern).exists():
                matches = [pattern]
            found.update(m for m in matches if Path(m).is_file())
        if not found:
            raise UserError(f"no files match {' '.join(patterns)} for language {lang!r}; "
                            "check --files (globs are relative to the current directory)")
        return [Path(p) for p in sorted(found)]

    def iter_records(self, lang: str) -> Iterator[Any]:
        for path in self.paths(lang):
            fmt = _format_of(path) if self.format == "auto" else self.format
            yield from _iter_file_records(path, fmt, self.split_on)

    def load_records(self, lang: str, count: int, skip: int = 0) -> Iterable[Any]:
        return islice(self.iter_records(lang), skip, skip + count)


def builtin_languages() -> tuple[str, ...]:
    """Languages of the built-in corpus: the names of ``ggufopt_ray/data/builtin/*.txt``."""
    return tuple(sorted(p.stem for p in BUILTIN_DIR.glob("*.txt")))


@register_source("builtin")
class BuiltinCorpusSource(LocalFilesSource):
    """The small corpus shipped with the package (English prose and Python code), no download.

    Enough for the default sweep (about 64 chunks of 256 tokens of the synthetic model); see
    :mod:`ggufopt_ray.data.builtin_corpus` for how the files were generated.
    """

    default_langs = builtin_languages()

    def __init__(self, source: str | None = None, *, text_field: str = "text", **options: Any):
        options.pop("files", None)
        super().__init__(None, text_field=text_field, files=str(BUILTIN_DIR / "{lang}.txt"),
                         format="text", split_on="record", **options)

    def describe(self) -> dict[str, Any]:
        # Independent of where the package is installed; the text hash covers the content.
        from ggufopt_ray import __version__

        return {"plugin": self.name, "version": __version__, "text_field": self.text_field}

    def paths(self, lang: str) -> list[Path]:
        if lang not in builtin_languages():
            raise UserError(f"the built-in corpus has no language {lang!r}; "
                            f"it has {', '.join(builtin_languages())}")
        return super().paths(lang)
