"""The backward engine: errors, pruning, accumulation, higher order, hooks, Function."""
import math

import numpy as np
import pytest

import distgrad as dg
from distgrad.autograd import Function, GradcheckError, Variable, gradcheck


def var(a, grad=True, dtype=np.float64):
    return Variable(dg.tensor(np.asarray(a, dtype=dtype)), requires_grad=grad)


def rand(*shape, grad=True, seed=0):
    return var(np.random.default_rng(seed).standard_normal(shape), grad)


# ---------------------------------------------------------------- errors a PyTorch user knows

def test_backward_twice_without_retain_graph_names_the_node():
    x = rand(3)
    out = (x * x).sum()
    out.backward()
    first = x.grad.numpy().copy()
    with pytest.raises(RuntimeError, match=r"second time \(SumBackward\).*retain_graph=True"):
        out.backward()
    np.testing.assert_array_equal(x.grad.numpy(), first)      # nothing half-written


def test_second_backward_through_a_freed_subgraph_writes_no_partial_gradient():
    x, w = rand(3), rand(3, seed=1)
    y = x * 2
    y.sum().backward()
    z = (w * 3).sum() + y.sum()            # w's branch is fine, y's graph was freed
    with pytest.raises(RuntimeError, match="second time"):
        z.backward()
    assert w.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 2.0])


def test_non_scalar_backward_needs_gradient():
    x = rand(2, 3)
    y = x * 2
    with pytest.raises(RuntimeError, match=r"only for scalar outputs.*\(2, 3\).*gradient"):
        y.backward()
    assert x.grad is None


def test_backward_gradient_shape_mismatch_names_both_shapes():
    x = rand(2, 2)
    y = x * 2
    with pytest.raises(RuntimeError, match=r"\(3,\).*\(2, 2\)"):
        y.backward(dg.ones(3, dtype=dg.float64))
    with pytest.raises(RuntimeError, match=r"\(3,\).*\(2, 2\)"):
        dg.autograd.grad(y, [x], grad_outputs=dg.ones(3))
    assert x.grad is None


def test_grad_assignment_shape_mismatch_names_both_shapes():
    x = rand(2, 2)
    with pytest.raises(RuntimeError, match=r"\(3,\).*\(2, 2\)"):
        x.grad = dg.ones(3)


def test_backward_of_a_tensor_without_grad_is_an_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (dg.ones(2) * 2).sum().backward()


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(RuntimeError, match="floating point"):
        Variable(dg.tensor([1, 2, 3]), requires_grad=True)
    with pytest.raises(RuntimeError, match="floating point"):
        dg.arange(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="floating point"):
        dg.tensor([1, 2]).requires_grad_()


def test_requires_grad_of_non_leaf_cannot_change():
    y = rand(2) * 2
    with pytest.raises(RuntimeError, match="leaf"):
        y.requires_grad_(False)


def test_inplace_on_saved_input_raises_version_error():
    x, w = rand(4), rand(4, seed=1)
    a = x * 1
    b = a * a                                  # saves a (version 0)
    loss = b.sum() + (w * 2).sum()
    a.add_(1)                                  # a is now at version 1
    with pytest.raises(RuntimeError) as e:
        loss.backward()
    msg = str(e.value)
    assert "modified by an inplace operation" in msg and "MulBackward" in msg
    assert "version 1" in msg and "expected version 0" in msg and "(4,)" in msg
    assert x.grad is None and w.grad is None   # no partial gradient written


def test_inplace_on_saved_output_raises_version_error():
    x = rand(3)
    y = x.exp()                                # exp's VJP reads its output
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*ExpBackward"):
        y.sum().backward()


def test_inplace_through_a_view_bumps_the_base_version():
    x = rand(2, 3)
    a = x * 1
    b = a * a
    v = a.view(6)
    v.add_(1)
    assert a._store.version == v._store.version == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        b.sum().backward()
    c = a * a
    r = a[1]                                   # a basic index is a view too
    r.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()


def test_inplace_on_leaf_requiring_grad_is_an_error():
    x = rand(3)
    for f in (lambda: x.add_(1), lambda: x.mul_(2), lambda: x.zero_(), lambda: x[0].add_(1),
              lambda: x.__setitem__(0, 1.0)):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad.*in-place"):
            f()
    before = x.data.numpy().copy()
    with dg.no_grad():
        x.add_(1)                             # allowed without recording
    np.testing.assert_allclose(x.data.numpy(), before + 1)
    assert x.is_leaf and x.grad_fn is None


def test_inplace_ops_bump_the_version_counter():
    t = dg.zeros(3)
    versions = [t._store.version]
    for f in (lambda: t.add_(1), lambda: t.mul_(2), lambda: t.__isub__(1), lambda: t.zero_(),
              lambda: t.__setitem__(1, 5.0), lambda: t.fill_(2), lambda: t.copy_(dg.ones(3))):
        f()
        versions.append(t._store.version)
    assert versions == list(range(len(versions)))
    np.testing.assert_array_equal(t.numpy(), [1.0, 1.0, 1.0])


# ---------------------------------------------------------------- in-place gradients vs PyTorch

def _inplace_programs():
    def mul_pow(m, x, w):
        y = x * 1
        y.mul_(w)
        y.pow_(2)
        y.clamp_(max=2.0)
        return y.sum()

    def buffer(m, x, w):
        buf = m.ones(4, dtype=x.dtype)
        buf.mul_(w)                            # a plain tensor becomes part of the graph
        buf.div_(x * x + 1)
        return (buf * x).sum()

    def setitem(m, x, w):
        y = m.zeros(3, 4, dtype=x.dtype)
        y[1] = x
        y[m.tensor([0, 2, 0])] = w * 2         # repeated index: last write wins, like torch
        y[:, 1:3] *= 3
        return (y * y).sum()

    def through_view(m, x, w):
        a = x * 1
        v = a[1:]
        v.mul_(w[1:])                          # the base a must see the new history
        r = a.view(2, 2)
        r[0].add_(w[:2])
        return (a * a).sum()

    def sibling_views(m, x, w):
        a = x * 1
        v1 = a[0:2]
        v2 = a[1:]
        r = a.view(2, 2)
        c = r.t()
        v1.mul_(w[:2])                         # v2, r and c now depend on w too
        a.add_(w)                              # and v1, v2, r, c on this
        return (v2 * v2).sum() + (r * 3).sum() + (v1 ** 2).sum() + (c[0] * w[:2]).sum()

    def relu_sqrt(m, x, w):
        y = x * w
        y.relu_()
        z = y + 1
        z.sqrt_()
        u = z * 2
        u.exp_()
        return (u + z).sum()

    return [mul_pow, buffer, setitem, through_view, sibling_views, relu_sqrt]


@pytest.mark.parametrize("program", _inplace_programs(), ids=lambda f: f.__name__)
def test_inplace_gradients_match_torch(program):
    torch = pytest.importorskip("torch")
    a = np.array([0.5, -1.2, 0.8, 1.5])
    b = np.array([1.1, 0.7, -0.4, 0.9])
    x, w = var(a), var(b)
    program(dg, x, w).backward()
    tx, tw = (torch.tensor(v, requires_grad=True) for v in (a, b))
    program(torch, tx, tw).backward()
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), tw.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- engine mechanics

def test_long_chain_has_no_recursion_limit():
    x = var([1.0])
    y = x
    n = 100_000
    for i in range(n):
        y = y * 1.01 if i % 1000 == 0 else y + 0.5     # adds keep the backward cheap
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.01 ** (n // 1000)], rtol=1e-9)
    del y                                     # freeing the graph must not recurse either


def test_long_chain_autograd_grad_and_create_graph():
    x = var([0.3])
    y = x
    for _ in range(20_000):
        y = y + x * 0.0001
    g, = dg.autograd.grad(y, [x], create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), [1 + 20_000 * 0.0001])


class Counting(Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        Counting.calls += 1
        return grad * 2


def test_pruning_skips_branches_that_need_no_gradient():
    x, w = rand(3), rand(3, seed=1)
    Counting.calls = 0
    out = (x * x).sum() + Counting.apply(w).sum()
    gx, = dg.autograd.grad(out, [x], retain_graph=True)
    np.testing.assert_allclose(gx.numpy(), 2 * x.data.numpy())
    assert Counting.calls == 0, "the w branch ran although only d/dx was asked for"
    out.backward(inputs=[x], retain_graph=True)
    assert Counting.calls == 0 and w.grad is None
    out.backward()
    assert Counting.calls == 1


def test_no_node_for_ops_that_need_no_gradient():
    c = dg.ones(3)
    assert (c * 2).grad_fn is None and (c * 2).is_leaf
    x = rand(3)
    y = c * x                                  # only x's side needs a VJP
    assert y.grad_fn.next_nodes[0] is None and y.grad_fn.next_nodes[1] is not None


def test_vjp_not_run_for_inputs_without_grad(monkeypatch):
    from distgrad import ops
    called = []
    op = ops.OPS["mul"]
    orig = op.vjps
    monkeypatch.setattr(op, "vjps", (lambda *a: called.append(0) or orig[0](*a),
                                     lambda *a: called.append(1) or orig[1](*a)))
    x = rand(3)
    (x * dg.ones(3, dtype=dg.float64)).sum().backward()
    assert called == [0]


def test_gradients_accumulate_into_leaves_across_backwards():
    x = rand(3)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [5.0] * 3)
    x.grad = None
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.data.numpy())


def test_leaf_grad_is_not_an_alias_of_the_seed():
    x = rand(3)
    seed = dg.tensor([1.0, 2.0, 3.0], dtype=dg.float64)
    (x + 0).backward(seed)
    seed.add_(10)
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 2.0, 3.0])


def test_a_leaf_used_twice_gets_the_sum():
    x = rand(2, 2)
    y = x * x + x.exp() + x
    y.sum().backward()
    a = x.data.numpy()
    np.testing.assert_allclose(x.grad.numpy(), 2 * a + np.exp(a) + 1)


def test_retain_graph_allows_a_second_backward():
    x = rand(3)
    out = (x * x).sum()
    out.backward(retain_graph=True)
    out.backward()
    np.testing.assert_allclose(x.grad.numpy(), 4 * x.data.numpy())


def test_multiple_roots_with_gradients():
    x = rand(3)
    y1, y2 = x * 2, x * x
    dg.autograd.backward([y1, y2], [dg.ones(3, dtype=dg.float64), dg.tensor([1.0, 0.0, 2.0], dtype=dg.float64)])
    np.testing.assert_allclose(x.grad.numpy(), 2 + 2 * x.data.numpy() * [1, 0, 2])


# ---------------------------------------------------------------- higher order

def test_second_derivative_of_cube():
    x = rand(4)
    g, = dg.autograd.grad((x ** 3).sum(), [x], create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), 3 * x.data.numpy() ** 2)
    assert g.requires_grad and g.grad_fn is not None
    gg, = dg.autograd.grad(g.sum(), [x])
    np.testing.assert_allclose(gg.numpy(), 6 * x.data.numpy())


def test_mixed_partials():
    x, y = var([1.5]), var([-0.7])
    f = x * x * y + y.sin() * x
    gx, = dg.autograd.grad(f, [x], create_graph=True)       # 2xy + sin y
    gxy, = dg.autograd.grad(gx, [y])                          # 2x + cos y
    np.testing.assert_allclose(gxy.numpy(), 2 * 1.5 + math.cos(-0.7))


def _hvp_problem(m, x, A):
    return 0.5 * (x @ (A @ x)) + x.sin().sum() + (x * x).sum() ** 2


def test_hessian_vector_product_analytic():
    rng = np.random.default_rng(3)
    n = 5
    A = rng.standard_normal((n, n))
    a, v = rng.standard_normal(n), rng.standard_normal(n)
    x = var(a)
    f = _hvp_problem(dg, x, var(A, grad=False))
    g, = dg.autograd.grad(f, [x], create_graph=True)
    hv, = dg.autograd.grad((g * var(v, grad=False)).sum(), [x])
    s = a @ a
    H = 0.5 * (A + A.T) - np.diag(np.sin(a)) + 4 * s * np.eye(n) + 8 * np.outer(a, a)
    np.testing.assert_allclose(hv.numpy(), H @ v, rtol=1e-10)


def test_hessian_vector_product_vs_torch_through_many_ops():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    a, v = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    W = rng.standard_normal((4, 2))

    def f(m, x, W):
        h = (x @ W).tanh()
        s = h.log_softmax(1).sum() + x.sigmoid().prod(1).sum() + x.logsumexp(0).sum()
        return s + x.norm() * (x.abs() + 1).log().mean() + (x.relu() ** 2).sum() + x.amax(1).sum()

    x = var(a)
    g, = dg.autograd.grad(f(dg, x, var(W, grad=False)), [x], create_graph=True)
    hv, = dg.autograd.grad((g * var(v, grad=False)).sum(), [x])
    tx = torch.tensor(a, requires_grad=True)
    tg, = torch.autograd.grad(f(torch, tx, torch.tensor(W)), [tx], create_graph=True)
    thv, = torch.autograd.grad((tg * torch.tensor(v)).sum(), [tx])
    np.testing.assert_allclose(g.detach().numpy(), tg.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(hv.numpy(), thv.numpy(), rtol=1e-9, atol=1e-12)


def test_backward_create_graph_makes_grad_differentiable():
    x = rand(3)
    (x ** 3).sum().backward(create_graph=True)
    assert x.grad.requires_grad
    g = x.grad
    x.grad = None
    g.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 6 * x.data.numpy())


# ---------------------------------------------------------------- autograd.grad

def test_grad_returns_and_does_not_accumulate():
    x, w = rand(3), rand(3, seed=1)
    out = (x * w).sum()
    gx, gw = dg.autograd.grad(out, [x, w])
    np.testing.assert_allclose(gx.numpy(), w.data.numpy())
    np.testing.assert_allclose(gw.numpy(), x.data.numpy())
    assert x.grad is None and w.grad is None
    assert isinstance(gx, Variable) and not gx.requires_grad


def test_grad_allow_unused():
    x, unused = rand(3), rand(2)
    with pytest.raises(RuntimeError, match=r"input 1 \(shape \(2,\)\) was not used.*allow_unused"):
        dg.autograd.grad((x * 2).sum(), [x, unused])
    gx, gu = dg.autograd.grad((x * 2).sum(), [x, unused], allow_unused=True)
    assert gu is None
    np.testing.assert_allclose(gx.numpy(), [2.0] * 3)


def test_grad_with_grad_outputs_and_non_leaf_input():
    x = rand(3)
    h = x * 3
    y = h * h
    go = dg.tensor([1.0, 0.5, 2.0], dtype=dg.float64)
    gh, gx = dg.autograd.grad(y, [h, x], grad_outputs=go)
    np.testing.assert_allclose(gh.numpy(), 2 * h.data.numpy() * go.numpy())
    np.testing.assert_allclose(gx.numpy(), 3 * 2 * h.data.numpy() * go.numpy())


def test_grad_of_input_without_grad_is_an_error():
    x = rand(3)
    with pytest.raises(RuntimeError, match="does not require grad"):
        dg.autograd.grad((x * 2).sum(), [dg.ones(3)])


# ---------------------------------------------------------------- grad mode

def test_no_grad():
    x = rand(3)
    with dg.no_grad():
        y = x * 2
        assert not dg.is_grad_enabled()
        with dg.no_grad():
            pass
        assert not dg.is_grad_enabled()
    assert dg.is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None and y.is_leaf
    with pytest.raises(ValueError):
        with dg.no_grad():
            raise ValueError
    assert dg.is_grad_enabled()

    @dg.no_grad()
    def f(t):
        return t * 2
    assert f(x).grad_fn is None and dg.is_grad_enabled()
    with dg.no_grad():
        with dg.enable_grad():
            assert (x * 2).requires_grad


# ---------------------------------------------------------------- hooks, retain_grad, detach

def test_leaf_hook_replaces_gradient():
    x = rand(3)
    seen = []
    x.register_hook(lambda g: seen.append(g.numpy().copy()))
    x.register_hook(lambda g: g * 2)
    (x * 3).sum().backward()
    np.testing.assert_allclose(seen[0], [3.0] * 3)
    np.testing.assert_allclose(x.grad.numpy(), [6.0] * 3)


def test_non_leaf_hook_replaces_gradient_upstream():
    x = rand(3)
    y = x * 2
    seen = []
    y.register_hook(lambda g: seen.append(g.numpy().copy()) or g * 10)
    (y * y).sum().backward()
    np.testing.assert_allclose(seen[0], 2 * y.data.numpy())
    np.testing.assert_allclose(x.grad.numpy(), 10 * 2 * y.data.numpy() * 2)
    assert y.grad is None


def test_hook_on_tensor_without_grad_is_an_error():
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        dg.ones(2).register_hook(lambda g: g)


def test_retain_grad():
    x = rand(3)
    y = x * 2
    z = x * 3
    y.retain_grad()
    ((y * y).sum() + z.sum()).backward()
    np.testing.assert_allclose(y.grad.numpy(), 2 * y.data.numpy())
    assert z.grad is None
    x.retain_grad()                        # a no-op on a leaf
    assert x.grad is not None


def test_detach():
    x = rand(3)
    d = x.detach()
    assert not d.requires_grad and d.grad_fn is None and d.is_leaf
    assert d._store is x._store            # same storage
    (d * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), x.data.numpy())   # not 2x: d is a constant
    y = x * 2
    yd = y.detach()
    with dg.no_grad():
        yd.add_(1)
    np.testing.assert_allclose(y.data.numpy(), 2 * x.data.numpy() + 1)


# ---------------------------------------------------------------- custom Function

class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return grad * y


class MulAdd(Function):
    @staticmethod
    def forward(ctx, x, w, scale):
        ctx.save_for_backward(x, w)
        ctx.scale = scale
        return x * w * scale + w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w * ctx.scale, grad * (x * ctx.scale + 1), None


class WrongBackward(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * x                    # should be 2x


def test_custom_function_gradients():
    x = rand(3)
    y = Exp.apply(x)
    assert type(y.grad_fn).__name__ == "ExpBackward"
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.exp(x.data.numpy()))
    x, w = rand(2, 3), rand(2, 3, seed=1)
    assert gradcheck(lambda a, b: MulAdd.apply(a, b, 3.0), (x, w))


def test_custom_function_needs_input_grad():
    seen = []

    class Probe(Function):
        @staticmethod
        def forward(ctx, a, b):
            seen.append(ctx.needs_input_grad)
            return a * b

        @staticmethod
        def backward(ctx, grad):
            return grad, grad

    Probe.apply(rand(2), dg.ones(2, dtype=dg.float64))
    assert seen == [(True, False)]


def test_custom_function_saved_tensor_modified_in_place():
    x = rand(3)
    y = Exp.apply(x)
    y.mul_(2)                              # y is the very tensor Exp saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    a = x * 1
    out = MulAdd.apply(a, rand(3, seed=2), 2.0)
    a.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_custom_function_twice_without_retain_graph():
    x = rand(3)
    out = Exp.apply(x).sum()
    out.backward()
    with pytest.raises(RuntimeError, match="second time"):
        out.backward()


def test_custom_function_wrong_number_of_gradients():
    class Bad(Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, grad):
            return grad

    with pytest.raises(RuntimeError, match="returned 1 gradients.*2 inputs"):
        Bad.apply(rand(2), rand(2)).sum().backward()


def test_gradcheck_catches_a_wrong_backward():
    x = rand(3)
    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        gradcheck(WrongBackward.apply, (x,))
    assert gradcheck(WrongBackward.apply, (x,), raise_exception=False) is False
    assert gradcheck(lambda t: t * t, (x,))


def test_gradcheck_catches_a_dropped_dependence():
    class Detached(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return None

    with pytest.raises(GradcheckError):
        gradcheck(Detached.apply, (rand(2),))


def test_gradcheck_needs_float64():
    x = Variable(dg.randn(3), requires_grad=True)
    with pytest.raises(GradcheckError, match="float64"):
        gradcheck(lambda t: t * 2, (x,))


# ---------------------------------------------------------------- attributes

def test_volatile_attribute():
    t = dg.ones(2)
    assert Variable(t).volatile is False
    assert Variable(t, volatile=True).volatile is True
    assert Variable(t, requires_grad=True).volatile is False


@pytest.mark.parametrize("fn,name", [
    (lambda x, w: x + 2, "AddBackward"), (lambda x, w: x + w, "AddBackward"),
    (lambda x, w: x - w, "SubBackward"), (lambda x, w: x * w, "MulBackward"),
    (lambda x, w: x / w, "DivBackward"), (lambda x, w: x ** 2, "PowBackward"),
    (lambda x, w: -x, "NegBackward"), (lambda x, w: x.mean(), "MeanBackward"),
    (lambda x, w: x.sum(1), "SumBackward"), (lambda x, w: x @ w.t(), "MatmulBackward"),
    (lambda x, w: x[0], "GetitemBackward"), (lambda x, w: x.exp(), "ExpBackward"),
    (lambda x, w: x.log_softmax(1), "LogSoftmaxBackward"), (lambda x, w: x.view(-1), "ReshapeBackward"),
    (lambda x, w: dg.cat([x, w]), "CatBackward"), (lambda x, w: x.t(), "TransposeBackward"),
])
def test_grad_fn_class_names(fn, name):
    x, w = rand(2, 3), rand(2, 3, seed=1)
    y = fn(x, w)
    assert type(y.grad_fn).__name__ == name
    assert repr(y.grad_fn).startswith(f"<distgrad.autograd.{name} object at 0x")
    assert x.grad_fn is None and x.is_leaf and not y.is_leaf


def test_requires_grad_propagates():
    x = rand(2)
    c = dg.ones(2, dtype=dg.float64)
    assert (x + c).requires_grad and not (c + c).requires_grad
    assert isinstance(x + c, Variable)
    assert not Variable(c).requires_grad and Variable(c).is_leaf


def test_leaf_gradients_never_alias_each_other_or_the_graph():
    # add's VJP hands the same buffer to both inputs: each leaf must get its own array.
    x = dg.ones(3, requires_grad=True)
    y = dg.ones(3, requires_grad=True)
    z = x + y
    z.retain_grad()
    z.sum().backward()
    x.grad.data.mul_(5)
    assert y.grad.tolist() == [1.0, 1.0, 1.0]
    assert z.grad.tolist() == [1.0, 1.0, 1.0]
    (x + y).sum().backward()                   # in-place accumulation into x.grad only
    assert x.grad.tolist() == [6.0, 6.0, 6.0] and y.grad.tolist() == [2.0, 2.0, 2.0]


def test_a_chain_of_ops_still_runs_hooks_captures_and_custom_nodes_in_its_middle():
    # The walk takes a shortcut for an op's node with no hook and nothing captured: each of
    # these, in the middle of a chain of ops on raw arrays, must still be seen.
    x = var([1.0, 2.0])
    seen = []
    y = x * 3.0 + 1.0
    y.register_hook(lambda g: seen.append(type(g)) or g * 2)
    z = Exp.apply(y * 0.5) * 2.0
    w = (z - 1.0).sum()
    gy, gx = dg.autograd.grad(w, [y, x], retain_graph=True)
    ey = np.exp(0.5 * (3.0 * x.data.numpy() + 1.0))
    np.testing.assert_allclose(gy.numpy(), 2 * ey)            # captured after its hook ran
    np.testing.assert_allclose(gx.numpy(), 2 * 3.0 * ey)
    w.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * 3.0 * ey)
    assert seen == [Variable, Variable]


def test_op_results_carry_the_graph_flags_of_their_inputs():
    x, c = var([1.0, 2.0]), dg.tensor(np.array([1.0, 2.0]))
    y = x * 2.0
    assert type(y) is Variable and y.requires_grad and not y.is_leaf
    assert type(y.grad_fn).__name__ == "MulBackward" and y.grad_fn.next_nodes[1] is None
    z = c * 2.0
    assert type(z) is dg.Tensor and not z.requires_grad and z.grad_fn is None
    with dg.no_grad():
        n = x * 2.0
    assert type(n) is Variable and not n.requires_grad and n.grad_fn is None
    assert (x > 1.0).grad_fn is None and not (x > 1.0).requires_grad   # not differentiable
