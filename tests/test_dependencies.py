"""Every third-party module the project imports is declared in pyproject.toml.

A fresh install gets only what pyproject.toml names; a package that happens to be on the machine
(installed by hand, or pulled in by another dependency today) hides a missing declaration until a
user's first command fails. This walks every import with `ast` — at module level or inside a
function — in the installed packages, the experiment scripts and the tests.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}


DEPENDENCIES = _names(PYPROJECT["project"]["dependencies"])
EXTRAS = {extra: _names(reqs) for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
PACKAGE_DIRS = list(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
OWN = {"prunerzero", *PACKAGE_DIRS, "conftest"}


@functools.cache
def _distributions(module: str) -> frozenset[str]:
    found = _PACKAGES().get(module, [module])  # not installed: its own name
    return frozenset(d.lower().replace("_", "-") for d in found)


_PACKAGES = functools.cache(md.packages_distributions)


def _guarded_extra(node: ast.AST, parents: dict) -> str | None:
    """The extra an import's ImportError handler names (`prunerzero[extra]`), if it has one."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                text = ast.unparse(handler)
                if "ImportError" in text or "ModuleNotFoundError" in text:
                    match = re.search(r"prunerzero\[(\w+)\]", text)
                    if match:
                        return match.group(1)
    return None


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            # a script's helper beside it, or an experiment script a test drives
            sibling = any((folder / f"{top}.py").is_file() for folder in (path.parent, ROOT / "experiments"))
            if top not in sys.stdlib_module_names and top not in OWN and top != "__future__" and not sibling:
                yield top, node, parents


def _undeclared(folders: list[str], allowed: set[str]) -> list[str]:
    problems = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for top, node, parents in _imports(path):
                dists = _distributions(top)
                if dists & allowed:
                    continue
                extra = _guarded_extra(node, parents)
                if extra and dists & EXTRAS.get(extra, set()):
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                problems.append(f"{where} imports {top!r} (distribution {sorted(dists)}), which pyproject.toml "
                                "does not declare (nor an extra named in an ImportError handler around it)")
    return problems


def test_the_package_and_its_scripts_import_only_declared_dependencies():
    assert _undeclared([*PACKAGE_DIRS, "experiments"], DEPENDENCIES) == []


def test_the_tests_import_only_dependencies_and_the_test_extra():
    assert _undeclared(["tests"], DEPENDENCIES | EXTRAS["test"]) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    """The check itself can fail: an undeclared import hidden in a function body is reported."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("def f():\n    import surely_not_declared_xyz\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    [problem] = _undeclared(["pkg"], DEPENDENCIES)
    assert "pkg/mod.py:2" in problem and "surely_not_declared_xyz" in problem


def test_an_extra_counts_only_where_its_absence_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    named = "try:\n    import datasets\nexcept ImportError as e:\n    raise RuntimeError(\"pip install 'prunerzero[hf]'\") from e\n"
    (tmp_path / "pkg" / "named.py").write_text(named)
    (tmp_path / "pkg" / "bare.py").write_text("import datasets\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    [problem] = _undeclared(["pkg"], DEPENDENCIES)
    assert "pkg/bare.py:1" in problem
