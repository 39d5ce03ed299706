"""The searches a sweep can run, one module each; importing the package registers them all.

``make_search(cfg)`` gives the search object for a typed config, ``search_config(name, **values)``
a config, ``SEARCHES`` the registry (name -> class). See :mod:`ggufopt_ray.searches.base`.
"""

from ggufopt_ray.searches.base import (SEARCHES, Search, SearchFacts, TrialPlan, make_search, register_search,
                                       search_class, search_config)
from ggufopt_ray.searches import allocate, bub, combined, imatrix_size, quant_mix, quant_types, zfp  # noqa: F401,E402,I001

__all__ = ["SEARCHES", "Search", "SearchFacts", "TrialPlan", "make_search", "register_search", "search_class",
           "search_config"]
