"""The README's PyTorch compatibility table is generated from the code: it must match the
code, and every name it lists as present must exist."""
import importlib
import os
import re

import pytest

from distgrad import compat, compat_table

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_table():
    with open(README) as f:
        doc = f.read()
    assert compat.BEGIN in doc and compat.END in doc, "README lost its compatibility table markers"
    return doc[doc.index(compat.BEGIN):doc.index(compat.END) + len(compat.END)]


def test_readme_table_is_the_generated_one():
    assert _readme_table() == compat.table(), (
        "README's compatibility table is stale: run python -m distgrad.compat_table --write README.md")
    assert compat_table.main(["--check", README]) == 0


def test_every_name_the_readme_lists_as_present_exists():
    rows = [line for line in _readme_table().splitlines() if line.startswith("| `torch")]
    assert len(rows) == len(compat.PYTORCH_NAMES)
    checked = 0
    for row in rows:
        namespace = re.match(r"\| `([\w.]+)`", row).group(1)
        module = compat.PYTORCH_NAMES[namespace][0]
        present = row.split(" | ")[1]
        for name in re.findall(r"`([\w.]+)`", present):
            assert compat.resolve(module, name) is not None, f"{namespace}.{name} is listed but missing"
            checked += 1
    assert checked > 150


def test_every_name_the_table_lists_as_missing_raises_the_clear_error():
    for namespace, (_, lack) in compat.availability().items():
        module = compat.PYTORCH_NAMES[namespace][0]
        for name in lack:
            where, _, leaf = name.rpartition(".")
            owner = compat.resolve(module, where) if where else importlib.import_module(module)
            with pytest.raises(compat.MissingFeatureError, match=re.escape(f"{namespace}.{name}")):
                getattr(owner, leaf)


def test_the_check_fails_on_a_stale_table(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text("intro\n" + compat.BEGIN + "\n| old |\n" + compat.END + "\nend\n")
    assert compat_table.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert compat_table.main(["--write", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("\nend\n")
    assert compat_table.main(["--check", str(stale)]) == 0
