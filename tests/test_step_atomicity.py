"""Every step is all or nothing, on both backends: an error, a timeout or a cache miss on
ONE worker leaves every worker's replicas bitwise equal and equal to an undisturbed run,
and a retried step is applied exactly once. Hyperparameters are program inputs (a
scheduler keeps the program cached), and a model outlives its cluster.
"""
import os

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad.autograd import Variable
from distgrad.errors import RemoteError, WorkerError

from training_loop import train_classifier  # noqa: E402  (tests/ is on sys.path under pytest)


def replicas(cluster, t):
    """The value of replicated ``t`` as each worker holds it."""
    vid = t._store.vid
    cluster.sync()
    return [cluster.executor.control([r], {"control": "export", "vids": [vid]})[0][vid][0]
            for r in range(cluster.world_size)]


def assert_replicas(cluster, t, expected):
    for r, a in enumerate(replicas(cluster, t)):
        np.testing.assert_array_equal(a, expected, err_msg=f"worker {r}")


def _step(cluster, W, labels):
    """An in-place update of W, then a loss whose class indices sit in the shards."""
    W.data.add_(1.0)
    X = cluster.shard(np.ones((6, 3)), sizes=(3, 3))
    Y = cluster.shard(np.asarray(labels), sizes=(3, 3))
    return F.cross_entropy(X @ W, Y).item()


def test_an_error_on_one_worker_rolls_back_every_worker(backend):
    # Worker 0 waits for worker 1 in the loss's all-reduce until its collective timeout.
    with dg.init(workers=2, backend=backend, timeout_s=3) as cluster:
        W = cluster.replicate(Variable(dg.tensor(np.zeros((3, 2))), requires_grad=True))
        _step(cluster, W, [0, 1, 0, 1, 0, 1])
        assert_replicas(cluster, W, np.ones((3, 2)))
        # Class 7 is out of range and sits in worker 1's shard only.
        with pytest.raises(RemoteError, match=r"worker 1: .*cross_entropy.*rolled back on every worker"):
            _step(cluster, W, [0, 1, 0, 1, 7, 1])
        assert_replicas(cluster, W, np.ones((3, 2)))            # nothing half-applied
        _step(cluster, W, [0, 1, 0, 1, 0, 1])                  # the retry: applied once
        assert_replicas(cluster, W, np.full((3, 2), 2.0))
        np.testing.assert_array_equal(W.data.numpy(), np.full((3, 2), 2.0))
        assert _step(cluster, W, [0, 1, 0, 1, 0, 1]) > 0    # the collectives still agree


def test_a_failed_training_step_changes_no_parameter_and_no_optimizer_state(backend):
    X = np.random.default_rng(0).standard_normal((8, 4))
    good, bad = np.array([0, 1, 2, 0, 1, 2, 0, 1]), np.array([0, 1, 2, 0, 1, 2, 9, 1])

    def train(cluster, batches):
        dg.manual_seed(0)
        model = nn.Linear(4, 3).double()
        opt, _ = train_classifier(cluster, model, X, batches,        # a failed batch is skipped
                                  lambda ps: dg.optim.Adam(ps, lr=0.1), sizes=(5, 3))
        return model, opt
    ref, _ = train(None, [good, good, good])
    with dg.init(workers=2, backend=backend, timeout_s=3) as cluster:
        model, opt = train(cluster, [good, bad, good, good])
        for p in model.parameters():
            reps = replicas(cluster, p)
            np.testing.assert_array_equal(reps[0], reps[1])
        assert list(opt.state.values())[0]["step"] == 3       # the failed step was not counted
        for p, q in zip(model.parameters(), ref.parameters()):
            np.testing.assert_allclose(p.data.numpy(), q.data.numpy(), rtol=1e-12)


def test_a_cache_miss_on_one_worker_runs_the_step_once_everywhere(backend):
    # Worker 0 runs the step and waits for worker 1 in its all-reduce until it times out.
    with dg.init(workers=2, backend=backend, timeout_s=3) as cluster:
        W = cluster.replicate(Variable(dg.tensor(np.zeros((3, 2))), requires_grad=True))
        for _ in range(2):
            _step(cluster, W, [0, 1, 0, 1, 0, 1])
        # Worker 1 forgets its programs while the driver believes it still has them (as
        # after a restart the driver did not see): it answers "not cached".
        cluster.executor.reset_cache.add(1)
        _step(cluster, W, [0, 1, 0, 1, 0, 1])
        assert_replicas(cluster, W, np.full((3, 2), 3.0))
        for _ in range(2):
            _step(cluster, W, [0, 1, 0, 1, 0, 1])
        assert_replicas(cluster, W, np.full((3, 2), 5.0))
        assert cluster.stats()[1]["cache_hits"] >= 2


def test_a_local_step_that_times_out_is_rolled_back_and_a_retry_applies_once():
    with dg.init(workers=2, backend="local", timeout_s=1) as cluster:
        W = cluster.replicate(Variable(dg.tensor(np.zeros((3, 2))), requires_grad=True))
        _step(cluster, W, [0, 1, 0, 1, 0, 1])
        cluster.gang.workers[1].slowdown_s = 3.0     # the next program overruns the wait
        with pytest.raises(WorkerError, match="worker 1"):
            _step(cluster, W, [0, 1, 0, 1, 0, 1])
        cluster.gang.workers[1].slowdown_s = 0.0
        _step(cluster, W, [0, 1, 0, 1, 0, 1])          # waits behind the late program's undo
        assert_replicas(cluster, W, np.full((3, 2), 2.0))


def test_a_scheduler_and_adam_hit_the_program_cache_every_step(backend):
    X = np.random.default_rng(1).standard_normal((12, 4))
    Y = np.arange(12) % 3

    def train(cluster, steps=6):
        dg.manual_seed(0)
        model = nn.Linear(4, 3).double()
        if cluster is not None:
            cluster.replicate(model)
        opt = dg.optim.Adam(model.parameters(), lr=0.1)
        sched = dg.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(steps):
            xb = cluster.shard(X, sizes=(7, 5)) if cluster else dg.tensor(X)
            yb = cluster.shard(Y, sizes=(7, 5)) if cluster else dg.tensor(Y)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss.item()
        return [p.data.numpy().copy() for p in model.parameters()]
    ref = train(None)
    with dg.init(workers=2, backend=backend, timeout_s=20) as cluster:
        got = train(cluster)
        stats = cluster.stats()
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # Step 1 and step 2 differ in structure (Adam creates its moments on step 1); every
    # later step, with a new learning rate and new bias corrections, is a cache hit.
    assert all(s["cache_hits"] >= 4 for s in stats), [s["cache_hits"] for s in stats]


def test_a_model_outlives_its_cluster(backend, tmp_path):
    X = np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32)
    Y = np.arange(10) % 2
    dg.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = dg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with dg.init(workers=2, backend=backend, timeout_s=20) as cluster:
        cluster.replicate(model)
        for _ in range(3):
            loss = F.cross_entropy(model(cluster.shard(X)), cluster.shard(Y))
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = model.state_dict()
        sharded = cluster.shard(X)
        trained = [p.data.numpy().copy() for p in model.parameters()]
    assert all(p.placement is None for p in model.parameters())
    np.testing.assert_array_equal(model[0].weight.data.numpy(), trained[0])
    dg.save(state, os.fspath(tmp_path / "model.dg"))           # taken inside the block
    assert set(dg.load(os.fspath(tmp_path / "model.dg"))) == set(state)
    loss = F.cross_entropy(model(dg.tensor(X)), dg.tensor(Y))   # trains on, locally
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not np.array_equal(model[0].weight.data.numpy(), trained[0])
    with pytest.raises(RuntimeError, match=r"cluster.gather"):
        sharded.sum().item()


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_during_steps_leaves_bitwise_equal_replicas_and_the_undisturbed_result(ray_session):
    import signal
    import threading
    import time
    X = np.random.default_rng(3).standard_normal((16, 4))
    Y = np.arange(16) % 3

    def train(cluster, steps=6, kill_at=None):
        dg.manual_seed(0)
        model = nn.Linear(4, 3).double()
        if cluster is not None:
            cluster.replicate(model)
        opt = dg.optim.Adam(model.parameters(), lr=0.05)
        for i in range(steps):
            if i == kill_at:
                pid = cluster.gang.pid(1)
                threading.Thread(target=lambda: (time.sleep(0.002), os.kill(pid, signal.SIGKILL))).start()
            xb = cluster.shard(X, sizes=(9, 7)) if cluster else dg.tensor(X)
            yb = cluster.shard(Y, sizes=(9, 7)) if cluster else dg.tensor(Y)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        return model
    ref = train(None)
    with dg.init(workers=2, backend="ray", timeout_s=5) as cluster:
        model = train(cluster, kill_at=3)
        assert cluster.recoveries, "the kill did not land"
        for p, q in zip(model.parameters(), ref.parameters()):
            reps = replicas(cluster, p)
            np.testing.assert_array_equal(reps[0], reps[1])
            np.testing.assert_allclose(reps[0], q.data.numpy(), rtol=1e-10)
