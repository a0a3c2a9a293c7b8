"""The in-place axpby kernel works block by block on large arrays (distgrad/ops/fused.py):
it must give the bits the plain whole-array ufuncs give, for every layout, size and alias."""
import numpy as np
import pytest

import distgrad as dg
from distgrad.ops.fused import BLOCK_ELEMENTS


def _reference(x, y, a, b, alias=False):
    """What ``x.axpby_(y, a, b)`` computes, as whole-array numpy ufuncs (``alias``: y is x,
    so y is read after ``x *= a``, as PyTorch's ``x.mul_(a).add_(x, alpha=b)`` reads it)."""
    out = x.copy(order="K")
    y = out if alias else y
    if a != 1.0:
        np.multiply(out, a, out=out)
    np.add(out, y if b == 1.0 else np.multiply(y, b, dtype=out.dtype), out=out)
    return out


LAYOUTS = {
    "C": lambda a: np.ascontiguousarray(a),
    "F": lambda a: np.asfortranarray(a),
    "strided": lambda a: np.repeat(a, 2, axis=1)[:, ::2],   # not contiguous: unblocked path
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("coef", [(1.0, -0.01), (0.9, 0.1), (0.9, 1.0), (1.0, 1.0), (-2.0, 3.5)])
@pytest.mark.parametrize("layouts", [("C", "C"), ("F", "F"), ("C", "F"), ("strided", "C")])
@pytest.mark.parametrize("rows", [3, 4 * BLOCK_ELEMENTS // 100 + 7])   # below / above blocking
def test_inplace_axpby_matches_whole_array_ufuncs(dtype, coef, layouts, rows):
    rng = np.random.default_rng(rows)
    x = LAYOUTS[layouts[0]](rng.standard_normal((rows, 100)).astype(dtype))
    y = LAYOUTS[layouts[1]](rng.standard_normal((rows, 100)).astype(dtype))
    want = _reference(x, y, *coef)
    t = dg.tensor(x)
    t.axpby_(dg.tensor(y), *coef)
    np.testing.assert_array_equal(t.numpy(), want)


@pytest.mark.parametrize("coef", [(1.0, -0.5), (0.9, 0.1)])
def test_inplace_axpby_on_itself(coef):
    # x.axpby_(x): the operands alias, so the kernel must not read what it already wrote
    x = np.random.default_rng(0).standard_normal(5 * BLOCK_ELEMENTS).astype(np.float32)
    t = dg.tensor(x)
    t.axpby_(t, *coef)
    np.testing.assert_array_equal(t.numpy(), _reference(x, None, *coef, alias=True))


def test_inplace_axpby_against_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6 * BLOCK_ELEMENTS + 3,))
    y = rng.standard_normal(x.shape)
    t = dg.tensor(x.copy())
    t.axpby_(dg.tensor(y), 0.9, -0.01)
    tx = torch.tensor(x)
    tx.mul_(0.9).add_(torch.tensor(y), alpha=-0.01)
    np.testing.assert_allclose(t.numpy(), tx.numpy(), rtol=1e-14, atol=1e-15)
