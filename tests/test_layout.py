"""The package's layering: which sub-package may import Ray, llama.cpp and ctypes.

CONTRIBUTING.md promises that Ray lives in ``distributed/`` (actors, tasks, the Tune adapter) and
llama.cpp's bindings and ctypes in ``engine/``, so the numeric core and the domain code can be
read, tested and reused without either. Every import statement counts, deferred ones too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ggufopt_ray

PACKAGE = Path(ggufopt_ray.__file__).resolve().parent

# top-level module -> the sub-package that alone may import it
OWNER = {"ray": "distributed", "llama_cpp": "engine", "ctypes": "engine"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def layering_violations(package: Path) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        sub = path.relative_to(package).parts[0]
        for root in sorted(imported_roots(path) & set(OWNER)):
            if sub != OWNER[root]:
                out.append(f"{path.relative_to(package)} imports {root} (only {OWNER[root]}/ may)")
    return out


def test_ray_llama_cpp_and_ctypes_stay_in_their_packages():
    assert layering_violations(PACKAGE) == []


def test_the_check_sees_deferred_imports(tmp_path):
    """A violation inside a function body is found (the check is not vacuous)."""
    (tmp_path / "distributed").mkdir()
    (tmp_path / "distributed" / "ok.py").write_text("import ray\n")
    (tmp_path / "sweep.py").write_text("def f():\n    from ray import tune\n    import ctypes.util\n")
    assert layering_violations(tmp_path) == ["sweep.py imports ctypes (only engine/ may)",
                                             "sweep.py imports ray (only distributed/ may)"]
