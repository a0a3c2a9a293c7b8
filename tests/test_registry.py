"""The op registry holds every fact about every op, and only it does.

``test_every_op_declares_its_facts`` walks ``distgrad.ops.OPS`` and names, for each op
missing a fact, the ``defop`` to fix (file and line). ``test_every_op_has_a_test_case``
checks the op table of ``tests/test_ops.py``. The last tests read the source: nothing
outside the registry decides by an op's name what the op does.
"""
import ast
import inspect
import os

import pytest

from distgrad import placement
from distgrad.ops import OPS, OpDef, defop
from distgrad.ops.registry import LINEAR_ALL, LINEAR_EACH, LINEAR_SUM

from test_ops import CASES, FORWARD_CASES, TESTED_ELSEWHERE  # noqa: E402  (tests/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _where(op):
    path, line = op.defined_at
    return f"{os.path.relpath(path, ROOT)}:{line}"


def _positional_inputs(forward):
    """Names of the inputs ``forward(xp, ...)`` cannot do without (no default, not *args)."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def missing_facts(op):
    """One line per fact ``op`` lacks, each naming the line to add to its ``defop``."""
    where, out = _where(op), []

    def need(what, fix):
        out.append(f"op {op.name!r}: {what}; add {fix} to its defop in {where}")

    if not callable(op.forward):
        need("no forward", "forward=lambda xp, x: ...")
    if not callable(op.placement):
        need("no placement rule", "placement=P.rule_<family> (distgrad/placement.py) or a rule "
                                  "defined beside the op")
    inputs = _positional_inputs(op.forward) or []
    if op.differentiable and op.variadic_vjp is None:
        if not any(callable(v) for v in op.vjps):
            need("no VJP", "one VJP per input (None for an input that never needs a "
                           "gradient), or differentiable=False")
        elif any(v is not None and not callable(v) for v in op.vjps):
            need("a VJP that is not a function", "lambda g, ans, *inputs, **attrs: ...")
    if op.linear_in not in (None, LINEAR_ALL, LINEAR_EACH, LINEAR_SUM):
        if not isinstance(op.linear_in, tuple) or (
                inputs and any(not 0 <= i < len(inputs) for i in op.linear_in)):
            need(f"linear_in={op.linear_in!r} names no input", "linear_in=(index, ...)")
    if op.inplace is not None and op.snapshot not in (True, False):
        need("an in-place form but no snapshot fact",
             "snapshot=True (its VJP reads input 0's old value) or snapshot=False")
    if op.inplace is None and op.snapshot is not None:
        need("snapshot= without an in-place form", "inplace=True or a kernel")
    if op.view is not None and not callable(op.view):
        need("a view fact that is not a function", "view=lambda base, out, attrs: (op, inputs, attrs)")
    if op.device_attr is not None:
        names = set(inspect.signature(op.forward).parameters)
        if op.device_attr not in names:
            need(f"device_attr={op.device_attr!r} is not an attr of its forward",
                 "the attr name its forward takes")
    return out


def test_every_op_declares_its_facts():
    problems = [line for name in sorted(OPS) for line in missing_facts(OPS[name])]
    assert not problems, "ops missing a fact:\n" + "\n".join(problems)


def test_the_fact_check_names_the_op_and_the_line_to_add():
    bare = OpDef("foo", lambda xp, a, b: a, vjps=(lambda g, ans, a, b: g,),
                 inplace=True, defined_at=(os.path.join(ROOT, "distgrad", "ops", "math.py"), 7))
    lines = missing_facts(bare)
    assert ("op 'foo': no placement rule; add placement=P.rule_<family> (distgrad/placement.py) "
            "or a rule defined beside the op to its defop in distgrad/ops/math.py:7") in lines
    assert not any("no VJP" in line for line in lines)
    assert any("no VJP" in line for line in missing_facts(OpDef("bar", lambda xp, a: a)))
    assert any("no snapshot fact" in line for line in lines)
    complete = OpDef("foo", lambda xp, a, b: a, vjps=(None, lambda g, ans, a, b: g),
                     placement=placement.rule_elementwise, linear_in=(1,), inplace=True,
                     snapshot=False)
    assert missing_facts(complete) == []


def test_defop_records_where_it_was_called():
    op = defop("_test_registry_where", lambda xp, x: x, lambda g, ans, x: g,
               placement=placement.rule_elementwise)
    try:
        assert op.defined_at == (__file__, inspect.currentframe().f_lineno - 3)
    finally:
        del OPS[op.name]


def test_defop_rejects_an_unknown_linearity():
    with pytest.raises(ValueError, match="linear_in"):
        defop("_test_registry_linear", lambda xp, x: x, linear_in="mostly")
    assert "_test_registry_linear" not in OPS


def test_view_facts_name_registered_ops():
    import distgrad as dg
    base = dg.ones(2, 3, 4)
    for name, op in sorted(OPS.items()):
        if op.view is None:
            continue
        attrs = {"reshape": {"shape": (6, 4)}, "transpose": {"dim0": 0, "dim1": 2},
                 "permute": {"dims": (2, 0, 1)}, "squeeze": {"dim": 0},
                 "unsqueeze": {"dim": 0}, "getitem": {"index": (0,)}}[name]
        out = base.apply(name, **attrs)
        back, inputs, at = op.view(base, out, attrs)
        assert back in OPS, f"op {name!r}: its view fact names unknown op {back!r}"
        restored = dg.apply_op(back, *inputs, **at)
        assert tuple(restored.shape) == (2, 3, 4) or back == "index_put", name


def test_every_op_has_a_test_case():
    """The op table of tests/test_ops.py covers the registry (its own meta-test explains how)."""
    missing = sorted(n for n in OPS if n not in CASES and n not in FORWARD_CASES
                     and n not in TESTED_ELSEWHERE)
    assert not missing, (f"ops without a case in tests/test_ops.py: {missing}; add "
                         f"CASES[{missing[0]!r}] = [Case(...)] there")


# ---------------------------------------------------------------- no op names outside the registry

def _op_name_tests(path, names=("op", "name", "op_name")):
    """``(line, text)`` of each comparison of an op or its name with a string or a set of
    strings (``op == "mean"``, ``name in ("add", "sub")``, ``op.name == ...``)."""
    tree = ast.parse(open(path).read())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left] + node.comparators
        names_op = any(isinstance(s, ast.Name) and s.id in names or
                       isinstance(s, ast.Attribute) and s.attr in ("name", "placement")
                       and isinstance(s.value, ast.Name) and s.value.id == "op" for s in sides)
        strings = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or
                      isinstance(s, (ast.Tuple, ast.Set, ast.List)) and s.elts and all(
                          isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)
                      for s in sides)
        if names_op and strings:
            found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("path", ["distgrad/placement.py", "distgrad/tensor.py", "distgrad/lazy.py",
                                  "distgrad/distributed.py"])
def test_no_module_decides_by_op_name(path):
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        pytest.skip(f"{path} is not in this tree")
    found = _op_name_tests(full)
    assert not found, (f"{path} decides by an op's name: "
                       + "; ".join(f"line {n}: {text}" for n, text in found)
                       + ". Make it a fact in the op's defop (distgrad/ops/registry.py) instead.")


def test_no_module_outside_the_registry_tests_an_op_by_name():
    """Across distgrad/, workers/ and scheduler/ (the op families excepted), nothing
    compares ``op`` or ``op.name`` with a string: a behaviour is a fact of the op."""
    from test_import_layers import discover
    found = [f"{os.path.relpath(path, ROOT)}:{n}: {text}"
             for mod, path in sorted(discover().items()) if not mod.startswith("distgrad.ops")
             for n, text in _op_name_tests(path, names=("op", "op_name"))]
    assert not found, "ops told apart by name outside their defop:\n" + "\n".join(found)


def test_the_op_name_scan_finds_a_name_test(tmp_path):
    src = tmp_path / "rules.py"
    src.write_text("def rule(op, p):\n    if op in ('sum', 'mean'):\n        return 1\n"
                   "    return op.name == 'x'\n")
    assert [n for n, _ in _op_name_tests(str(src))] == [2, 4]
