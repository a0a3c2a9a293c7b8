"""``inplace=True`` activations and dropout write into their input, as in PyTorch: a model
that reads the input after an in-place activation (a residual over a ReLU(inplace=True))
gets PyTorch's values and gradients, locally and sharded over workers."""
import numpy as np
import pytest

import distgrad as dg
import distgrad.nn.functional as F
from distgrad.autograd import Variable

torch = pytest.importorskip("torch")

# (name, distgrad call, torch call) of each activation that takes inplace=
ACTIVATIONS = [
    ("relu", lambda F_, h, ip: F_.relu(h, inplace=ip)),
    ("leaky_relu", lambda F_, h, ip: F_.leaky_relu(h, 0.2, inplace=ip)),
    ("hardtanh", lambda F_, h, ip: F_.hardtanh(h, -0.5, 0.7, inplace=ip)),
    ("dropout_eval", lambda F_, h, ip: F_.dropout(h, 0.5, training=False, inplace=ip)),
    # a tensor method whose VJP reads the value before the write (the snapshot path)
    ("clamp_", lambda F_, h, ip: h.clamp_(-0.5, 0.5) if ip else h.clamp(-0.5, 0.5)),
]


def _residual(lib, F_, act, x, w, inplace):
    # h is modified in place by the activation when inplace: a + h then reads the new h.
    h = x @ w
    a = act(F_, h, inplace)
    return ((a + h) * (a + 1.0)).sum()


def _torch_ref(act, x, w, inplace):
    tw = torch.tensor(w, requires_grad=True)
    out = _residual(torch, torch.nn.functional, act, torch.tensor(x), tw, inplace)
    out.backward()
    return out.item(), tw.grad.numpy()


@pytest.mark.parametrize("name,act", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
@pytest.mark.parametrize("inplace", [False, True])
def test_local_matches_pytorch(name, act, inplace):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((6, 4)), rng.standard_normal((4, 3))
    ref_out, ref_grad = _torch_ref(act, x, w, inplace)
    dw = Variable(dg.tensor(w), requires_grad=True)
    out = _residual(dg, F, act, dg.tensor(x), dw, inplace)
    out.backward()
    assert np.isclose(out.item(), ref_out, rtol=1e-10)
    np.testing.assert_allclose(dw.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,act", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
@pytest.mark.parametrize("workers", [2, 3])
def test_sharded_matches_pytorch(name, act, workers):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((7, 4)), rng.standard_normal((4, 3))
    ref_out, ref_grad = _torch_ref(act, x, w, True)
    with dg.init(workers=workers, backend="local", timeout_s=30) as cluster:
        dw = cluster.replicate(Variable(dg.tensor(w), requires_grad=True))
        out = _residual(dg, F, act, cluster.shard(x), dw, True)
        out.backward()
        out = out.item()
    assert np.isclose(out, ref_out, rtol=1e-10)
    np.testing.assert_allclose(dw.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)


def test_modules_pass_inplace_on():
    x = dg.tensor([-1.0, 2.0])
    for module in (dg.nn.ReLU(inplace=True), dg.nn.LeakyReLU(0.1, inplace=True)):
        y = x.clone()
        assert module(y) is y and y[0].item() <= 0.0 and y[1].item() == 2.0
    y = x.clone()
    dg.nn.Dropout(1.0, inplace=True)(y)
    assert y.numpy().tolist() == [0.0, 0.0]
    assert repr(dg.nn.ReLU(inplace=True)) == "ReLU(inplace=True)" and repr(dg.nn.ReLU()) == "ReLU()"


def test_inplace_on_a_leaf_that_requires_grad_raises():
    leaf = Variable(dg.randn(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.relu(leaf, inplace=True)
