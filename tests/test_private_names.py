"""No module outside the core uses a ``_private`` name of another module (issue 15).

Read from the source (``ast``), never by importing, over distgrad/, workers/ and
scheduler/. Three forms count as a use of another module's private name:

- ``from X import _name`` where ``X`` is one of ours and ``X._name`` is not a module
  (a private *module* such as ``distgrad._backend`` is the package's own: importing it
  is fine; its private names are not);
- ``mod._name`` where ``mod`` is bound to one of our modules by an import;
- ``obj._name`` where ``_name`` is a private attribute or method that a class of another
  module defines (a ``def _name``, a ``self._name = ...`` or a class-level ``_name = ...``)
  and no class of the reading module defines too. ``self._x`` and ``cls._x`` are the
  class's own; dunder names are Python's.

The core, the Tensor and its engine, shares its internals among its own modules: the
Tensor's storage, views, engine, op families, placement rules and autograd (which installs
``Tensor.backward`` and drives the engine). Everyone else goes through public names:
``Tensor.store`` / ``Tensor.from_storage`` / ``Tensor.set_store`` for the values,
``Tensor.grad`` for the gradient, ``Tensor.init_requires_grad`` and ``Tensor.overwrite``.
"""
import ast
import os

from test_import_layers import ROOT, _is_package, _resolve, discover

CORE = ["distgrad._backend", "distgrad.storage", "distgrad.views", "distgrad.engine",
        "distgrad.tensor", "distgrad.ops", "distgrad.placement", "distgrad.autograd"]

# (reading module, private name): why it may. Nothing else.
ALLOWED = {
    ("distgrad.nn.modules", "_calculate_fan_in_and_fan_out"):
        "PyTorch's own name (torch.nn.init._calculate_fan_in_and_fan_out), which user "
        "scripts call: it is public API under a private-looking name",
}


def in_core(module):
    return any(module == c or module.startswith(c + ".") for c in CORE)


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def class_privates(tree):
    """Private attribute and method names that the classes of a module define."""
    out = set()
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        for n in ast.walk(cls):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(n.name)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) \
                    and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                out.add(n.attr)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                out.add(n.id)
    return {name for name in out if _private(name)}


def private_uses(modules):
    """``[(module, line, text, private name)]``: uses of another module's private names."""
    trees = {}
    for mod, path in modules.items():
        with open(path) as f:
            trees[mod] = ast.parse(f.read(), path)
    own = {mod: class_privates(tree) for mod, tree in trees.items()}
    definers = {}
    for mod, names in own.items():
        for name in names:
            definers.setdefault(name, set()).add(mod)
    found = []
    for mod, tree in sorted(trees.items()):
        aliases = {}                          # local name -> our module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, _is_package(modules[mod]), node) or ""
                for a in node.names:
                    if f"{base}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
                    elif _private(a.name) and base in modules and base != mod \
                            and not (in_core(mod) and in_core(base)):
                        found.append((mod, node.lineno, f"from {base} import {a.name}", a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            value, name = node.value, node.attr
            if isinstance(value, ast.Name) and value.id in aliases:
                target = aliases[value.id]
                if f"{target}.{name}" in modules or target == mod \
                        or (in_core(mod) and in_core(target)):
                    continue
            elif isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            elif name not in definers or name in own[mod] \
                    or (in_core(mod) and any(in_core(d) for d in definers[name])):
                continue
            found.append((mod, node.lineno, ast.unparse(node), name))
    return found


def test_no_module_outside_the_core_uses_another_modules_private_names():
    modules = discover()
    uses = [u for u in private_uses(modules)
            if (u[0], u[3]) not in ALLOWED]
    bad = sorted({f"{os.path.relpath(modules[m], ROOT)}:{line}: {text}"
                  for m, line, text, _ in uses})
    assert not bad, ("private names of another module used outside the core (give the "
                     "thing a public name or a small public interface):\n" + "\n".join(bad))


def test_the_allowances_are_still_needed():
    modules = discover()
    uses = private_uses(modules)
    stale = [key for key in ALLOWED if not any((m, n) == key for m, _, _, n in uses)]
    assert not stale, f"allowed uses that no longer occur (drop them from ALLOWED): {stale}"


def test_the_scan_finds_each_form_and_spares_the_fine_ones(tmp_path):
    pkg = tmp_path / "distgrad"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_backend.py").write_text("def _hidden():\n    pass\n")
    (pkg / "tensor.py").write_text(
        "class Tensor:\n    def __init__(self):\n        self._store = 1\n"
        "    def _helper(self):\n        return self._store\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "math.py").write_text(      # the core shares its internals
        "def f(t):\n    return t._helper(), t._store\n")
    (pkg / "lazy.py").write_text(
        "from . import _backend\nfrom .tensor import Tensor, _nothing\n"
        "from distgrad import tensor as tmod\n"
        "class Rec:\n    def __init__(self):\n        self._own = 0\n"
        "    def go(self, t, other):\n        _backend._hidden()\n        tmod._x\n"
        "        return t._store, other._own, self._own, t.__class__\n")
    found = {(m, text) for m, _, text, _ in private_uses(
        discover(str(tmp_path), {"distgrad": "distgrad"}))}
    assert found == {("distgrad.lazy", "from distgrad.tensor import _nothing"),
                     ("distgrad.lazy", "_backend._hidden"), ("distgrad.lazy", "tmod._x"),
                     ("distgrad.lazy", "t._store")}
