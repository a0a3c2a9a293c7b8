"""Distributed runtime: sharded programs give the single-process result, exactly.

The local backend (threads) runs the same worker code as Ray actors; the Ray tests at
the end run on a real local Ray instance.
"""
import numpy as np
import pytest

import distgrad as dg
from distgrad.autograd import Variable
from distgrad.placement import Partial, PlacementError, Replicate, Shard

SPLITS = [(1, None), (2, None), (3, (1, 2, 7)), (4, (0, 5, 3, 2))]


def _data(seed=0, n=10, f=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, f)), rng.standard_normal((n, 1)), rng.standard_normal((f, 1))


def mlp_loss(X, Y, W, b):
    h = (X @ W + b).tanh()
    return ((h - Y) ** 2).mean() + 0.1 * (W * W).sum()


def local_reference(fn, *arrays, grads_of):
    leaves = [Variable(dg.tensor(a), requires_grad=True) if i in grads_of else dg.tensor(a)
              for i, a in enumerate(arrays)]
    out = fn(*leaves)
    out.backward()
    return out.item(), [leaves[i].grad.numpy().copy() for i in grads_of]


@pytest.fixture(params=SPLITS, ids=lambda s: f"{s[0]}w-{s[1]}")
def cluster(request):
    n, sizes = request.param
    c = dg.init(workers=n, backend="local", timeout_s=30)
    c.test_sizes = sizes
    yield c
    c.shutdown()


def test_replicated_leaf_gradient_is_exact_for_any_split(cluster):
    Xn, Yn, W0 = _data()
    b0 = np.array([0.3])
    ref_loss, (gW, gb) = local_reference(mlp_loss, Xn, Yn, W0, b0, grads_of=(2, 3))
    W = Variable(dg.tensor(W0), requires_grad=True)
    b = Variable(dg.tensor(b0), requires_grad=True)
    X, Y = cluster.shard(Xn, sizes=cluster.test_sizes), cluster.shard(Yn, sizes=cluster.test_sizes)
    loss = mlp_loss(X, Y, W, b)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(W.grad.data.numpy(), gW, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.grad.data.numpy(), gb, rtol=1e-12, atol=1e-14)


def test_sharded_leaf_gets_sharded_exact_gradient(cluster):
    Xn, Yn, W0 = _data(1)
    _, (gX,) = local_reference(lambda X, W: (X @ W).sigmoid().sum() * 2, Xn, W0, grads_of=(0,))
    X = cluster.shard(Variable(dg.tensor(Xn), requires_grad=True), sizes=cluster.test_sizes)
    out = (X @ dg.tensor(W0)).sigmoid().sum() * 2
    out.backward()
    assert X.grad.placement == Shard(0)
    np.testing.assert_allclose(X.grad.data.numpy(), gX, rtol=1e-12)


def test_batch_statistics_are_global(cluster):
    # BatchNorm-style normalisation over the sharded batch = SyncBatchNorm, no special code.
    Xn, _, _ = _data(2, n=10, f=4)
    g0 = np.linspace(0.5, 1.5, 4)

    def bn_loss(X, g):
        mu = X.mean(0)
        var = ((X - mu) ** 2).mean(0)
        return (((X - mu) / (var + 1e-5).sqrt()) * g).tanh().sum()
    ref, (gg,) = local_reference(bn_loss, Xn, g0, grads_of=(1,))
    g = Variable(dg.tensor(g0), requires_grad=True)
    out = bn_loss(cluster.shard(Xn, sizes=cluster.test_sizes), g)
    out.backward()
    assert out.item() == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(g.grad.data.numpy(), gg, rtol=1e-10)


def test_manual_sgd_loop_matches_local(cluster):
    """The tutorial style: a local leaf, sharded data, ``W.data -= lr * W.grad.data``."""
    Xn, Yn, W0 = _data(3)

    def run(shard):
        W = Variable(dg.tensor(W0), requires_grad=True)
        for _ in range(3):
            loss = ((shard(Xn) @ W - shard(Yn)) ** 2).mean()
            W.grad = None
            loss.backward()
            W.data -= 0.1 * W.grad.data
        return W.data.numpy().copy(), loss.item()
    W_ref, l_ref = run(dg.tensor)
    W_d, l_d = run(lambda a: cluster.shard(a, sizes=cluster.test_sizes))
    np.testing.assert_allclose(W_d, W_ref, rtol=1e-12)
    assert l_d == pytest.approx(l_ref, rel=1e-12)


def test_gradients_accumulate_across_backward_calls():
    Xn, Yn, W0 = _data(4)
    with dg.init(workers=2, backend="local") as c:
        W = Variable(dg.tensor(W0), requires_grad=True)
        X = c.shard(Xn, sizes=(4, 6))
        (X @ W).sum().backward()
        (X @ W).mean().backward()
        expected = Xn.sum(0)[:, None] * (1 + 1 / 10)
        np.testing.assert_allclose(W.grad.data.numpy(), expected, rtol=1e-12)


def test_nonscalar_backward_with_sharded_gradient():
    Xn, _, W0 = _data(5)
    G = np.random.default_rng(0).standard_normal((10, 1))
    with dg.init(workers=3, backend="local") as c:
        W = Variable(dg.tensor(W0), requires_grad=True)
        y = c.shard(Xn, sizes=(2, 3, 5)) @ W
        y.backward(dg.tensor(G))
        np.testing.assert_allclose(W.grad.data.numpy(), Xn.T @ G, rtol=1e-12)
        with pytest.raises(RuntimeError, match="scalar outputs"):
            (c.shard(Xn) @ W).backward()


def test_placement_propagation():
    Xn, _, W0 = _data()
    with dg.init(workers=2, backend="local") as c:
        X = c.shard(Xn)
        W = c.replicate(dg.tensor(W0))
        assert X.placement == Shard(0) and W.placement == Replicate()
        assert dg.tensor(W0).placement is None
        assert (X @ W).placement == Shard(0)
        assert X.sum().placement == Partial()
        assert X.mean(0).placement == Partial()
        assert X.sum(1).placement == Shard(0)
        assert X.T.placement == Shard(1)
        assert X.reshape(10, 3, 1).placement == Shard(0)
        assert X.unsqueeze(0).placement == Shard(1)
        assert (X.sum() + 1).placement == Replicate()        # affine: forward all-reduce
        assert (X.sum() * 2).placement == Partial()          # linear: stays Partial
        assert X.sum().item() == pytest.approx(Xn.sum())
        assert X.mean().item() == pytest.approx(Xn.mean())   # global count, not per worker
        assert X.shape == (10, 3) and (X @ W).shape == (10, 1)
        np.testing.assert_allclose(X[:, 1:].numpy(), Xn[:, 1:])
        np.testing.assert_allclose(X.log_softmax(1).numpy(),
                                   dg.tensor(Xn).log_softmax(1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("bad, words", [
    (lambda X: X[0], ["getitem", "Shard(0)"]),
    (lambda X: X.softmax(0), ["softmax", "Shard(0)"]),
    (lambda X: X.amax(0), ["amax", "Shard(0)"]),
    (lambda X: dg.cat([X, X], 0), ["cat", "Shard(0)"]),
    (lambda X: X + dg.ones(10, 3), ["add", "Shard(0)", "Replicate()"]),
])
def test_unsupported_placement_names_op_and_placement(bad, words):
    with dg.init(workers=2, backend="local") as c:
        X = c.shard(np.ones((10, 3)))
        with pytest.raises(PlacementError) as err:
            bad(X)
        for w in words:
            assert w in str(err.value)


def test_repeated_step_is_one_cached_message():
    Xn, Yn, W0 = _data()
    with dg.init(workers=2, backend="local") as c:
        W = c.replicate(Variable(dg.tensor(W0), requires_grad=True))
        sent = []
        for _ in range(4):
            before = c.messages_sent
            loss = ((c.shard(Xn) @ W - c.shard(Yn)) ** 2).mean()
            W.grad = None
            loss.backward()
            with dg.no_grad():
                W.data.sub_(W.grad.data * 0.1)
            loss.item()
            sent.append(c.messages_sent - before)
        assert sent == [1, 1, 1, 1]
        stats = c.gang.stats()
        assert all(s["cache_hits"] >= 2 for s in stats)   # step 1 also carried the put of W


def test_worker_rejects_bad_messages_and_stays_usable():
    from distgrad import program as prog
    from distgrad.workers.worker import Worker
    w = Worker(0, 1)

    def reply(msg, side=()):
        return prog.decode(*w.execute(msg, side))
    assert "malformed" in reply(b"\xc1garbage")["error"]
    assert "exceeds the limit" in prog.decode(*Worker(0, 1, max_message_bytes=10).execute(b"x" * 11))["error"]
    structure = {"instrs": [["op", "no_such_op", [], {}, 0, True]], "nslots": 1, "ext": [], "keep": []}
    msg = {"v": 1, "key": prog.structure_key(structure), "bind": [], "free": [], "prog": structure, "inputs": []}
    assert "unknown op 'no_such_op'" in reply(prog.encode(msg))["error"]
    structure = {"instrs": [["fetch"]], "nslots": 1, "ext": [], "keep": []}
    msg.update(prog=structure, key=prog.structure_key(structure))
    assert "expected 2 fields" in reply(prog.encode(msg))["error"]
    structure = {"instrs": [["put", 0, 0, False], ["op", "exp", [["s", 0]], {}, 1, True], ["fetch", 1]],
                 "nslots": 2, "ext": [], "keep": []}
    msg.update(prog=structure, key=prog.structure_key(structure), inputs=[np.zeros(3)])
    out = reply(prog.encode(msg))
    assert out["error"] is None and np.array_equal(out["fetched"][1], np.ones(3))


def test_replicate_module_like_object_keeps_parameters_on_workers():
    class Tiny:
        def __init__(self):
            self.w = Variable(dg.tensor(np.ones((3, 1))), requires_grad=True)

        def parameters(self):
            return [self.w]
    with dg.init(workers=2, backend="local") as c:
        m = c.replicate(Tiny())
        assert m.w.placement == Replicate() and m.w.requires_grad and m.w.is_leaf
        loss = (c.shard(np.ones((4, 3))) @ m.w).sum()
        loss.backward()
        with dg.no_grad():
            m.w.data.add_(m.w.grad.data, alpha=-0.5)
        np.testing.assert_allclose(m.w.data.numpy(), np.full((3, 1), 1 - 0.5 * 4))


def test_shutdown_makes_values_unusable():
    c = dg.init(workers=2, backend="local")
    X = c.shard(np.ones((4, 2)))
    c.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        X.sum().item()


# ----------------------------------------------------------------------------- Ray

@pytest.mark.ray
@pytest.mark.parametrize("n, sizes", [(2, (3, 7)), (3, None)])
def test_ray_backend_exact_gradient(ray_session, n, sizes):
    Xn, Yn, W0 = _data(7)
    b0 = np.array([-0.2])
    ref_loss, (gW, gb) = local_reference(mlp_loss, Xn, Yn, W0, b0, grads_of=(2, 3))
    with dg.init(workers=n, backend="ray", timeout_s=60) as c:
        W = Variable(dg.tensor(W0), requires_grad=True)
        b = Variable(dg.tensor(b0), requires_grad=True)
        loss = mlp_loss(c.shard(Xn, sizes=sizes), c.shard(Yn, sizes=sizes), W, b)
        loss.backward()
        assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
        np.testing.assert_allclose(W.grad.data.numpy(), gW, rtol=1e-12)
        np.testing.assert_allclose(b.grad.data.numpy(), gb, rtol=1e-12)
        pgs = list(c.gang.pgs)
    import ray
    assert pgs and all(ray.util.placement_group_table(pg)["state"] == "REMOVED" for pg in pgs)


@pytest.mark.ray
def test_ray_backend_leaves_no_shared_memory(ray_session):
    import os
    before = {f for f in os.listdir("/dev/shm") if f.startswith("distgrad_")}
    with dg.init(workers=2, backend="ray") as c:
        c.shard(np.ones((4, 2))).sum().item()
    after = {f for f in os.listdir("/dev/shm") if f.startswith("distgrad_")}
    assert after <= before


def test_fp16_compressed_buckets_are_close_not_exact():
    Xn, Yn, W0 = _data(8)
    b0 = np.array([0.1])
    _, (gW, _) = local_reference(mlp_loss, Xn, Yn, W0, b0, grads_of=(2, 3))
    with dg.init(workers=2, backend="local", compress="fp16") as c:
        W = Variable(dg.tensor(W0), requires_grad=True)
        b = Variable(dg.tensor(b0), requires_grad=True)
        mlp_loss(c.shard(Xn), c.shard(Yn), W, b).backward()
        np.testing.assert_allclose(W.grad.data.numpy(), gW, rtol=5e-3, atol=1e-3)
    with pytest.raises(ValueError, match="compress"):
        dg.init(workers=2, backend="local", compress="int8")


@pytest.mark.ray
def test_ray_gradient_buckets_use_the_shared_segment(ray_session):
    """Many small buckets through the zero-copy shm path still give the exact gradient."""
    Xn, Yn, W0 = _data(9)
    b0 = np.array([0.2])
    _, (gW, gb) = local_reference(mlp_loss, Xn, Yn, W0, b0, grads_of=(2, 3))
    with dg.init(workers=2, backend="ray", bucket_cap_mb=1e-5) as c:
        assert c.gang.collective == "shm"
        W = Variable(dg.tensor(W0), requires_grad=True)
        b = Variable(dg.tensor(b0), requires_grad=True)
        mlp_loss(c.shard(Xn, sizes=(2, 8)), c.shard(Yn, sizes=(2, 8)), W, b).backward()
        np.testing.assert_allclose(W.grad.data.numpy(), gW, rtol=1e-12)
        np.testing.assert_allclose(b.grad.data.numpy(), gb, rtol=1e-12)
        assert sum(s["bytes_communicated"] for s in c.stats()) > 0
        spans = [name for worker in c.gang.spans() for name, *_ in worker]
        assert sum("allreduce bucket" in s for s in spans) >= 2      # at least one per worker
        assert all("zero-copy" in s for s in spans if "allreduce bucket" in s)


def test_collective_ops_on_distributed_values_and_their_transposes():
    """allgather (Shard -> Replicate) and reduce_scatter (Partial -> Shard) as recorded ops,
    differentiated through their transposes."""
    Xn = np.random.default_rng(3).standard_normal((7, 3))
    with dg.init(workers=3, backend="local") as c:
        X = c.shard(Variable(dg.tensor(Xn), requires_grad=True), sizes=(2, 4, 1))
        G = X.apply("allgather", dim=0, sizes=(2, 4, 1))
        assert G.placement == Replicate() and G.shape == (7, 3)
        np.testing.assert_allclose(G.detach().numpy(), Xn)
        (G.sin() * 3).sum().backward()
        np.testing.assert_allclose(X.grad.data.numpy(), 3 * np.cos(Xn), rtol=1e-12)
        S = (X.sum(0, keepdim=True) * 1.0).expand(6, 3).apply("reduce_scatter", dim=0, sizes=(1, 2, 3))
        assert S.placement == Shard(0) and S.shape == (6, 3)
        np.testing.assert_allclose(S.detach().numpy(), np.repeat(Xn.sum(0, keepdims=True), 6, 0), rtol=1e-12)
        with pytest.raises(PlacementError, match="allreduce"):
            X.apply("allreduce")
