"""An optimizer step on a cluster's replicated parameters is the single-process step, bit
for bit, now that SGD and Adam record each op for all parameters as one ``foreach``
instruction (issue 13); where a call does not fit one instruction the recorder says so
and records nothing, and the calls go one by one."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import distgrad as dg
from distgrad.ops import get_op
from distgrad.optim.foreach import foreach, foreach_

CONFIGS = [dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9, dampening=0.3),
           dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
           dict(lr=0.1, momentum=0.5, maximize=True, weight_decay=0.1)]


def _model():
    dg.manual_seed(0)
    return dg.nn.Sequential(dg.nn.Linear(5, 4), dg.nn.ReLU(), dg.nn.Linear(4, 3))


def _steps(cluster, config, make_opt, steps=3):
    """The same gradients fed to a local and a replicated model's optimizer for ``steps``
    steps (at step 1 the first parameter has none: its momentum buffer starts later);
    yields after each step the recorded instruction kinds, the local and the cluster's
    parameters."""
    local, remote = _model(), cluster.replicate(_model())
    opt_local, opt_remote = make_opt(local.parameters(), config), make_opt(remote.parameters(), config)
    for step in range(steps):
        rng = np.random.default_rng(step)
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in local.parameters()]
        if step == 1:
            grads[0] = None
        for p, q, g in zip(local.parameters(), remote.parameters(), grads):
            p.grad = None if g is None else dg.tensor(g)
            q.grad = None if g is None else cluster.replicate(dg.tensor(g))
        cluster.sync()
        opt_local.step()
        opt_remote.step()
        kinds = [ins[0] for ins in cluster.recorder.rec.instrs]
        yield kinds, [p.detach().numpy() for p in local.parameters()], \
            [cluster.gather(p).numpy() for p in remote.parameters()]


def _sgd(params, config):
    return dg.optim.SGD(params, **config)


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def cluster(request):
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    c = dg.init(workers=2, backend=request.param, timeout_s=60)
    yield c
    c.shutdown()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_sgd_step_on_a_cluster_is_the_local_step_bit_for_bit(cluster, config):
    for step, (kinds, mine, theirs) in enumerate(_steps(cluster, config, _sgd)):
        # Each op of the update is one instruction for all parameters: the buffers' update
        # (or, at the first step, their clone), decay, maximize, Nesterov, the parameters'.
        ops = 1 + bool(config.get("momentum")) + sum(bool(config.get(k)) for k in
                                                    ("weight_decay", "maximize", "nesterov"))
        assert kinds == ["foreach"] * ops, kinds
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)


def test_updates_go_in_chunks_of_parameters(cluster, monkeypatch):
    """A foreach op's temporaries exist for all its parameters at once: a step updates
    FOREACH_CHUNK_BYTES of parameters per call (here one parameter each), exactly."""
    from distgrad.optim import optimizer
    monkeypatch.setattr(optimizer, "FOREACH_CHUNK_BYTES", 1)
    for step, (kinds, mine, theirs) in enumerate(_steps(cluster, CONFIGS[1], _sgd)):
        with_grad = 4 - (step == 1)
        assert kinds == ["foreach"] * (with_grad * 2), kinds     # buffers (or clones), params
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, maximize=True),
                                    dict(lr=0.02, amsgrad=True)], ids=str)
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_adam_step_on_a_cluster_is_the_local_step_bit_for_bit(cluster, config, kind):
    make = lambda params, config: getattr(dg.optim, kind)(params, **config)
    for kinds, mine, theirs in _steps(cluster, config, make, steps=4):
        # Ops for all parameters at once: a handful of instructions, not a few per parameter.
        assert kinds.count("op") <= (8 if config.get("amsgrad") else 0) and "detach" not in kinds, kinds
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", [dict(), dict(lr=0.5, rho=0.8, weight_decay=0.1, maximize=True)],
                         ids=str)
def test_adadelta_step_on_a_cluster_is_the_local_step_bit_for_bit(cluster, config):
    make = lambda params, config: dg.optim.Adadelta(params, **config)
    for kinds, mine, theirs in _steps(cluster, config, make, steps=4):
        assert "op" not in kinds and "detach" not in kinds, kinds
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)


def test_calls_that_need_more_than_one_instruction_are_recorded_one_by_one(cluster):
    x = cluster.shard(np.ones((4, 3), np.float32))
    t = x * 1.0
    partial = x.sum(0)                       # Partial: needs an all-reduce before the write
    replicated = cluster.replicate(dg.ones(3))
    axpby = get_op("axpby")
    cluster.sync()
    rec = cluster.recorder
    with dg.no_grad():
        assert rec.record_foreach(axpby, [(replicated, partial)], {"a": 1.0, "b": 1.0}, True) is None
        assert rec.record_foreach(axpby, [(t, dg.ones(4, 3))], {"a": 1.0, "b": 1.0}, True) is None
        assert rec.record_foreach(get_op("reshape"), [(t,)], {"shape": (2, 6)}) is None
        assert rec.rec.instrs == [] and rec.rec.ext == [] and rec.rec.root.scalars == []
        foreach_("axpby", [replicated, t], [(partial,), (x,)], a=2.0, b=1.0)   # one by one
        doubled, flat = foreach("mul", [(partial, 2.0), (t, 1.0)])
    assert rec.record_foreach(axpby, [(t, x)], {"a": 1.0, "b": 1.0}, True) is None   # grad on
    np.testing.assert_array_equal(cluster.gather(replicated).numpy(), np.full(3, 6.0, np.float32))
    np.testing.assert_array_equal(cluster.gather(t).numpy(), np.full((4, 3), 3.0, np.float32))
    np.testing.assert_array_equal(cluster.gather(doubled).numpy(), np.full(3, 8.0, np.float32))
    np.testing.assert_array_equal(cluster.gather(flat).numpy(), np.full((4, 3), 3.0, np.float32))


# name, number of tensor operands, attrs
_ELEMENTWISE = [("mul", 2, {}), ("add", 2, {}), ("div", 2, {}), ("sqrt", 1, {}), ("neg", 1, {}),
                ("axpby", 2, {"a": 0.5, "b": -2.0}), ("axpby", 2, {"a": 1.0, "b": 1})]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), spec=st.sampled_from(_ELEMENTWISE), inplace=st.booleans(),
       ncalls=st.integers(1, 4))
def test_foreach_gives_what_each_op_gives(cluster, data, spec, inplace, ncalls):
    """Random elementwise foreach calls on sharded, replicated and Partial values, with
    float or tensor operands (one instruction where they fit, one by one where not):
    the values a single process computes, bit for bit."""
    name, arity, attrs = spec
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    calls, local_calls = [], []
    for _ in range(ncalls):
        rows, cols = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
        # (an in-place write into a Partial value is refused, by foreach_ as by the op)
        kind = data.draw(st.sampled_from(["shard", "replicate"] + ([] if inplace else ["partial"])))
        a = np.abs(rng.standard_normal((rows, cols))).astype(np.float32) + 0.5
        if kind == "shard":
            x = cluster.shard(a)
        elif kind == "partial":      # a Partial value (a sum over the batch), then its rows
            x = cluster.shard(a[None].repeat(2, 0) / 2).sum(0)
            a = (a[None].repeat(2, 0) / 2).sum(0)
        else:
            x = cluster.replicate(dg.tensor(a))
        call, local = [x], [dg.tensor(a)]
        if arity == 2:
            if data.draw(st.booleans()) and name != "axpby":
                f = float(data.draw(st.sampled_from([0.25, 2.0, -3.0])))
                call.append(f)
                local.append(f)
            else:
                b = np.abs(rng.standard_normal((rows, cols))).astype(np.float32) + 0.5
                call.append(cluster.shard(b) if kind == "shard" else cluster.replicate(dg.tensor(b)))
                local.append(dg.tensor(b))
        calls.append(tuple(call))
        local_calls.append(tuple(local))
    with dg.no_grad():
        if inplace:
            foreach_(name, [c[0] for c in calls], [c[1:] for c in calls], **attrs)
            foreach_(name, [c[0] for c in local_calls], [c[1:] for c in local_calls], **attrs)
            got, want = [c[0] for c in calls], [c[0] for c in local_calls]
        else:
            got, want = foreach(name, calls, **attrs), foreach(name, local_calls, **attrs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(cluster.gather(g).numpy(), w.numpy())
