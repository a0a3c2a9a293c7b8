"""Class-index losses (``F.cross_entropy``, ``F.nll_loss``) on a sharded batch.

The property: for every reduction, class weights or none, ignored targets (none, some, a
whole shard's, all), spatial targets, label smoothing and any uneven split over 1-4
workers, the loss and the gradients equal the single-process ones (float64). A sharded
'mean' records two ops (the global divisor, counted and all-reduced in one, then the
loss) and gives a Partial loss, whose backward needs no collective: that recording is
checked too.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import distgrad as dg
import distgrad.nn.functional as F
from distgrad.autograd import Variable
from distgrad.placement import Partial, PlacementError
from local_clusters import LocalClusters  # noqa: E402  (tests/ is on sys.path)

_cluster = LocalClusters()


@pytest.fixture(scope="module", autouse=True)
def _shutdown_clusters():
    yield
    _cluster.close()


def _split(rng, n, world):
    """An uneven split of n rows over ``world`` workers (a worker may get no row)."""
    cuts = np.sort(rng.integers(0, n + 1, world - 1))
    return tuple(int(x) for x in np.diff(np.concatenate([[0], cuts, [n]])))


def _problem(p):
    """Features, targets (some ignored), class weights and a weight matrix for case ``p``."""
    rng = np.random.default_rng(p["seed"])
    n, c, d = p["rows"], 4, 3
    spatial = (2,) if p["spatial"] else ()
    x = rng.standard_normal((n,) + spatial + (d,))
    t = rng.integers(0, c, (n,) + spatial)
    ignore = {"none": 0.0, "some": 0.4, "first_rows": 0.0, "all": 1.0}[p["ignored"]]
    t[rng.random(t.shape) < ignore] = p["ignore_index"]
    if p["ignored"] == "first_rows":
        t[: n // 2] = p["ignore_index"]
    w = rng.uniform(0.5, 2.0, c) if p["weight"] else None
    W = rng.standard_normal((d, c))
    return x, t, w, W, rng


def _loss(p, X, T, w, W):
    logits = X @ W                                  # (N, [2,] C)
    if p["spatial"]:
        logits = logits.permute(0, 2, 1)            # (N, C, 2)
    weight = None if w is None else dg.tensor(w)
    if p["op"] == "nll_loss":
        return F.nll_loss(F.log_softmax(logits, 1), T, weight, ignore_index=p["ignore_index"],
                          reduction=p["reduction"])
    return F.cross_entropy(logits, T, weight, ignore_index=p["ignore_index"],
                           reduction=p["reduction"], label_smoothing=p["smoothing"])


def _run(p, cluster=None, sizes=None):
    """Loss value, W's gradient and, for the second-order variant, W's gradient of
    loss + |dloss/dW|^2 (``create_graph``)."""
    x, t, w, W0, _ = _problem(p)
    W = Variable(dg.tensor(W0), requires_grad=True)
    X, T = dg.tensor(x), dg.tensor(t)
    if cluster is not None:
        W = cluster.replicate(W)
        X, T = cluster.shard(x, sizes=sizes), cluster.shard(t, sizes=sizes)
    loss = _loss(p, X, T, w, W)
    if p["reduction"] == "none":
        loss = (loss * loss).sum()
    if p["second_order"]:
        gW, = dg.autograd.grad(loss, [W], create_graph=True)
        loss = loss + (gW * gW).sum()
    loss.backward()
    return loss.item(), W.grad.numpy().copy()


cases = st.fixed_dictionaries({
    "op": st.sampled_from(["cross_entropy", "nll_loss"]),
    "reduction": st.sampled_from(["mean", "mean", "sum", "none"]),
    "weight": st.booleans(),
    "ignored": st.sampled_from(["none", "some", "first_rows", "all"]),
    "ignore_index": st.sampled_from([-100, 2]),
    "spatial": st.booleans(),
    "second_order": st.booleans(),
    "smoothing": st.sampled_from([0.0, 0.0, 0.2]),       # cross_entropy only
    "rows": st.integers(1, 11),
    "world": st.integers(1, 4),
    "seed": st.integers(0, 2 ** 16),
})


def _check(p, cluster):
    rng = np.random.default_rng(p["seed"] + 1)
    ref_loss, ref_grad = _run(p)
    loss, grad = _run(p, cluster, _split(rng, p["rows"], cluster.world_size))
    if np.isnan(ref_loss):                            # a mean over no target: 0/0, as PyTorch
        assert np.isnan(loss), p
        assert np.isnan(grad).all() == np.isnan(ref_grad).all(), p
        return
    assert loss == pytest.approx(ref_loss, rel=1e-10, abs=1e-12), p
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12, err_msg=str(p))


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # 0/0: all ignored
@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_sharded_class_index_losses_match_single_process(p):
    _check(p, _cluster(p["world"]))


def test_sharded_mean_records_two_ops_and_a_partial_loss():
    """The mean's divisor is counted and all-reduced by one op; the loss itself is Partial
    (each worker's sum over the global divisor): no all-reduce of it, forward or backward."""
    cluster = _cluster(2)
    x, t = np.random.default_rng(0).standard_normal((5, 3)), np.array([0, 1, 2, 1, 0])
    X, T = cluster.shard(x, sizes=(2, 3)), cluster.shard(t, sizes=(2, 3))
    cluster.sync()
    for op, logits in (("cross_entropy", X), ("nll_loss", F.log_softmax(X, 1))):
        cluster.sync()
        loss = getattr(F, op)(logits, T, dg.tensor([1.0, 2.0, 0.5]), ignore_index=1)
        ops = [ins[1] for ins in cluster.recorder.rec.instrs if ins[0] == "op"]
        assert ops[-2:] == ["nll_total_weight", op] and "allreduce" not in ops, ops
        assert isinstance(loss.placement, Partial)
        ref = getattr(F, op)(dg.tensor(x) if op == "cross_entropy" else
                             F.log_softmax(dg.tensor(x), 1), dg.tensor(t),
                             dg.tensor([1.0, 2.0, 0.5]), ignore_index=1)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)


def test_replicated_batch_counts_its_targets_once():
    """Every worker holding the whole batch: the divisor is not summed over the workers
    (not even when asked to), and the loss is the local one."""
    cluster = _cluster(3)
    x, t = np.random.default_rng(5).standard_normal((5, 3)), np.array([0, 1, 2, 1, -100])
    X, T = cluster.replicate(dg.tensor(x)), cluster.replicate(dg.tensor(t))
    assert dg.apply_op("nll_total_weight", T, across_workers=True).item() == 4.0
    w = dg.tensor([1.0, 2.0, 0.5])
    for op in ("cross_entropy", "nll_loss"):
        loss = getattr(F, op)(X, T, w)
        assert loss.item() == pytest.approx(getattr(F, op)(dg.tensor(x), dg.tensor(t), w).item(),
                                            rel=1e-12)


def test_sharded_mean_without_the_global_divisor_is_refused():
    """The op itself, asked for a sharded 'mean' without total_weight, refuses (a local
    mean per worker would be a different number)."""
    cluster = _cluster(2)
    X, T = cluster.shard(np.zeros((4, 3))), cluster.shard(np.array([0, 1, 2, 1]))
    for op in ("cross_entropy", "nll_loss"):
        with pytest.raises(PlacementError, match="total_weight"):
            dg.apply_op(op, X, T, None, reduction="mean")


def test_sharded_class_weights_are_refused():
    cluster = _cluster(2)
    X, T = cluster.shard(np.zeros((4, 3))), cluster.shard(np.array([0, 1, 2, 1]))
    w = cluster.shard(np.ones(4), sizes=(2, 2))
    with pytest.raises(PlacementError, match="must not be sharded"):
        dg.apply_op("nll_total_weight", T, w)
    with pytest.raises(PlacementError, match="must not be sharded"):
        dg.apply_op("cross_entropy", X, T, w, reduction="sum")


def test_sharded_loss_matches_torch():
    """Weights, ignored targets and a spatial dim, distributed, against PyTorch's loss and
    gradient."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 4, 2))
    t = rng.integers(0, 4, (7, 2))
    t[[0, 3, 4], [1, 0, 1]] = 3
    w = np.array([0.5, 1.0, 2.0, 3.0])
    cluster = _cluster(3)
    X = cluster.shard(Variable(dg.tensor(x), requires_grad=True), sizes=(3, 0, 4))
    loss = F.cross_entropy(X, cluster.shard(t, sizes=(3, 0, 4)), dg.tensor(w), ignore_index=3)
    gX, = dg.autograd.grad(loss, [X])
    tx = torch.tensor(x, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tx, torch.tensor(t), torch.tensor(w), ignore_index=3)
    tl.backward()
    assert loss.item() == pytest.approx(tl.item(), rel=1e-12)
    np.testing.assert_allclose(gX.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.ray
def test_sharded_losses_match_single_process_on_ray(ray_session):
    _cluster.close()                        # one cluster per process
    with dg.init(workers=3, timeout_s=60) as cluster:
        @settings(max_examples=10, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])
        @given(cases)
        def run(p):
            _check(p, cluster)
        run()
