"""Every module imports cleanly and does no work at import time (no files, no network)."""

import importlib
import pkgutil

import parley


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(parley.__path__, "parley.") if m.name != "parley.__main__"]
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)


def _imports_of(path, modules: set[str]) -> set[str]:
    """The parley modules a file imports anywhere in it (at the top or inside a function)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("parley"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & modules


def test_the_import_graph_has_no_circle():
    """No module reaches itself through imports, deferred ones included: each layer only
    looks down (the model knows nothing of the engine, the routes nothing of the app)."""
    from pathlib import Path

    root = Path(parley.__file__).parent
    files = {".".join(("parley", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {name: _imports_of(path, set(files)) - {name} for name, path in files.items()}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            assert name != start, f"{start} imports itself through {sorted(seen)}"
            if name not in seen:
                seen.add(name)
                todo += graph[name]
