"""Data-source plugins: where calibration and evaluation text comes from.

A data source answers one question: "give me ``count`` records for language ``lang``, starting
at record ``skip``". The text of a record is found by a dotted field path (``text``,
``meta.body``, ``turns.0.content``; numeric segments index lists), so most corpora need no code,
only a path. Sources are chosen by a registered name (``hf``, ``oscar``, ``files``,
``builtin``), by an installed entry point in the group ``ggufopt_ray.datasources``, or from a
Python file plus a class name, as the original ``--datasource-plugin``/``--plugin-class`` did.

A custom plugin is a subclass of :class:`DataSource` that implements :meth:`load_records`::

    from ggufopt_ray.data.plugins import DataSource

    class MySource(DataSource):
        def load_records(self, lang, count, skip=0):
            for i in range(skip, skip + count):
                yield {"text": f"record {i} in {lang}"}

Its constructor receives ``source=`` (the dataset id or path given with ``--source``),
``text_field=`` and any ``--option KEY=VALUE`` pairs as keyword arguments.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from ggufopt_ray.errors import UserError

ENTRY_POINT_GROUP = "ggufopt_ray.datasources"

_REGISTRY: dict[str, type["DataSource"]] = {}


class DataSource(ABC):
    """Base class of every data source: records for a language, and the text inside a record.

    Subclasses implement :meth:`load_records`; :meth:`get_text` and :meth:`load_texts` work for
    any record made of nested dicts and lists (or a plain string, which is its own text).
    """

    #: registered name, set by :func:`register_source`
    name: str = ""
    #: languages to use when the user names none (``None``: the user must name them)
    default_langs: tuple[str, ...] | None = None
    #: whether library callers cache this source's text by default (remote: yes; local files: no)
    cache_by_default: bool = True

    def __init__(self, source: str | None = None, *, text_field: str = "text", **options: Any):
        self.source = source
        self.text_field = text_field or "text"
        self.options = options

    @abstractmethod
    def load_records(self, lang: str, count: int, skip: int = 0) -> Iterable[Any]:
        """Up to ``count`` records for ``lang``, starting at record number ``skip``.

        May return a list or a lazy iterator; fewer than ``count`` records means the source is
        exhausted. Record numbers must be stable: the same ``skip`` gives the same records.
        """

    def get_text(self, record: Any) -> str:
        """The text at ``self.text_field`` in ``record`` (a plain string is its own text)."""
        return extract_field(record, self.text_field)

    def load_texts(self, lang: str, count: int, skip: int = 0) -> Iterator[str]:
        """Texts of the records :meth:`load_records` yields, lazily."""
        for record in islice(iter(self.load_records(lang, count, skip)), count):
            yield self.get_text(record)

    def describe(self) -> dict[str, Any]:
        """What identifies the text this source yields (the corpus cache is keyed by it)."""
        cls = type(self)
        return {
            "plugin": self.name or f"{cls.__module__}.{cls.__qualname__}",
            "source": self.source,
            "text_field": self.text_field,
            "options": {k: v for k, v in sorted(self.options.items()) if v is not None},
        }

    def cache_key(self) -> str:
        """A short, file-name-safe key: a readable stem plus a hash of :meth:`describe`."""
        desc = self.describe()
        digest = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:12]
        stem = str(desc.get("source") or desc["plugin"]).rstrip("/").split("/")[-1]
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:40] or "source"
        return f"{desc['plugin'].split('.')[-1]}-{stem}-{digest}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, text_field={self.text_field!r})"


def extract_field(record: Any, path: str) -> str:
    """Follow a dotted ``path`` through nested dicts and lists; numeric segments index lists.

    A missing path is a :class:`UserError` that names the path, where it broke, and the keys that
    were there, so a wrong ``--text-field`` is fixed in one try. ``None`` reads as empty text.
    """
    if isinstance(record, str):
        return record
    value = record
    walked: list[str] = []
    for segment in path.split("."):
        if isinstance(value, dict):
            if segment not in value:
                keys = ", ".join(map(str, list(value)[:12])) or "none"
                raise UserError(f"records have no field {path!r} (missing {segment!r} after "
                                f"{'.'.join(walked) or 'the top level'}; keys there: {keys}); "
                                "set --text-field to the dotted path of the text")
            value = value[segment]
        elif isinstance(value, (list, tuple)):
            if not segment.lstrip("-").isdigit() or not -len(value) <= int(segment) < len(value):
                raise UserError(f"records have no field {path!r} ({'.'.join(walked) or 'the record'} "
                                f"is a list of {len(value)} items and {segment!r} is not an index "
                                "into it); set --text-field to the dotted path of the text")
            value = value[int(segment)]
        else:
            raise UserError(f"records have no field {path!r} ({'.'.join(walked) or 'the record'} "
                            f"is a {type(value).__name__}, not a mapping or list); "
                            "set --text-field to the dotted path of the text")
        walked.append(segment)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"field {path!r} holds a {type(value).__name__}, not text; "
                        "set --text-field to the dotted path of a text field")
    return value


def register_source(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: make a :class:`DataSource` subclass available as ``--plugin NAME``."""

    def decorate(cls: type[DataSource]) -> type[DataSource]:
        if not (isinstance(cls, type) and issubclass(cls, DataSource)):
            raise TypeError(f"{cls!r} is not a DataSource subclass")
        cls.name = name
        for key in (name, *aliases):
            _REGISTRY[key] = cls
        return cls

    return decorate


def _load_builtin_sources() -> None:
    # Importing the modules runs their @register_source decorators.
    from ggufopt_ray.data import hf, local  # noqa: F401


def registered_sources() -> dict[str, str]:
    """Names of the available sources and where each comes from (``module:Class``).

    Installed entry points are listed without importing them, and never replace a built-in name.
    """
    _load_builtin_sources()
    found = {name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in _REGISTRY.items()}
    for ep in _entry_points():
        found.setdefault(ep.name, ep.value)
    return dict(sorted(found.items()))


def _entry_points():
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def _check_source_class(cls: Any, origin: str) -> type[DataSource]:
    if not (isinstance(cls, type) and issubclass(cls, DataSource)):
        raise UserError(f"{origin} is not a subclass of ggufopt_ray.data.plugins.DataSource; "
                        "derive the plugin class from it")
    if inspect.isabstract(cls):
        raise UserError(f"{origin} does not implement load_records(lang, count, skip); add it")
    return cls


def get_source_class(name: str) -> type[DataSource]:
    """The source class registered (or installed as an entry point) under ``name``."""
    _load_builtin_sources()
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in _entry_points():
        if ep.name == name:
            try:
                cls = ep.load()
            except Exception as exc:
                raise UserError(f"data-source plugin {name!r} (entry point {ep.value}) failed to "
                                f"import: {type(exc).__name__}: {exc}") from exc
            return _check_source_class(cls, f"entry point {name!r} ({ep.value})")
    known = ", ".join(sorted(registered_sources())) or "none"
    raise UserError(f"unknown data-source plugin {name!r}; known plugins: {known} "
                    "(or load one from a file with --plugin-file PATH --plugin-class NAME)")


def load_source_class_from_file(path: str | Path, class_name: str | None = None) -> type[DataSource]:
    """Import the Python file at ``path`` and return its :class:`DataSource` subclass.

    ``class_name`` picks the class; without it the file must define exactly one subclass.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file {path} does not exist; check --plugin-file")
    module_name = f"ggufopt_ray_plugin_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path} cannot be imported as a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise UserError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    if class_name:
        cls = getattr(module, class_name, None)
        if cls is None:
            raise UserError(f"plugin file {path} defines no class {class_name!r}; check --plugin-class")
        return _check_source_class(cls, f"{class_name} in {path}")
    candidates = [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, DataSource)
                  and obj.__module__ == module_name and not inspect.isabstract(obj)]
    if len(candidates) != 1:
        names = ", ".join(c.__name__ for c in candidates) or "none"
        raise UserError(f"plugin file {path} defines {len(candidates)} DataSource classes ({names}); "
                        "name one with --plugin-class")
    return candidates[0]


def make_source(plugin: str | None = None, *, plugin_file: str | Path | None = None,
                plugin_class: str | None = None, **options: Any) -> DataSource:
    """Instantiate a source by name or from a file; ``None``-valued options are left out."""
    if plugin_file:
        cls = load_source_class_from_file(plugin_file, plugin_class)
    else:
        cls = get_source_class(plugin or "builtin")
    kwargs = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"data-source plugin {cls.__name__} does not accept these options "
                        f"({', '.join(sorted(kwargs)) or 'none'}): {exc}") from exc
