"""The package's import graph has no cycles: modules import downwards only.

Read from the source with `ast` (nothing is imported), every `import` / `from ... import` counted,
those inside functions included: a function-level import that closes a cycle is still a cycle, only
deferred. Importing `splitnet.a.b` also runs `splitnet/a/__init__.py`, so an import adds an edge to
each package on the way that the importing module is not itself inside.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "splitnet"


def _modules() -> dict:
    """{module name: path} for every .py file of the package."""
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: Path, known: dict) -> set:
    """The package modules `name` imports, as absolute names (the module, or the package, it names)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known)
    targets = set()
    for t in found:
        if t != ROOT and not t.startswith(ROOT + "."):
            continue
        while t not in known:  # `import splitnet.x.y` of an attribute: the module that holds it
            t = t.rpartition(".")[0]
        targets.update(a for a in [*_ancestors(t), t] if a not in _ancestors(name) and a != name)
    return targets


def _graph() -> dict:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycle(graph: dict):
    """One cycle as a list of nodes, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_modules_import_without_cycles():
    graph = _graph()
    assert len(graph) > 20 and "splitnet.data.loader" in graph["splitnet.data"]  # the parser sees imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_subpackages_import_downwards():
    """Collapsed to the top-level parts (splitnet.model, splitnet.train, splitnet.data, ...), the graph
    is still acyclic: the subpackages are layers, not just files in folders."""
    def part(name):
        return ".".join(name.split(".")[:2])

    graph = {}
    for name, targets in _graph().items():
        if name == ROOT:
            continue  # the package's __init__ re-exports the public API from every layer
        graph.setdefault(part(name), set()).update(part(t) for t in targets if part(t) != part(name))
    cycle = _cycle(graph)
    assert cycle is None, "cycle between parts of the package: " + " -> ".join(cycle)


def test_python_requires_covers_what_the_sources_use():
    """setup.cfg's python_requires is at least the newest Python feature the sources use: tomllib and
    BaseException.add_note are 3.11 (pip would otherwise install on 3.10 and fail at the first import)."""
    import configparser
    import re
    cfg = configparser.ConfigParser()
    cfg.read(SRC.parent / "setup.cfg")
    low = tuple(int(v) for v in re.fullmatch(r">=\s*(\d+)\.(\d+)", cfg["options"]["python_requires"].strip()).groups())
    text = "".join(p.read_text() for p in _modules().values())
    needs = (3, 11) if ("import tomllib" in text or ".add_note(" in text) else (3, 8)
    assert low >= needs, f"python_requires >= {low}, but the sources need {needs}"


def test_subpackages_import_only_those_the_readme_lists_above_them():
    """The README's repository map lists the subpackages in their import order ("Each subpackage
    imports only splitnet/config.py and the subpackages listed above it"): the sentence is checked."""
    import re
    readme = (SRC.parent / "README.md").read_text()
    order = re.findall(r"^src/splitnet/(\w+)/", readme, re.M)
    assert len(order) >= 5 and "model" in order, order
    rank = {p: i for i, p in enumerate(order)}
    for name, targets in _graph().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in rank:
            continue
        for t in targets:
            tp = t.split(".")
            if len(tp) >= 2 and tp[1] in rank and tp[1] != parts[1]:
                assert rank[tp[1]] < rank[parts[1]], f"{name} imports {t}: {tp[1]} is not listed above {parts[1]}"
