"""The searches a sweep can run, one module each; importing the package registers them all.

Every module of this package (but ``base``) is imported here, so adding a search is one module
with a ``@register_search`` class plus one YAML in ``conf/search/`` — nothing else to edit.
``make_search(cfg)`` gives the search object for a typed config, ``search_config(name, **values)``
a config, ``SEARCHES`` the registry (name -> class). See :mod:`ggufopt_ray.searches.base`.
"""

import importlib
import pkgutil

from ggufopt_ray.searches.base import (SEARCHES, Search, SearchFacts, TrialPlan, make_search, register_search,
                                       search_class, search_config)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SEARCHES", "Search", "SearchFacts", "TrialPlan", "make_search", "register_search", "search_class",
           "search_config"]
