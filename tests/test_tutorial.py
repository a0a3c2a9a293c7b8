"""The seed autograd tutorial runs on distgrad and prints the seed's numbers.

Checked three ways: as a script (``python examples/autograd_tutorial.py``), as the
``distgrad tutorial`` command (``python -m distgrad.cli tutorial``), both parsed from
their output, and through ``runpy`` whose returned globals (x, y, c, gradients) give the
exact values.
"""
import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest

import distgrad as dg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "autograd_tutorial.py")
SEED = os.path.join(ROOT, "tests", "data", "autograd_tutorial.txt")   # copy of the seed
BLOCK = re.compile(r"((?:^[ \-\d.e+]+\n)+)\[distgrad\.FloatTensor of size ([\dx()]+)\]", re.M)


def _run(args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _printed_part(transcript):
    """What the tutorial printed, without the CLI's header and its ``>>>``/``...`` labels."""
    body = transcript.split("\n\n", 1)[1]
    return "".join(ln for ln in body.splitlines(keepends=True) if not ln.startswith((">>> ", "... ")))


@pytest.fixture(scope="module", params=["script", "cli"])
def output(request):
    if request.param == "script":
        return _run([SCRIPT])
    return _printed_part(_run(["-m", "distgrad.cli", "tutorial"]))


def test_cli_labels_every_output_with_its_statement():
    out = _run(["-m", "distgrad.cli", "tutorial"])
    assert out.startswith("The classic PyTorch autograd tutorial")
    # Each printed value follows the statement that printed it.
    assert ">>> print(x)\nVariable containing:\n 1  1\n" in out
    assert ">>> print(c)\n" in out and ">>> out.backward()\n>>> print(x.grad)\nVariable containing:\n 4.5000" in out
    assert ">>> while y.data.norm() < 1000:\n...     y = y * 2\n" in out


def _blocks(text):
    """Printed FloatTensors: (numpy values, size text), in order."""
    return [(np.array([float(v) for v in vals.split()]), size) for vals, size in BLOCK.findall(text)]


def test_first_part_prints_the_seed_values(output):
    assert output.startswith("Variable containing:\n 1  1\n 1  1\n[distgrad.FloatTensor of size 2x2]\n")
    assert "data:  \n 1  1\n 1  1\n[distgrad.FloatTensor of size 2x2]\n" in output
    for line in ("grad:  None", "requires_grad True", "volatile False", "is_leaf True", "grad_fn None"):
        assert line + "\n" in output
    assert "Variable containing:\n 3  3\n 3  3\n[distgrad.FloatTensor of size 2x2]\n" in output
    assert re.search(r"^<distgrad\.autograd\.AddBackward object at 0x[0-9a-f]+>$", output, re.M)
    assert "Variable containing:\n 27  27\n 27  27\n[distgrad.FloatTensor of size 2x2]" in output
    assert re.search(r"Variable containing:\n 27\n\[distgrad\.FloatTensor of size", output)


def test_gradient_is_4_5_everywhere(output):
    grads = [v for v, size in _blocks(output) if size == "2x2" and not np.all(v == np.round(v))]
    assert len(grads) == 1
    np.testing.assert_array_equal(grads[0], [4.5] * 4)
    assert "Variable containing:\n 4.5000  4.5000\n 4.5000  4.5000\n" in output


def test_doubling_loop_gradient(output):
    size3 = [v for v, size in _blocks(output) if size == "3"]
    assert len(size3) == 4                      # x, y, gradients, x.grad
    x, y, gradients, grad = size3
    c = int(re.search(r"^(\d+)$", output, re.M).group(1))
    scale = 2.0 ** (c + 1)
    np.testing.assert_allclose(gradients, [0.1, 1.0, 0.0001])
    np.testing.assert_allclose(grad, gradients * scale, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(y, x * scale, rtol=1e-3, atol=5e-5 * scale)
    # The loop ran exactly until the norm reached 1000.
    assert np.linalg.norm(y) >= 1000 * (1 - 1e-4) and np.linalg.norm(y / 2) < 1000 * (1 + 1e-4)


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_runpy_globals_give_exact_values(seed, capsys):
    dg.manual_seed(seed)
    g = runpy.run_path(SCRIPT, run_name="__main__")
    printed = capsys.readouterr().out
    x, y, c, gradients = g["x"], g["y"], g["c"], g["gradients"]
    scale = 2.0 ** (c + 1)
    # Multiplying by powers of two is exact in float32: exact equality holds.
    np.testing.assert_array_equal(x.grad.numpy(), gradients.numpy() * scale)
    np.testing.assert_array_equal(y.data.numpy(), x.data.numpy() * scale)
    assert y.data.norm().item() >= 1000 > (y.data / 2).norm().item()
    assert g["out"].item() == 27.0 and g["z"].grad_fn is not None
    assert type(y.grad_fn).__name__ == "MulBackward" and y.requires_grad and x.is_leaf
    assert f"\n{c}\n" in printed
    assert printed.count("4.5000") == 4


def test_tutorial_is_the_seed_code():
    """Only the two import lines differ from the seed's code."""
    with open(SEED, encoding="utf-8") as f:
        seed = f.read()
    with open(SCRIPT, encoding="utf-8") as f:
        src = f.read()
    code = src.split('"""', 2)[2]               # after the module docstring
    lines = [ln.strip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    imports = [ln for ln in lines if ln.startswith(("import ", "from "))]
    assert imports == ["import distgrad as torch", "from distgrad.autograd import Variable"]
    missing = [ln for ln in lines if ln not in imports and ln not in seed]
    assert not missing, f"lines not in the seed tutorial: {missing}"
    assert len(lines) - len(imports) >= 25
