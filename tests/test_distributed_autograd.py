"""Distributed = local for every autograd feature: custom Functions, hooks,
``autograd.grad`` and ``create_graph`` on sharded values give the single-process
result (float64, uneven splits, 1-4 workers); errors name what is wrong.

The local backend runs the same worker code as Ray; a smaller sample runs on Ray.
"""
import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad.autograd import Function, Variable

SPLITS = [(1, None), (2, (3, 7)), (3, (1, 2, 7)), (4, (0, 5, 3, 2))]


class MyReLU(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return g * (x > 0).astype(g.dtype)


class ScaledTanh(Function):
    """Two inputs, a saved output and a float constant in backward."""

    @staticmethod
    def forward(ctx, x, w):
        y = (x * w).tanh()
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, y = ctx.saved_tensors
        d = g * (1.0 - y * y)
        return d * w, (d * x).sum(0)


class PeeksAtValue(Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * float(g.sum().item())


def _data(seed=0, n=10, f=4, classes=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, f)), rng.integers(0, classes, n)


def _model(seed=0):
    dg.manual_seed(seed)
    return nn.Linear(4, 5).double(), nn.Linear(5, 3).double()


def _grads(*modules):
    return [p.grad.data.numpy().copy() for m in modules for p in m.parameters()]


def _run_custom_between_layers(cluster, sizes, steps=3):
    X, Y = _data()
    l1, l2 = _model()
    if cluster is not None:
        cluster.replicate(l1)
        cluster.replicate(l2)
    opt = dg.optim.SGD(list(l1.parameters()) + list(l2.parameters()), lr=0.5)
    losses = []
    for _ in range(steps):
        x = cluster.shard(X, sizes=sizes) if cluster else dg.tensor(X)
        y = cluster.shard(Y, sizes=sizes) if cluster else dg.tensor(Y)
        h = MyReLU.apply(l1(x))
        w = Variable(dg.tensor(np.linspace(0.5, 1.5, 5)), requires_grad=False)
        loss = F.cross_entropy(l2(ScaledTanh.apply(h, w)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, _grads(l1, l2), [p.data.numpy().copy() for m in (l1, l2) for p in m.parameters()]


@pytest.fixture(params=SPLITS, ids=lambda s: f"{s[0]}w")
def split(request):
    n, sizes = request.param
    with dg.init(workers=n, backend="local", timeout_s=30) as cluster:
        yield cluster, sizes


def test_custom_function_between_layers_trains_every_layer_exactly(split):
    cluster, sizes = split
    ref = _run_custom_between_layers(None, None)
    got = _run_custom_between_layers(cluster, sizes)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
    for a, b in zip(got[1] + got[2], ref[1] + ref[2]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_custom_function_that_needs_a_value_names_itself():
    with dg.init(workers=2, backend="local", timeout_s=30) as cluster:
        x = cluster.shard(Variable(dg.tensor(np.ones((4, 2))), requires_grad=True))
        with pytest.raises(RuntimeError, match=r"PeeksAtValue\.backward needs the value"):
            PeeksAtValue.apply(x)
        # The cluster is still usable afterwards.
        assert (x * 3).sum().item() == 24.0


def _hooked_loss(X, W, b, scale_calls):
    def clip(g):
        scale_calls.append(1)
        return g.clamp(-0.05, 0.05)
    W.register_hook(clip)                               # a leaf: nonlinear in its gradient
    h = (X @ W + b).tanh()
    h.register_hook(lambda g: g * 3.0)                  # an intermediate value
    z = (h * h).mean(0)                                 # Partial: its gradient is replicated
    z.register_hook(lambda g: g.clamp(max=0.7))
    return z.sum() + 0.1 * (W * W).sum()


def test_hooks_on_parameters_and_intermediates_change_the_gradient_as_locally(split):
    cluster, sizes = split
    X, _ = _data(1, f=4)
    W0 = np.random.default_rng(2).standard_normal((4, 3))
    ref_calls, calls = [], []
    W = Variable(dg.tensor(W0), requires_grad=True)
    b = Variable(dg.tensor(np.zeros(3)), requires_grad=True)
    _hooked_loss(dg.tensor(X), W, b, ref_calls).backward()
    ref = W.grad.data.numpy().copy(), b.grad.data.numpy().copy()
    Wd = cluster.replicate(Variable(dg.tensor(W0), requires_grad=True))
    bd = cluster.replicate(Variable(dg.tensor(np.zeros(3)), requires_grad=True))
    _hooked_loss(cluster.shard(X, sizes=sizes), Wd, bd, calls).backward()
    np.testing.assert_allclose(Wd.grad.data.numpy(), ref[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bd.grad.data.numpy(), ref[1], rtol=1e-12, atol=1e-14)
    assert len(calls) == len(ref_calls) == 1                 # once per backward, as locally
    # The hooks matter: without them the gradient differs.
    W2 = Variable(dg.tensor(W0), requires_grad=True)
    b2 = Variable(dg.tensor(np.zeros(3)), requires_grad=True)
    h = (dg.tensor(X) @ W2 + b2).tanh()
    ((h * h).mean(0).sum() + 0.1 * (W2 * W2).sum()).backward()
    assert not np.allclose(W2.grad.data.numpy(), ref[0])


def test_a_hook_that_needs_a_value_fails_clearly_and_changes_nothing():
    with dg.init(workers=2, backend="local", timeout_s=30) as cluster:
        W = cluster.replicate(Variable(dg.tensor(np.ones((3, 1))), requires_grad=True))
        W.register_hook(lambda g: print(g))
        X = cluster.shard(np.ones((4, 3)))
        with pytest.raises(RuntimeError, match="a hook on a Replicate.. value of shape .3, 1. needs the value"):
            (X @ W).sum().backward()


def _penalty(X, W):
    out = (X @ W).tanh().sum()
    gX, = dg.autograd.grad(out, [X], create_graph=True)
    return ((gX.norm(dim=1) - 1) ** 2).mean() + (X @ W).mean()


def test_gradient_penalty_on_a_sharded_batch_is_exact(split):
    cluster, sizes = split
    X0, _ = _data(3, f=4)
    W0 = np.random.default_rng(4).standard_normal((4, 2))
    W = Variable(dg.tensor(W0), requires_grad=True)
    X = Variable(dg.tensor(X0), requires_grad=True)
    ref = _penalty(X, W)
    ref.backward()
    Wd = cluster.replicate(Variable(dg.tensor(W0), requires_grad=True))
    Xd = cluster.shard(Variable(dg.tensor(X0), requires_grad=True), sizes=sizes)
    got = _penalty(Xd, Wd)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(Wd.grad.data.numpy(), W.grad.data.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(Xd.grad.data.numpy(), X.grad.data.numpy(), rtol=1e-10, atol=1e-13)


def _hvp(X, W, v):
    loss = ((X @ W).tanh() ** 2).mean()
    g, = dg.autograd.grad(loss, [W], create_graph=True)
    hv, = dg.autograd.grad((g * v).sum(), [W])
    return g, hv


def test_hessian_vector_product_of_a_sharded_loss_is_exact(split):
    cluster, sizes = split
    X0, _ = _data(5, f=4)
    W0 = np.random.default_rng(6).standard_normal((4, 2))
    v = dg.tensor(np.random.default_rng(7).standard_normal((4, 2)))
    g_ref, hv_ref = _hvp(dg.tensor(X0), Variable(dg.tensor(W0), requires_grad=True), v)
    Wd = cluster.replicate(Variable(dg.tensor(W0), requires_grad=True))
    g, hv = _hvp(cluster.shard(X0, sizes=sizes), Wd, v)
    assert g.placement == dg.Partial() and hv.placement == dg.Partial()
    np.testing.assert_allclose(g.detach().numpy(), g_ref.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hv.numpy(), hv_ref.numpy(), rtol=1e-10, atol=1e-13)


def test_backward_with_create_graph_gives_second_derivatives(split):
    cluster, sizes = split
    X0, _ = _data(8, f=3)
    W0 = np.random.default_rng(9).standard_normal((3, 1))

    def run(X, W):
        ((X @ W).sin().mean() * 2).backward(create_graph=True)
        gW = W.grad
        W.grad = None
        (gW * gW).sum().backward()
        return W.grad.data.numpy().copy()
    ref = run(dg.tensor(X0), Variable(dg.tensor(W0), requires_grad=True))
    got = run(cluster.shard(X0, sizes=sizes), cluster.replicate(Variable(dg.tensor(W0), requires_grad=True)))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


def test_unused_input_of_grad_is_reported_as_locally():
    with dg.init(workers=2, backend="local", timeout_s=30) as cluster:
        W = cluster.replicate(Variable(dg.tensor(np.ones((3, 1))), requires_grad=True))
        U = cluster.replicate(Variable(dg.tensor(np.ones((2,))), requires_grad=True))
        out = (cluster.shard(np.ones((4, 3))) @ W).sum()
        with pytest.raises(RuntimeError, match=r"input 1 \(shape \(2,\)\) was not used in the graph"):
            dg.autograd.grad(out, [W, U], retain_graph=True)
        gW, gU = dg.autograd.grad(out, [W, U], allow_unused=True)
        assert gU is None
        np.testing.assert_allclose(gW.numpy(), np.full((3, 1), 4.0))


@pytest.mark.ray
def test_custom_function_hooks_and_penalty_on_ray(ray_session):
    ref = _run_custom_between_layers(None, None)
    with dg.init(workers=2, timeout_s=60) as cluster:
        got = _run_custom_between_layers(cluster, (4, 6))
        X0, _ = _data(3, f=4)
        W0 = np.random.default_rng(4).standard_normal((4, 2))
        W = Variable(dg.tensor(W0), requires_grad=True)
        _penalty(Variable(dg.tensor(X0), requires_grad=True), W).backward()
        Wd = cluster.replicate(Variable(dg.tensor(W0), requires_grad=True))
        _penalty(cluster.shard(Variable(dg.tensor(X0), requires_grad=True), sizes=(7, 3)), Wd).backward()
        np.testing.assert_allclose(Wd.grad.data.numpy(), W.grad.data.numpy(), rtol=1e-10)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
    for a, b in zip(got[1] + got[2], ref[1] + ref[2]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
