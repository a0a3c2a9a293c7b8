"""Imports point down: the module-level import graph of distgrad/, workers/ and scheduler/
has no cycle, and the core layers import only at the top of their files.

The graph is read from the source (``ast``), never by importing. A module-level import
is one that runs when the module is imported: at the top, or inside a module-level
``if``/``try``/``with``/class body; an import inside a function runs later and is not an
edge (``if TYPE_CHECKING:`` blocks are skipped). ``from pkg import name`` is an edge to
the submodule ``pkg.name`` when there is one, else to ``pkg``. Importing ``a.b.c`` also
runs the package ``a.b``'s ``__init__``: that is an edge too, unless ``a.b`` is the
importer's own package (which is already being imported when its modules load).

Layers (DESIGN.md 4b), bottom to top: ``_backend``, ``storage``, ``ops.registry``,
``placement``, the op families, ``engine``, ``views``, ``tensor``, ``random`` /
``factories``, ``autograd``, ``nn`` / ``optim``; the distributed layer beside them;
``workers`` and ``scheduler`` above.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Top-level folders and the package names they are installed as (pyproject package-dir).
PACKAGES = {"distgrad": "distgrad", "workers": "distgrad.workers", "scheduler": "distgrad.scheduler"}
# Core modules: every import at the top of the file. An import inside a function there
# needs its reason on the same line (``# noqa: PLC0415  (why)``): an optional heavy
# dependency such as cupy.
CORE = ["distgrad._backend", "distgrad.storage", "distgrad.ops", "distgrad.placement",
        "distgrad.engine", "distgrad.views", "distgrad.tensor", "distgrad.random",
        "distgrad.factories", "distgrad.autograd", "distgrad.nn.functional", "distgrad.nn.modules",
        "distgrad.nn.module", "distgrad.nn.arguments", "distgrad.parameter", "distgrad.optim",
        "distgrad.serialization"]


def discover(root=ROOT, packages=PACKAGES):
    """``{module name: path}`` of every .py file under the package folders."""
    modules = {}
    for folder, name in packages.items():
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__pycache__"))]
            rel = os.path.relpath(dirpath, base)
            parts = [name] + ([] if rel == "." else rel.split(os.sep))
            for f in filenames:
                if f.endswith(".py"):
                    mod = parts if f == "__init__.py" else parts + [f[:-3]]
                    modules[".".join(mod)] = os.path.join(dirpath, f)
    return modules


def _is_package(path):
    return os.path.basename(path) == "__init__.py"


def _module_level_imports(tree):
    """Import nodes that run when the module is imported (not inside functions)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef, ast.For, ast.While)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return out


def _resolve(module, is_package, node):
    """Absolute base name of a relative ``from ... import``."""
    if node.level == 0:
        return node.module
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(module, is_package, node, modules):
    """Modules an import statement makes run."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _resolve(module, is_package, node)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return [n for n in names if n in modules or n.split(".")[0] == "distgrad"]


def _with_parents(target, importer, modules):
    """``target`` and each package ``__init__`` importing it runs, but not the importer's
    own packages (they are already being imported)."""
    own = importer.split(".")
    out = [target]
    parts = target.split(".")
    for k in range(1, len(parts)):
        pkg = ".".join(parts[:k])
        if pkg in modules and own[:k] != parts[:k]:
            out.append(pkg)
    return out


def import_graph(modules):
    """``{module: {imported module: line}}`` for the modules' module-level imports."""
    graph = {}
    for mod, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = graph.setdefault(mod, {})
        for node in _module_level_imports(tree):
            for target in _targets(mod, _is_package(path), node, modules):
                for t in _with_parents(target, mod, modules):
                    if t != mod and t in modules:
                        edges.setdefault(t, node.lineno)
    return graph


def find_cycle(graph):
    """One cycle as a list of nodes (first == last), or None. Iterative DFS."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        color[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = BLACK
                stack.pop()
                path.pop()
            elif color.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            elif color.get(nxt) == WHITE:
                color[nxt] = GREY
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def _describe(cycle, graph, modules):
    return "\n".join(f"  {a} ({os.path.relpath(modules[a], ROOT)}:{graph[a][b]}) imports {b}"
                     for a, b in zip(cycle, cycle[1:]))


def test_module_level_imports_have_no_cycle():
    modules = discover()
    graph = import_graph(modules)
    cycle = find_cycle(graph)
    assert cycle is None, ("a module-level import cycle (imports must point down the layers; "
                           "pass a higher layer in as a hook instead):\n"
                           + _describe(cycle, graph, modules))


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == \
        ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}, "d": {"a": 1, "c": 1}}) is None
    assert find_cycle({"x": {"x": 1}}) == ["x", "x"]


def test_the_graph_reads_relative_imports_submodules_and_packages(tmp_path):
    pkg = tmp_path / "distgrad"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import low\n")
    (pkg / "low.py").write_text("import numpy\n\ndef f():\n    from . import high\n")
    (pkg / "high.py").write_text("from .sub import thing\nfrom . import low\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import high\n")
    (pkg / "sub" / "thing.py").write_text("from ..low import f\n")
    modules = discover(str(tmp_path), {"distgrad": "distgrad"})
    graph = import_graph(modules)
    assert graph["distgrad.low"] == {}                      # the import inside f() is no edge
    assert set(graph["distgrad.high"]) == {"distgrad.sub.thing", "distgrad.sub", "distgrad.low"}
    assert set(graph["distgrad.sub.thing"]) == {"distgrad.low"}
    assert find_cycle(graph) == ["distgrad.high", "distgrad.sub", "distgrad.high"]


def _function_imports(path):
    """(line, text) of imports of distgrad's own modules inside functions, without a reason."""
    with open(path) as f:
        src = f.read()
    lines = src.splitlines()
    tree = ast.parse(src, path)
    top = set(map(id, _module_level_imports(tree)))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
            continue
        own = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(
            "distgrad")) or isinstance(node, ast.Import) and any(
            a.name.startswith("distgrad") for a in node.names)
        if own and "#" not in lines[node.lineno - 1]:
            found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


@pytest.mark.parametrize("prefix", CORE)
def test_core_modules_import_at_the_top(prefix):
    modules = discover()
    bad = [f"{os.path.relpath(path, ROOT)}:{n}: {text}"
           for mod, path in sorted(modules.items())
           if mod == prefix or mod.startswith(prefix + ".")
           for n, text in _function_imports(path)]
    assert not bad, ("imports inside functions in a core module (move them to the top; "
                     "if a lower layer needs a higher one, install a hook):\n" + "\n".join(bad))


def test_the_core_asks_the_cluster_only_what_lazy_runtime_lists():
    """tensor / autograd / nn.functional reach distributed values' owner only through
    ``storage.LazyRuntime``, and the Cluster provides every method it lists."""
    from distgrad.distributed import Cluster
    from distgrad.storage import LazyRuntime
    allowed = {n for n in vars(LazyRuntime) if not n.startswith("_")}
    modules = discover()
    used = {}
    for mod, path in modules.items():
        if not any(mod == c or mod.startswith(c + ".") for c in CORE):
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "cluster":
                used.setdefault(node.attr, f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert used, "the scan found no use of store.cluster: it no longer reads the code"
    extra = {name: where for name, where in used.items() if name not in allowed}
    assert not extra, f"the core asks the cluster for more than LazyRuntime lists: {extra}"
    missing = [name for name in allowed if not callable(getattr(Cluster, name, None))]
    assert not missing, f"Cluster lacks LazyRuntime methods: {missing}"
