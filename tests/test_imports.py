"""The house's imports, read with ast (nothing is imported): no cycle between the project's modules,
visible or inside a function; no import of the project's own modules inside a function; an
in-function import of a third-party package only for a heavy optional dependency, with a comment
saying why; and no shared module of pruning/ importing a mode package or the registry."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> directory (pyproject's package-dir): the root's directories are subpackages of prunerzero
PACKAGES = {"prunerzero": "prunerzero", "prunerzero.core": "core", "prunerzero.primitives": "primitives",
            "prunerzero.models": "models", "prunerzero.pruning": "pruning", "prunerzero.fitness": "fitness",
            "prunerzero.evolve": "evolve"}
MODE_PACKAGES = ("unstructured", "structured", "attention", "skip", "experts")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the distribution."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p in PACKAGES.values() for p in parts[:1]) and folder == "prunerzero":
                continue
            out[".".join([package, *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(name: str, path: Path, known: dict[str, Path]):
    """(line, imported project module, inside a function?, the import node) for each import of `path`."""
    tree = ast.parse(path.read_text())
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = name if _is_package(path) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            yield node.lineno, target, id(node) in inside, node


def graph() -> tuple[dict[str, set[str]], list[str]]:
    known = modules()
    edges, in_function = {m: set() for m in known}, []
    for name, path in known.items():
        for line, target, inside, _ in imports(name, path, known):
            if target in known and target != name:
                edges[name].add(target)
                if inside:
                    in_function.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    return edges, in_function


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_the_projects_modules():
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_in_function_import_of_the_projects_own_modules():
    _, in_function = graph()
    assert in_function == []


def test_in_function_imports_are_heavy_optional_dependencies_with_a_reason():
    """Third-party imports inside functions are allowed only with a comment on the line (or the
    one above; once per package and module) saying why the import waits; the standard library is
    always imported at the top."""
    known = modules()
    bad = []
    for name, path in known.items():
        lines, justified = path.read_text().split("\n"), set()  # a package's reason, once per module
        for line, target, inside, node in sorted(imports(name, path, known), key=lambda i: i[0]):
            if not inside or target.startswith("prunerzero"):
                continue
            top = target.split(".")[0]
            if top in sys.stdlib_module_names:
                bad.append(f"{path.relative_to(ROOT)}:{line}: the standard library's {target} inside a function")
            elif "#" in lines[line - 1] or lines[line - 2].strip().startswith("#"):
                justified.add(top)
            elif top not in justified:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target} inside a function without a comment saying why")
    assert bad == []


def test_shared_pruning_modules_import_no_mode():
    """The shared part of pruning/ (flat files) imports no mode package and not the registry; a
    mode package imports no other mode and not the registry (the registry imports them)."""
    edges, _ = graph()
    modes = tuple(f"prunerzero.pruning.{m}" for m in MODE_PACKAGES)
    bad = []
    for source, targets in edges.items():
        if not source.startswith("prunerzero.pruning.") or source == "prunerzero.pruning.modes":
            continue
        own = next((m for m in modes if source == m or source.startswith(m + ".")), None)
        for target in targets:
            other = next((m for m in modes if target == m or target.startswith(m + ".")), None)
            if target == "prunerzero.pruning.modes" or (other is not None and other != own):
                bad.append(f"{source} imports {target}")
    assert bad == []


def test_the_walk_sees_the_layout():
    """The checks above read what they should: the registry imports every mode package."""
    edges, _ = graph()
    assert {f"prunerzero.pruning.{m}" for m in MODE_PACKAGES} <= edges["prunerzero.pruning.modes"]
    assert "prunerzero.pruning.skip.routers" in edges["prunerzero.pruning.skip.mode"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_every_package_is_installed():
    """Each folder with an __init__.py is a package pyproject.toml installs (a mode package missing
    there imports from a source tree and fails from a wheel)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in modules().items() if _is_package(path)}
    assert found <= listed, sorted(found - listed)
