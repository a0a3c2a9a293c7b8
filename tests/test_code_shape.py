"""Sizes (issue 15): no function over 80 lines and no class over 300 lines in distgrad/,
workers/ and scheduler/ without its reason written on its ``def`` / ``class`` line as a
``# long: why`` comment. Read from the source (``ast``); a function's lines run from its
``def`` (decorators not counted) to its last statement, docstring and comments included.
"""
import ast
import os

from test_import_layers import ROOT, discover

FUNCTION_LINES = 80
CLASS_LINES = 300


def oversized(path):
    """``[(line, kind, name, length)]`` of functions and classes over the limits whose
    first line gives no ``# long:`` reason."""
    with open(path) as f:
        src = f.read()
    lines = src.splitlines()
    out = []
    for node in ast.walk(ast.parse(src, path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind, limit = "function", FUNCTION_LINES
        elif isinstance(node, ast.ClassDef):
            kind, limit = "class", CLASS_LINES
        else:
            continue
        length = node.end_lineno - node.lineno + 1
        if length > limit and "# long:" not in lines[node.lineno - 1]:
            out.append((node.lineno, kind, node.name, length))
    return out


def test_no_long_function_or_class_without_its_reason():
    bad = [f"{os.path.relpath(path, ROOT)}:{line}: {kind} {name} is {length} lines"
           for mod, path in sorted(discover().items())
           for line, kind, name, length in sorted(oversized(path))]
    assert not bad, (f"over {FUNCTION_LINES} lines (function) or {CLASS_LINES} (class): split "
                     "it where that makes it clearer, or write why beside it "
                     "(`def f(...):  # long: why`):\n" + "\n".join(bad))


def test_the_size_check_counts_lines_and_reads_reasons(tmp_path):
    body = "    x = 1\n" * 80
    path = tmp_path / "m.py"
    path.write_text(f"def short():\n{body[:-10]}\n"
                    f"def long():\n{body}\n"
                    f"def explained():  # long: one table\n{body}\n"
                    "class Big:\n" + "    def m(self):\n        pass\n" * 150)
    assert oversized(str(path)) == [(82, "function", "long", 81), (246, "class", "Big", 301)]
