"""What a worker keeps to make a step all or nothing, and for how long.

A step that fails on any worker is rolled back on every worker, so until every worker has
finished it each one keeps the old values the step replaced (the parameters and optimizer
moments of an optimizer step, no copy: the arrays themselves). Once the driver has every
worker's reply the step is committed and that undo data goes at once, not at the next
step: between steps a worker holds what a local process holds.
"""
import mmap
import sys

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad import program as prog
from distgrad.autograd import Variable
from distgrad.errors import RemoteError

from training_loop import train_classifier  # noqa: E402  (tests/ is on sys.path under pytest)

X = np.random.default_rng(4).standard_normal((10, 6))
GOOD, BAD = np.arange(10) % 3, np.array([0, 1, 2, 0, 1, 2, 0, 9, 1, 2])   # 9: out of range


def _control(cluster, ranks, msg):
    return cluster.executor.control(ranks, msg)


def replicas(cluster, t):
    """The value of replicated ``t`` as each worker holds it."""
    vid = t._store.vid
    cluster.sync()
    return [_control(cluster, [r], {"control": "export", "vids": [vid]})[0][vid][0]
            for r in range(cluster.world_size)]


def settle(cluster):
    """Wait until every worker has run what the driver posted (a commit): a ping runs
    after it."""
    _control(cluster, list(range(cluster.world_size)), {"control": "ping"})


def train(cluster, batches):
    """Adam on a two-layer MLP; a batch that fails is skipped (the user retries)."""
    dg.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    opt, _ = train_classifier(cluster, model, X, batches,
                              lambda ps: dg.optim.Adam(ps, lr=0.1), sizes=(6, 4))
    return model, opt


def test_a_committed_step_leaves_no_undo_data_on_any_worker():
    with dg.init(workers=2, backend="local", timeout_s=10) as cluster:
        cluster.executor.commit_bytes = 1     # this model's undo data is far below the default
        model, _ = train(cluster, [GOOD, GOOD, GOOD])
        settle(cluster)
        for w in cluster.gang.workers:
            assert w.undo.nbytes == 0, f"worker {w.rank} keeps {w.undo.nbytes} bytes after a committed step"
            assert not w.undo.arrays and not w.undo.values


def commits_posted(cluster, monkeypatch):
    """Record the commit messages the driver posts (and still deliver them)."""
    post, seen = cluster.gang.post, []

    def spy(payloads, ranks):
        if prog.decode(*payloads[0]).get("control") == "commit":
            seen.append(list(ranks))
        return post(payloads, ranks)
    monkeypatch.setattr(cluster.gang, "post", spy)
    return seen


def test_a_large_step_commits_at_once_and_a_small_one_at_the_next_program(monkeypatch):
    rng = np.random.default_rng(5)
    xs, ys = rng.standard_normal((8, 1200)), np.arange(8) % 5
    with dg.init(workers=2, backend="local", timeout_s=20) as cluster:
        seen = commits_posted(cluster, monkeypatch)
        dg.manual_seed(0)
        big = cluster.replicate(nn.Linear(1200, 1200).double())   # 11.5 MB: Adam's undo 35 MB
        opt = dg.optim.Adam(big.parameters(), lr=1e-3)
        for _ in range(2):
            loss = F.cross_entropy(big(cluster.shard(xs)), cluster.shard(ys))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        settle(cluster)
        assert seen == [[0, 1]]             # the second step (the first creates the moments)
        assert all(w.undo.nbytes == 0 for w in cluster.gang.workers)
        seen.clear()
        train(cluster, [GOOD, GOOD, GOOD])   # a small model: no message of its own
        assert seen == []


def test_until_it_commits_a_step_keeps_the_old_parameters_and_moments_and_no_copy(monkeypatch):
    with dg.init(workers=2, backend="local", timeout_s=10) as cluster:
        post = cluster.gang.post

        def no_commit(payloads, ranks):     # the driver's commits never reach the workers
            if prog.decode(*payloads[0]).get("control") != "commit":
                return post(payloads, ranks)
            return []
        monkeypatch.setattr(cluster.gang, "post", no_commit)
        model, _ = train(cluster, [GOOD, GOOD])
        params = list(model.parameters())
        param_bytes = sum(int(np.prod(p.shape)) * 8 for p in params)   # float64 (no fetch: a
        # fetch would be a new program, which commits the step)
        for w in cluster.gang.workers:
            # The second step wrote each parameter and its two moments: their old arrays
            # are kept, taken rather than copied. Its temporaries (the denominator it adds
            # eps to in place) and the gradients it replaced are not kept.
            assert len(w.undo.arrays) == 3 * len(params)
            assert all(entry[3] is None for entry in w.undo.arrays.values()), "an undo copy"
            assert w.undo.nbytes == 3 * param_bytes


def test_a_failure_after_a_committed_step_rolls_back_to_that_step(backend):
    ref, ref_opt = train(None, [GOOD, GOOD, GOOD])
    with dg.init(workers=2, backend=backend, timeout_s=5) as cluster:
        cluster.executor.commit_bytes = 1     # every good step is committed by its message
        model, opt = train(cluster, [GOOD, BAD, GOOD, BAD, GOOD])
        for p, q in zip(model.parameters(), ref.parameters()):
            a, b = replicas(cluster, p)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, q.data.numpy(), rtol=1e-12)
        assert list(opt.state.values())[0]["step"] == 3
        for state, ref_state in zip(opt.state.values(), ref_opt.state.values()):
            np.testing.assert_allclose(state["exp_avg_sq"].numpy(), ref_state["exp_avg_sq"].numpy(),
                                       rtol=1e-12)


def test_a_write_through_a_view_is_rolled_back_in_the_memory_it_shares(backend):
    with dg.init(workers=2, backend=backend, timeout_s=3) as cluster:
        W = cluster.replicate(Variable(dg.tensor(np.zeros((3, 2))), requires_grad=True))

        def step(labels):
            W.data[0].add_(1.0)               # through a view of row 0
            xb = cluster.shard(np.ones((6, 3)), sizes=(3, 3))
            yb = cluster.shard(np.asarray(labels), sizes=(3, 3))
            return F.cross_entropy(xb @ W, yb).item()
        step([0, 1, 0, 1, 0, 1])
        with pytest.raises(RemoteError, match="rolled back on every worker"):
            step([0, 1, 0, 1, 7, 1])
        expected = np.zeros((3, 2))
        expected[0] = 1.0
        for r, a in enumerate(replicas(cluster, W)):
            np.testing.assert_array_equal(a, expected, err_msg=f"worker {r}")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.002, 0.01])
def test_sigkill_among_commit_messages_leaves_bitwise_equal_replicas_and_the_undisturbed_result(
        ray_session, delay_s):
    import os
    import signal
    import threading
    import time
    ref, _ = train(None, [GOOD] * 12)
    with dg.init(workers=2, backend="ray", timeout_s=5) as cluster:
        cluster.executor.commit_bytes = 1     # a commit message after every step
        dg.manual_seed(0)
        model = cluster.replicate(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double())
        opt = dg.optim.Adam(model.parameters(), lr=0.1)
        pid = cluster.gang.pid(1)
        for i in range(12):               # ten steps after the kill: more than its delay
            if i == 2:
                # The kill lands in the step's program, between its replies and its commit
                # message, or in the commit itself, depending on the delay.
                threading.Thread(target=lambda: (time.sleep(delay_s), os.kill(pid, signal.SIGKILL))).start()
            loss = F.cross_entropy(model(cluster.shard(X, sizes=(6, 4))), cluster.shard(GOOD, sizes=(6, 4)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        cluster.sync()
        assert cluster.recoveries, "the kill did not land"
        for p, q in zip(model.parameters(), ref.parameters()):
            a, b = replicas(cluster, p)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, q.data.numpy(), rtol=1e-10)


def rss_shmem_mb(pid="self"):
    """The resident pages of shared memory of process ``pid`` (RssShmem), in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")
def test_released_shared_pages_leave_the_resident_set_and_keep_their_values():
    from distgrad.workers.shared_pages import release_shared_pages
    n = 32 << 20
    mm = mmap.mmap(-1, n, flags=mmap.MAP_SHARED)          # as Ray's object store maps its file
    a = np.frombuffer(mm, np.float32)
    a[:] = np.arange(a.size, dtype=np.float32)
    a.flags.writeable = False                               # as Ray hands an input over
    expected = np.arange(a.size, dtype=np.float32)
    before = rss_shmem_mb()
    assert release_shared_pages([a[1:]]) >= n - 2 * mmap.PAGESIZE   # a view: all its memory
    assert rss_shmem_mb() < before - 28
    np.testing.assert_array_equal(a, expected)             # read back from the shared file
    assert rss_shmem_mb() > before - 4
    del a                                                   # the last array on it goes: once more
    assert rss_shmem_mb() < before - 28
    np.testing.assert_array_equal(np.frombuffer(mm, np.float32), expected)
    private = np.arange(n // 4, dtype=np.float32)           # private memory: never released
    private.flags.writeable = False
    assert release_shared_pages([private]) == 0
    np.testing.assert_array_equal(private, expected)


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_a_ray_worker_keeps_no_object_store_pages_of_the_parameters_it_replaced(ray_session):
    def run(cluster):
        dg.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024)).double()
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((16, 1024)), np.arange(16) % 7
        opt, _ = train_classifier(cluster, model, x, [y, y, y], lambda ps: dg.optim.Adam(ps, lr=1e-3))
        return model
    ref = run(None)
    # The TCP collective: its buffers are private memory, so every shared page of a worker
    # is the object store's.
    with dg.init(workers=2, backend="ray", timeout_s=30, collective="tcp") as cluster:
        model = run(cluster)         # 32 MB of parameters shipped through the object store
        cluster.stats()              # after the last step's commit
        for r in range(2):
            assert rss_shmem_mb(cluster.gang.pid(r)) < 4, f"worker {r} keeps object-store pages"
        for p, q in zip(model.parameters(), ref.parameters()):
            a, b = replicas(cluster, p)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, q.data.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.ray
@pytest.mark.parametrize("driver_socket", [False, True])
def test_a_replicated_value_goes_into_the_object_store_once_for_every_worker(
        ray_session, monkeypatch, driver_socket):
    """By Ray calls, a replicated value is put in the object store once, not once per
    worker; over the driver's socket channel (workers on its node) not at all."""
    from distgrad.scheduler import ray_gang
    puts, put = [], ray_gang.ray.put
    monkeypatch.setattr(ray_gang.ray, "put", lambda a: puts.append(a.nbytes) or put(a))
    w = np.random.default_rng(1).standard_normal((512, 512))      # 2 MB: beside the message
    with dg.init(workers=2, backend="ray", timeout_s=30, driver_socket=driver_socket) as cluster:
        W = cluster.replicate(dg.tensor(w))
        np.testing.assert_array_equal((W * 2).numpy(), w * 2)
        assert puts == ([] if driver_socket else [w.nbytes])
        for a in replicas(cluster, W):
            np.testing.assert_array_equal(a, w)
