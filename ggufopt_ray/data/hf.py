"""Hugging Face ``datasets`` sources: any hub dataset, a local copy, or local data files.

``source`` is what ``datasets.load_dataset`` takes as its path (a hub id such as
``HuggingFaceFW/fineweb-2``, a builder name such as ``parquet`` or ``json`` together with
``data_files``, or a local directory of data files), or a directory written by
``Dataset.save_to_disk``, which is opened with ``datasets.load_from_disk``. ``config`` is the
dataset configuration per language: a pattern where ``{lang}`` is replaced, as the OSCAR-style
``unshuffled_deduplicated_{lang}``; ``source`` and ``data_files`` may contain ``{lang}`` too. A
single multilingual dataset can instead be filtered per language with ``lang_field``.

With ``streaming`` nothing is downloaded up front: records are read as they are needed, which
is what makes fetching a few hundred samples per language from a terabyte corpus practical. A
token for gated datasets is taken from ``HF_TOKEN`` by ``datasets`` itself; nothing prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

from ggufopt_ray.data.plugins import DataSource, register_source
from ggufopt_ray.errors import UserError

_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _fill(value: Any, lang: str) -> Any:
    """Replace ``{lang}`` in a string, or in every string of a list or mapping."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.replace("{lang}", lang)
    if isinstance(value, dict):
        return {k: _fill(v, lang) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fill(v, lang) for v in value]
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no message'}"


@register_source("hf")
class HFDatasetSource(DataSource):
    """Any dataset ``datasets`` can open: hub id, local ``save_to_disk`` directory or data files."""

    def __init__(self, source: str | None = None, *, text_field: str = "text",
                 config: str | None = None, split: str = "train", data_files: Any = None,
                 streaming: bool = False, lang_field: str | None = None,
                 revision: str | None = None, hf_cache_dir: str | None = None, **options: Any):
        super().__init__(source, text_field=text_field, **options)
        self.config = config
        self.split = split or "train"
        self.data_files = data_files
        self.streaming = bool(streaming)
        self.lang_field = lang_field
        self.revision = revision
        self.hf_cache_dir = hf_cache_dir

    def describe(self) -> dict[str, Any]:
        desc = super().describe()
        source = self.source
        if source and Path(source).exists():
            source = str(Path(source).absolute())
        desc.update(source=source, config=self.config, split=self.split, data_files=self.data_files,
                    lang_field=self.lang_field, revision=self.revision)
        return desc

    def open_dataset(self, lang: str):
        """The ``datasets`` object (``Dataset`` or ``IterableDataset``) for ``lang``."""
        import datasets

        if not self.source:
            raise UserError("the hf source needs --source (a dataset id, a local directory or a "
                            "builder such as parquet with --data-files)")
        path = _fill(self.source, lang)
        name = _fill(self.config, lang)
        where = f"dataset {path!r}" + (f" config {name!r}" if name else "") + f" split {self.split!r}"
        try:
            if Path(path).is_dir() and any((Path(path) / m).exists() for m in _SAVED_MARKERS):
                ds = datasets.load_from_disk(path)
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise UserError(f"{path} has splits {', '.join(ds)}, not {self.split!r}; "
                                        "choose one with --split")
                    ds = ds[self.split]
                return ds.to_iterable_dataset() if self.streaming else ds
            return datasets.load_dataset(path, name=name, data_files=_fill(self.data_files, lang),
                                         split=self.split, streaming=self.streaming,
                                         revision=self.revision, cache_dir=self.hf_cache_dir)
        except UserError:
            raise
        except Exception as exc:  # datasets raises many types: not found, bad config, offline...
            raise UserError(f"cannot open {where} for language {lang!r} ({_first_line(exc)}); "
                            "check --source, --config-pattern, --split and --data-files") from exc

    def load_records(self, lang: str, count: int, skip: int = 0) -> Iterable[Any]:
        ds = self.open_dataset(lang)
        if self.lang_field:
            matching = (r for r in ds if str(r.get(self.lang_field)) == lang)
            return islice(matching, skip, skip + count)
        if hasattr(ds, "select"):  # an in-memory/memory-mapped Dataset: slice by index
            n = len(ds)
            return ds.select(range(min(skip, n), min(skip + count, n)))
        return ds.skip(skip).take(count)


@register_source("oscar")
class OscarSource(HFDatasetSource):
    """The original toolkit's OSCAR plugin as a preset: one config per language, streamed.

    Defaults: ``oscar-corpus/oscar``, config ``unshuffled_deduplicated_{lang}``, split ``train``,
    field ``text``, streaming. Every one of them can be overridden (for example a newer OSCAR
    release, which is gated: log in or set ``HF_TOKEN``).
    """

    def __init__(self, source: str | None = None, *, text_field: str = "text",
                 config: str | None = None, split: str = "train", streaming: bool = True,
                 **options: Any):
        super().__init__(source or "oscar-corpus/oscar", text_field=text_field,
                         config=config or "unshuffled_deduplicated_{lang}", split=split,
                         streaming=streaming, **options)
