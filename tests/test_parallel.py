"""``nn.DataParallel`` / ``nn.parallel.DistributedDataParallel`` on a cluster: inputs
sharded on dim 0, the exact single-process gradient, PyTorch's ``.module``, ``no_sync``."""
import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad import distributed

RNG = np.random.default_rng(21)


class Net(nn.Module):
    def __init__(self, log=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)
        self.log = log

    def forward(self, x):
        if self.log is not None:
            self.log.append(tuple(x.shape))           # what a print in forward would show
        return self.fc2(F.relu(self.fc1(x)))


def _net(log=None):
    dg.manual_seed(0)
    return Net(log)


def _grads(model):
    return [p.grad.numpy().copy() for p in model.parameters()]


@pytest.mark.parametrize("wrapper", [nn.DataParallel, nn.parallel.DistributedDataParallel])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_wrapped_model_gets_the_single_process_gradient(wrapper, workers):
    x = RNG.standard_normal((8, 5)).astype(np.float32)     # 8 rows: uneven over 3 workers
    y = RNG.integers(0, 3, 8)
    local = _net()
    F.cross_entropy(local(dg.from_numpy(x)), dg.from_numpy(y)).backward()
    with dg.init(workers=workers, backend="local") as cluster:
        net = _net()
        model = wrapper(net)
        assert model.module is net and model.cluster is cluster
        out = model(dg.from_numpy(x))
        assert out.placement == dg.Shard(0) and out.shape == (8, 3)
        loss = F.cross_entropy(out, dg.from_numpy(y))       # the target is local: sharded alike
        loss.backward()
        for g, ref in zip(_grads(net), _grads(local)):
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)
        assert list(model.state_dict()) == ["module." + k for k in net.state_dict()]
        assert [id(p) for p in model.parameters()] == [id(p) for p in net.parameters()]


def test_no_sync_accumulates_the_same_gradients_as_one_process():
    xs = [RNG.standard_normal((6, 5)).astype(np.float32) for _ in range(2)]
    ys = [RNG.integers(0, 3, 6) for _ in range(2)]
    local = _net()
    for x, y in zip(xs, ys):
        F.cross_entropy(local(dg.from_numpy(x)), dg.from_numpy(y)).backward()
    with dg.init(workers=2, backend="local") as cluster:
        net = _net()
        ddp = nn.parallel.DistributedDataParallel(net)
        with ddp.no_sync():
            F.cross_entropy(ddp(dg.from_numpy(xs[0])), dg.from_numpy(ys[0])).backward()
        F.cross_entropy(ddp(dg.from_numpy(xs[1])), cluster.shard(ys[1])).backward()
        for g, ref in zip(_grads(net), _grads(local)):
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)


def test_forward_runs_once_on_the_driver_and_sees_the_global_batch():
    log = []
    with dg.init(workers=3, backend="local"):
        model = nn.DataParallel(_net(log))
        model(dg.randn(10, 5)).sum().item()
    assert log == [(10, 5)]


def test_tensors_inside_structures_are_sharded_and_the_rest_passed_through():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, pair, scale=1.0, extra=None):
            a, b = pair
            return self.fc(a * b * scale) + extra["bias"]

    a, b = RNG.standard_normal((2, 4, 2)).astype(np.float32)
    with dg.init(workers=2, backend="local"):
        model = nn.DataParallel(TwoInputs())
        out = model((dg.from_numpy(a), dg.from_numpy(b)), scale=2.0,
                    extra={"bias": dg.ones(4, 1)})
        assert out.placement == dg.Shard(0)
        got = out.detach().numpy()
        w, bias = (p.detach().numpy() for p in model.module.fc.parameters())
    np.testing.assert_allclose(got, (a * b * 2) @ w.T + bias + 1, rtol=1e-5)


def test_without_a_cluster_one_is_made_with_the_defaults(monkeypatch):
    made = []

    real_init = distributed.init

    def fake_init(**kwargs):             # dg.init() with its defaults would start Ray
        made.append(kwargs)
        return real_init(workers=2, backend="local")
    monkeypatch.setattr(distributed, "init", fake_init)
    model = nn.parallel.DistributedDataParallel(_net())
    try:
        assert made == [{}] and model.cluster.world_size == 2
        again = nn.DataParallel(_net())                  # the active cluster is reused
        assert again.cluster is model.cluster and len(made) == 1
    finally:
        model.cluster.shutdown()


def test_what_the_wrappers_refuse():
    with dg.init(workers=2, backend="local"):
        with pytest.raises(NotImplementedError, match="dim 0 only"):
            nn.DataParallel(_net(), dim=1)
        with pytest.raises(TypeError, match="wraps an nn.Module"):
            nn.parallel.DistributedDataParallel(lambda x: x)
        with pytest.raises(TypeError, match="a distgrad tensor was expected"):
            nn.DataParallel(_net())(np.ones((4, 5), np.float32))


def test_a_local_target_is_sharded_only_when_that_loses_nothing():
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    with dg.init(workers=2, backend="local") as cluster:
        sharded = cluster.shard(x)
        plain = dg.from_numpy(np.ones((4, 3), np.float32))
        assert F.mse_loss(sharded, plain).item() == pytest.approx(((x - 1) ** 2).mean(), rel=1e-6)
        with_history = dg.autograd.Variable(dg.ones(4, 3), requires_grad=True) * 2
        with pytest.raises(distributed.PlacementError, match="shard it the same way"):
            F.mse_loss(sharded, with_history)           # not silently detached
        with pytest.warns(UserWarning, match="broadcast"):   # (4, 3) vs (3,): broadcast, as before
            loss = F.mse_loss(sharded, dg.ones(3))
        assert loss.item() == pytest.approx(((x - 1) ** 2).mean(), rel=1e-6)
