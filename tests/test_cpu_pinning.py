"""dg.init(pin_cpus=True): each Ray worker of a host on its own cores, every thread of it
(the communication thread included), and the same gradients as unpinned."""
import os

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad.workers.cpu_pinning import cores_for

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity API")

CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@pytest.mark.parametrize("index,count,per,want", [
    (0, 2, 1, [0]), (1, 2, 1, [1]), (1, 2, 2, [2, 3]), (0, 5, 1, None), (1, 3, 2, None),
    (0, 1, 4, [0, 1, 2, 3])])
def test_cores_for_splits_the_host_or_pins_no_one(index, count, per, want):
    assert cores_for(index, count, per, [3, 2, 1, 0]) == want


def _thread_cores(cluster):
    """Per worker: the union of its threads' affinity masks, and its thread count."""
    def probe(actor):
        tasks = os.listdir("/proc/self/task")
        return sorted({c for t in tasks for c in os.sched_getaffinity(int(t))}), len(tasks)
    import ray
    return ray.get([a.__ray_call__.remote(probe) for a in cluster.gang.actors], timeout=60)


def _grads(cluster):
    dg.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 6)).astype(np.float32), rng.integers(0, 3, 10)
    if cluster is not None:
        model = cluster.replicate(model)
        x, y = cluster.shard(x), cluster.shard(y)
    else:
        x, y = dg.tensor(x), dg.tensor(y)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.numpy() for p in model.parameters()]


@pytest.mark.ray
@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores")
def test_pinned_workers_keep_to_their_own_core(ray_session):
    with dg.init(workers=2, pin_cpus=True, log_to_driver=False) as cluster:
        assert cluster.gang.pinned == [[CORES[0]], [CORES[1]]]
        grads = _grads(cluster)      # starts the communication threads: they inherit the mask
        seen = _thread_cores(cluster)
        assert [cores for cores, _ in seen] == cluster.gang.pinned
        assert all(n > 1 for _, n in seen)        # several threads each, all of them pinned
    for got, want in zip(grads, _grads(None)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.ray
@pytest.mark.skipif(len(CORES) + 1 > 4, reason="the shared Ray instance has 4 CPUs")
def test_more_workers_than_cores_leaves_all_unpinned(ray_session):
    with dg.init(workers=len(CORES) + 1, pin_cpus=True, log_to_driver=False) as cluster:
        assert cluster.gang.pinned == [None] * (len(CORES) + 1)
        assert all(cores == CORES for cores, _ in _thread_cores(cluster))


@pytest.mark.ray
def test_unpinned_by_default(ray_session):
    with dg.init(workers=2, log_to_driver=False) as cluster:
        assert cluster.gang.pinned == [None, None]
        assert all(cores == CORES for cores, _ in _thread_cores(cluster))


@pytest.mark.ray
@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores")
def test_resize_pins_the_new_gang_again(ray_session):
    # resize and recovery re-form the gang: the pins are handed out afresh, so a worker that
    # stays and one that comes never share a core, and a shrunk gang still uses the first
    with dg.init(workers=2, pin_cpus=True, log_to_driver=False) as cluster:
        cluster.resize(1)
        assert cluster.gang.pinned == [[CORES[0]]]
        assert [cores for cores, _ in _thread_cores(cluster)] == [[CORES[0]]]
        cluster.resize(2)
        assert cluster.gang.pinned == [[CORES[0]], [CORES[1]]]
        grads = _grads(cluster)
        assert [cores for cores, _ in _thread_cores(cluster)] == cluster.gang.pinned
    for got, want in zip(grads, _grads(None)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
