"""The plain backward's raw-array path (``array_vjps``): same gradients as the tensor path.

An op declared with ``array_vjps=True`` has its VJPs called on raw arrays when no graph of
the backward is wanted (``create_graph=False``), and gradients between such nodes stay
arrays. These tests state that nothing a user sees changes: the values and dtypes of the
VJPs on arrays and on tensors agree for every such op (broadcast operands, Python scalars,
0-d values), and the walk mixes both kinds of node, hooks, ``autograd.grad`` and in-place
checks as before (compared against PyTorch).
"""
import numpy as np
import pytest
import torch

import distgrad as dg
from distgrad.autograd import Variable
from distgrad.ops import OPS

ARRAY_OPS = sorted(name for name, op in OPS.items() if op.array_vjps)

# (shape of input 0, shape or Python scalar of input 1) for the binary ops
BINARY_OPERANDS = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), ()),
                   ((3,), 1.5), ((), (2, 3))]


def test_array_ops_are_declared_so_their_vjps_can_run_on_arrays():
    assert {"add", "sub", "mul", "div", "neg", "exp"} <= set(ARRAY_OPS)
    for name in ARRAY_OPS:
        op = OPS[name]
        assert op.variadic_vjp is None, name
        assert op.vjps and all(callable(v) for v in op.vjps), name


def _operands(name, rng):
    n_inputs = len(OPS[name].vjps)
    cases = BINARY_OPERANDS if n_inputs == 2 else [((3, 4),), ((),)]
    for shapes in cases:
        arrays = [s if isinstance(s, float) else
                  (rng.uniform(0.5, 2.0, s)).astype(np.float32) for s in shapes]
        yield arrays


@pytest.mark.parametrize("name", ARRAY_OPS)
def test_vjps_on_arrays_equal_vjps_on_tensors(name):
    op, rng = OPS[name], np.random.default_rng(0)
    for arrays in _operands(name, rng):
        out = np.asarray(op.forward(np, *arrays))
        g = rng.standard_normal(out.shape).astype(np.float32)
        tensors = [a if isinstance(a, float) else dg.Tensor.from_array(a) for a in arrays]
        for i, vjp in enumerate(op.vjps):
            if isinstance(arrays[i], float):
                continue
            on_arrays = np.asarray(vjp(g, out, *arrays))
            with dg.no_grad():
                on_tensors = vjp(dg.Tensor.from_array(g), dg.Tensor.from_array(out), *tensors)
            expected = on_tensors.store.array
            assert on_arrays.shape == np.shape(expected), (name, i)
            assert on_arrays.dtype == expected.dtype, (name, i)
            np.testing.assert_allclose(on_arrays, expected, rtol=1e-6, err_msg=f"{name} {i}")


def _pair(a):
    return (Variable(dg.tensor(a), requires_grad=True),
            torch.tensor(a, requires_grad=True))


def _graph(m, x, w):
    """Array nodes (mul, add, div, exp) and tensor nodes (sin, sum over a dim, matmul) mixed,
    a value used by both kinds (its node sums an array and a tensor), a broadcast weight."""
    y = x * w + 0.5
    z = y.sin() + y * 3                 # y's node receives a tensor and an array
    u = (z / 2).exp() - z.sum(1, keepdim=True)
    return (u @ m.ones(4, 2, dtype=u.dtype)).sum() + (-y).mean()


def test_a_mixed_graph_matches_pytorch():
    rng = np.random.default_rng(1)
    (dx, tx), (dw, tw) = _pair(rng.standard_normal((3, 4)) * 0.3), _pair(rng.standard_normal(4) * 0.3)
    _graph(dg, dx, dw).backward()
    _graph(torch, tx, tw).backward()
    np.testing.assert_allclose(dx.grad.numpy(), tx.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(dw.grad.numpy(), tw.grad.numpy(), rtol=1e-10)
    assert dx.grad.dtype == np.float64 and dw.grad.shape == (4,)


def _hooked(m, x, seen):
    y = x * 2 + 1
    # The hook first: distgrad runs hooks in registration order, PyTorch 2 runs the
    # retain_grad hook last whatever the order.
    y.register_hook(lambda g: seen.append(type(g)) or g * 3)
    y.retain_grad()
    z = (y * y).exp().sum()
    gx, = m.autograd.grad(z, [x], retain_graph=True)
    z.backward()
    return gx.numpy(), x.grad.numpy()


def test_hooks_retain_grad_and_autograd_grad_see_tensors_of_the_values_class():
    dx, tx = _pair(np.array([0.1, 0.2, 0.3]))
    seen = []
    for a, b in zip(_hooked(dg, dx, seen), _hooked(torch, tx, [])):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    assert seen == [dg.Variable, dg.Variable]        # the gradient of a Variable is one
    x = dg.tensor([0.1, 0.2], requires_grad=True)
    _hooked(dg, x, seen)
    assert seen[2:] == [dg.Tensor, dg.Tensor]


def test_a_zero_dim_chain_matches_pytorch():
    dx, tx = _pair(np.array(0.7))
    for m, x in ((dg, dx), (torch, tx)):
        y = x
        for _ in range(5):
            y = (y * 1.1 + 0.2).tanh().sigmoid().sqrt()
        y.backward()
    np.testing.assert_allclose(dx.grad.numpy(), tx.grad.numpy(), rtol=1e-10)
    assert dx.grad.shape == ()


def test_in_place_checks_are_unchanged():
    x = var = Variable(dg.tensor([1.0, 2.0]), requires_grad=True)
    a = x * 1
    y = a * a                    # reads a: a write to a must fail the backward
    a.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    b = x * 1
    z = b + 2                    # add reads no input value: the write is harmless
    b.add_(1)
    z.sum().backward()
    np.testing.assert_array_equal(var.grad.numpy(), [1.0, 1.0])
    e = (x * 1).exp()
    e.mul_(2)                    # exp's VJP reads its output
    with pytest.raises(RuntimeError, match="output of ExpBackward"):
        e.sum().backward()


def test_create_graph_still_differentiates_the_vjps():
    dx, tx = _pair(np.array([0.3, -0.4]))
    for m, x in ((dg, dx), (torch, tx)):
        y = (x * x / (x + 2)).exp().sum()
        g, = m.autograd.grad(y, [x], create_graph=True)
        g.sum().backward()
    np.testing.assert_allclose(dx.grad.numpy(), tx.grad.numpy(), rtol=1e-10)


def test_number_operands_give_numpys_own_results():
    """A Python number meets an array as a cached 0-d array of its float dtype: the same
    values and dtypes numpy gives for the number itself (NEP 50), both operand orders."""
    from distgrad.ops.registry import number_operand
    rng = np.random.default_rng(2)
    numbers = [1.001, 0.5, -3, 7, 1e-30, 3e38, 65504.0, 2 ** 24 + 1, 1 / 3, -2.5e-8]
    for dtype in (np.float16, np.float32, np.float64):
        a = (rng.standard_normal(50) * 10.0 ** rng.integers(-4, 4, 50)).astype(dtype)
        for s in numbers:
            z = number_operand(s, np.dtype(dtype))
            for f in (np.add, np.subtract, np.multiply, np.true_divide):
                with np.errstate(all="ignore"):
                    for want, got in ((f(a, s), f(a, z)), (f(s, a), f(z, a)),
                                      (f(a[0], s), f(a[0], z))):
                        assert type(got) is type(want) and got.dtype == want.dtype
                        np.testing.assert_array_equal(got, want)
    z = number_operand(0.25, np.dtype(np.float32))
    assert not z.flags.writeable and number_operand(0.25, np.dtype(np.float32)) is z
    for kept in (0.0, -0.0, float("nan"), float("inf"), 1e39, 2 ** 80):
        assert number_operand(kept, np.dtype(np.float32)) is kept
    assert number_operand(3, np.dtype(np.int64)) == 3


def test_the_number_operand_cache_keeps_only_cast_numbers():
    from distgrad.ops.registry import NUMBER_OPERANDS, number_operand
    f32 = np.dtype(np.float32)
    z = NUMBER_OPERANDS[0.375, f32]
    assert z.dtype == f32 and z == 0.375 and number_operand(0.375, f32) is z
    assert NUMBER_OPERANDS[0.375, np.dtype(np.float64)].dtype == np.float64
    for kept, dtype in ((0.0, f32), (1e39, f32), (3, np.dtype(np.int64))):
        assert NUMBER_OPERANDS[kept, dtype] is kept and (kept, dtype) not in NUMBER_OPERANDS


def test_integer_and_bool_operands_keep_numpys_rules():
    x = dg.tensor(np.array([1, 2, 3], dtype=np.int16))
    assert (x * 2).dtype == np.int16 and (x * 1.5).dtype == np.float64
    f = dg.tensor(np.array([1.0, 2.0], dtype=np.float32))
    assert (f * True).dtype == np.float32
    np.testing.assert_array_equal((2 ** 24 + 1 + f).numpy(), 2 ** 24 + 1 + f.numpy())
