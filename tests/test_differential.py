"""Differential tests: the distributed engine against the local one, as a property.

1. Every case of the op table (``tests/test_ops.py``) runs single-process and on 1-4
   workers of the local backend with its first input sharded unevenly along dim 0:
   values and ``autograd.grad`` gradients agree in float64, or the op refuses with
   ``PlacementError`` / ``NotImplementedError``. Never a different number.
2. Random small programs (hypothesis) mixing ops, a custom Function, hooks, in-place
   updates, ``autograd.grad`` with ``create_graph`` and ``backward``, on random worker
   counts and uneven splits: the same values and gradients as single-process.
A smaller sample of (2) runs on Ray.
"""
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import distgrad as dg
from distgrad.autograd import Function, Variable
from distgrad.placement import PlacementError

from local_clusters import LocalClusters  # noqa: E402  (tests/ is on sys.path)
from test_ops import CASES, _make_inputs, _outputs  # noqa: E402  (tests/ is on sys.path)

REFUSALS = (PlacementError, NotImplementedError)
_cluster = LocalClusters()


@pytest.fixture(scope="module", autouse=True)
def _shutdown_clusters():
    yield
    _cluster.close()


def _sizes(rng, n, world):
    """An uneven split of n rows over ``world`` workers, each getting at least one."""
    cuts = np.sort(rng.choice(np.arange(1, n), world - 1, replace=False)) if world > 1 else []
    return tuple(int(x) for x in np.diff(np.concatenate([[0], cuts, [n]])))


def _program(case, xs):
    outs = [o for o in _outputs(case.fn(dg, *xs)) if isinstance(o, dg.Tensor)
            and np.issubdtype(o.dtype, np.floating)]
    total = sum((o * o).sum() for o in outs)
    diff = [x for x in xs if x.requires_grad]
    grads = dg.autograd.grad(total, diff, allow_unused=True) if diff and total.requires_grad else []
    return [o.detach().numpy() for o in outs], [None if g is None else g.numpy() for g in grads]


_OPS = [(name, i) for name in sorted(CASES) for i, c in enumerate(CASES[name])
        if not c.gpu_only and name not in ("allreduce", "allgather", "reduce_scatter", "to_partial", "shard_rows",
                                     "unshard_rows")]


@pytest.mark.parametrize("name,i", _OPS, ids=[f"{n}-{i}" for n, i in _OPS])
def test_every_op_gives_the_local_result_when_sharded(name, i):
    case, key = CASES[name][i], f"{name}-{i}"
    ref_vals, ref_grads = _program(case, _make_inputs(case, key))
    xs = _make_inputs(case, key)
    first = xs[0]
    if first.ndim == 0 or first.shape[0] < 2:
        pytest.skip("the first input has no dim 0 to shard")
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    world = int(rng.integers(1, min(4, first.shape[0]) + 1))
    cluster = _cluster(world)
    xs[0] = cluster.shard(first, sizes=_sizes(rng, first.shape[0], world))
    try:
        vals, grads = _program(case, xs)
    except REFUSALS:
        return                                   # a clear refusal is allowed; a difference is not
    assert len(vals) == len(ref_vals) and len(grads) == len(ref_grads)
    for a, b in zip(vals, ref_vals):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"{key}: value")
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None), f"{key}: gradient used on one side only"
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"{key}: gradient")


# ---------------------------------------------------------------- random programs

class Square(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return g * 2.0 * x


UNARY = {
    "tanh": lambda x: x.tanh(),
    "sigmoid": lambda x: x.sigmoid(),
    "relu": lambda x: x.relu(),
    "square_fn": lambda x: Square.apply(x),
    "softmax": lambda x: dg.nn.functional.softmax(x, dim=1),
    "center": lambda x: x - x.mean(0),              # a reduction over the sharded dim
    "norm_rows": lambda x: x / (x.norm(dim=1, keepdim=True) + 1.0),
    "scale": lambda x: x * 0.7 + 0.1,
}


def _random_program(X, W, b, ops, hook, final, use_grad):
    h = X @ W + b
    for name in ops:
        h = UNARY[name](h)
    if hook == "scale":
        h.register_hook(lambda g: g * 1.5)
    elif hook == "clip":
        W.register_hook(lambda g: g.clamp(-0.1, 0.1))
    loss = h.mean() if final == "mean" else (h * h).sum() * 0.1
    if use_grad:
        gW, = dg.autograd.grad(loss, [W], create_graph=True)
        loss = loss + (gW * gW).sum()
    return loss


def _run_random(cluster, sizes, data, ops, hook, final, use_grad, inplace):
    X0, W0, b0 = data
    W = Variable(dg.tensor(W0), requires_grad=True)
    b = Variable(dg.tensor(b0), requires_grad=True)
    X = dg.tensor(X0)
    if cluster is not None:
        W, b = cluster.replicate(W), cluster.replicate(b)
        X = cluster.shard(X0, sizes=sizes)
    if inplace:
        W.data.mul_(0.9)                             # recorded in the same program
    loss = _random_program(X, W, b, ops, hook, final, use_grad)
    loss.backward()
    return loss.item(), W.grad.data.numpy().copy(), b.grad.data.numpy().copy()


program_strategy = st.fixed_dictionaries({
    "ops": st.lists(st.sampled_from(sorted(UNARY)), min_size=1, max_size=4),
    "hook": st.sampled_from([None, "scale", "clip"]),
    "final": st.sampled_from(["mean", "sumsq"]),
    "use_grad": st.booleans(),
    "inplace": st.booleans(),
    "world": st.integers(1, 4),
    "seed": st.integers(0, 2 ** 16),
})


def _check_random(p, cluster_for):
    rng = np.random.default_rng(p["seed"])
    n = int(rng.integers(p["world"], 12))
    data = rng.standard_normal((n, 3)), rng.standard_normal((3, 4)), rng.standard_normal(4)
    args = (data, p["ops"], p["hook"], p["final"], p["use_grad"], p["inplace"])
    ref = _run_random(None, None, *args)
    got = _run_random(cluster_for(p["world"]), _sizes(rng, n, p["world"]), *args)
    assert got[0] == pytest.approx(ref[0], rel=1e-9, abs=1e-12), p
    for a, b in zip(got[1:], ref[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11, err_msg=str(p))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(program_strategy)
def test_random_programs_match_single_process(p):
    _check_random(p, _cluster)


@pytest.mark.ray
def test_random_programs_match_single_process_on_ray(ray_session):
    _cluster.close()                        # one cluster per process
    with dg.init(workers=3, timeout_s=60) as cluster:
        @settings(max_examples=8, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(program_strategy.map(lambda p: dict(p, world=3)))
        def run(p):
            _check_random(p, lambda world: cluster)
        run()
