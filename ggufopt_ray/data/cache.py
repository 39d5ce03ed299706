"""An incremental, per-language corpus cache that is never left half-written.

Fetching text from a remote corpus is the slow, flaky part of building a dataset, so the texts
are kept in ``CACHE_DIR/<source key>/<lang>.jsonl``, one ``{"i": record number, "text": ...}``
line per sample, keyed by what the source is (plugin, dataset, config, split, text field).

- A request for N samples per language only fetches what the cache lacks.
- Fetching resumes after the highest record number already cached, and never before ``skip``:
  ``skip`` is an absolute record offset, so later runs can add new data from further into the
  source, and the cache never holds the same record twice (the original appended duplicates).
- ``overwrite`` replaces the cache with exactly N fresh samples starting at ``skip`` (the
  original subtracted the old count first, so an overwrite could shrink the cache).
- Every write goes to ``<lang>.jsonl.partial`` and is renamed over the cache when complete; long
  fetches are committed every ``commit_every`` samples, so an interrupted fetch keeps what was
  committed and a rerun resumes from there.

The cache is also the corpus snapshot: chunk fingerprints hash the cached text, so a source
that changes later does not silently change a dataset built earlier.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggufopt_ray.data.plugins import DataSource
from ggufopt_ray.errors import UserError


def default_cache_dir() -> Path:
    """``$GGUFOPT_CACHE_DIR/corpus``, else ``$XDG_CACHE_HOME/ggufopt_ray/corpus`` (never the CWD)."""
    if os.environ.get("GGUFOPT_CACHE_DIR"):
        return Path(os.environ["GGUFOPT_CACHE_DIR"]).expanduser() / "corpus"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ggufopt_ray" / "corpus"


def _safe_name(lang: str) -> str:
    if not lang or any(c in lang for c in "/\\\0") or lang in (".", ".."):
        raise UserError(f"language code {lang!r} cannot name a cache file; use letters, digits, - and _")
    return lang


def write_atomic(path: Path, write) -> None:
    """Call ``write(fh)`` on ``path.partial`` (binary), fsync, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class CachedSample:
    index: int  # record number in the source
    text: str


@dataclass
class CacheUpdate:
    """What one top-up did for one language."""

    lang: str
    before: int
    fetched: int
    after: int
    start: int | None = None  # first record number asked for (None: nothing was fetched)
    exhausted: bool = False  # the source had fewer records than asked for

    def describe(self) -> str:
        text = f"{self.lang}: {self.after} cached"
        if self.fetched:
            text += f" (+{self.fetched} from record {self.start})"
        if self.exhausted:
            text += "; the source has no more records"
        return text


class CorpusCache:
    """The cached samples of one source, one JSON-lines file per language."""

    def __init__(self, cache_dir: str | Path, source: DataSource):
        self.root = Path(cache_dir).expanduser()
        self.source = source
        self.dir = self.root / source.cache_key()

    def path(self, lang: str) -> Path:
        return self.dir / f"{_safe_name(lang)}.jsonl"

    def read(self, lang: str) -> list[CachedSample]:
        path = self.path(lang)
        if not path.exists():
            return []
        samples = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    row = json.loads(line)
                    samples.append(CachedSample(int(row["i"]), str(row["text"])))
                except (ValueError, KeyError, TypeError) as exc:
                    raise UserError(f"cache file {path} is damaged at line {lineno} ({exc}); "
                                    "delete it or rerun with --overwrite") from exc
        return samples

    def count(self, lang: str) -> int:
        path = self.path(lang)
        if not path.exists():
            return 0
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)

    def texts(self, lang: str, limit: int | None = None) -> list[str]:
        samples = self.read(lang)
        return [s.text for s in (samples if limit is None else samples[:limit])]

    def _commit(self, lang: str, samples: list[CachedSample]) -> None:
        if not (self.dir / "source.json").exists():
            desc = json.dumps(self.source.describe(), indent=1, sort_keys=True, default=str)
            write_atomic(self.dir / "source.json", lambda fh: fh.write(desc.encode() + b"\n"))

        def write(fh):
            for s in samples:
                fh.write(json.dumps({"i": s.index, "text": s.text}, ensure_ascii=False).encode("utf-8"))
                fh.write(b"\n")

        write_atomic(self.path(lang), write)

    def top_up(self, lang: str, target: int, *, skip: int = 0, overwrite: bool = False,
               progress: Any = None, commit_every: int = 5000) -> CacheUpdate:
        """Make the cache of ``lang`` hold at least ``target`` samples (exactly, with overwrite)."""
        if target < 0 or skip < 0:
            raise UserError("the number of samples and the skip offset must not be negative")
        existing = [] if overwrite else self.read(lang)
        before = self.count(lang) if overwrite else len(existing)
        need = target - len(existing)
        if need <= 0:
            return CacheUpdate(lang, before, 0, before)
        start = skip if not existing else max(skip, max(s.index for s in existing) + 1)
        samples = list(existing)
        committed = len(samples)
        fetched = 0
        for text in self.source.load_texts(lang, need, start):
            samples.append(CachedSample(start + fetched, text))
            fetched += 1
            if progress is not None:
                progress.update(1)
            if len(samples) - committed >= commit_every:
                self._commit(lang, samples)
                committed = len(samples)
        if overwrite and not fetched:
            raise UserError(f"the source returned no samples for language {lang!r} from record "
                            f"{start}; the cache was left as it was (check --skip and the source)")
        if len(samples) > committed:
            self._commit(lang, samples)
        return CacheUpdate(lang, before, fetched, len(samples), start=start, exhausted=fetched < need)


@dataclass
class Corpus:
    """The texts per language that chunks are built from, and how they were obtained."""

    texts: dict[str, list[str]]
    updates: dict[str, CacheUpdate] = field(default_factory=dict)

    @property
    def langs(self) -> list[str]:
        return list(self.texts)


def collect_corpus(source: DataSource, langs: list[str] | None, samples_per_lang: int, *,
                   skip: int = 0, cache_dir: str | Path | None = None, overwrite: bool = False,
                   progress: bool = False) -> Corpus:
    """``samples_per_lang`` texts for each language, through the cache when ``cache_dir`` is set.

    Without a cache the texts are read straight from the source (right for local files and the
    built-in corpus). A language for which neither cache nor source has any text is an error.
    """
    langs = resolve_langs(source, langs)
    if samples_per_lang < 1:
        raise UserError(f"--samples-per-lang must be at least 1, not {samples_per_lang}")
    cache = CorpusCache(cache_dir, source) if cache_dir is not None else None
    texts: dict[str, list[str]] = {}
    updates: dict[str, CacheUpdate] = {}
    for lang in langs:
        if cache is None:
            bar = _bar(progress, samples_per_lang, f"read {lang}")
            got = []
            for text in source.load_texts(lang, samples_per_lang, skip):
                got.append(text)
                bar.update(1)
            bar.close()
            texts[lang] = got
            updates[lang] = CacheUpdate(lang, 0, len(got), len(got), start=skip,
                                        exhausted=len(got) < samples_per_lang)
        else:
            have = 0 if overwrite else cache.count(lang)
            bar = _bar(progress, max(samples_per_lang - have, 0), f"fetch {lang}")
            try:
                updates[lang] = cache.top_up(lang, samples_per_lang, skip=skip, overwrite=overwrite,
                                             progress=bar)
            finally:
                bar.close()
            texts[lang] = cache.texts(lang, samples_per_lang)
        if not texts[lang]:
            raise UserError(f"the {source.name or type(source).__name__} source has no samples for "
                            f"language {lang!r} (from record {skip}); check the source, --langs "
                            "and --skip")
    return Corpus(texts, updates)


def resolve_langs(source: DataSource, langs: list[str] | None) -> list[str]:
    """The requested languages, or the source's defaults; duplicates removed, order kept."""
    if not langs:
        langs = list(source.default_langs or [])
        if not langs:
            raise UserError("no languages given; name them with --langs (for example --langs en de)")
    return list(dict.fromkeys(langs))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", leave=False)
