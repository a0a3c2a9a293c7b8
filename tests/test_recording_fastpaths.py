"""The recorder's shortcuts for a cached step (issue 13) record what the general path
records: an optimizer's in-place update through ``LazyStorage.record_inplace`` (no tensor
for the intermediate result), and op outputs memoized by interned signatures that follow a
value's placement when it is replaced (a resize re-splits a shard)."""
import numpy as np
import pytest

import distgrad as dg
from distgrad.optim.optimizer import axpby_
from distgrad.placement import Shard


@pytest.fixture(scope="module")
def cluster():
    c = dg.init(workers=2, backend="local")
    yield c
    c.shutdown()


def structure(rec):
    return rec.instrs, rec.nslots, rec.ext, rec.root.scalars


def test_inplace_update_records_what_the_general_path_records(cluster):
    p = cluster.replicate(dg.nn.Linear(3, 4)).weight
    g = cluster.replicate(dg.tensor(np.full((4, 3), 0.5, np.float32)))
    cluster.sync()
    recorded = []
    for update in (lambda: axpby_(p.data, g, 0.9, -0.1), lambda: p.data.axpby_(g, 0.9, -0.1)):
        before = p.detach().numpy()
        with dg.no_grad():
            update()
        recorded.append(repr(structure(cluster.recorder.rec)))
        after = p.detach().numpy()          # a sync: the program runs
        np.testing.assert_allclose(after, before * np.float32(0.9) + np.float32(-0.1 * 0.5),
                                   rtol=1e-6)
    assert recorded[0] == recorded[1]


def test_inplace_update_with_grad_recording_takes_the_general_path(cluster):
    x = cluster.shard(np.ones((4, 3), np.float32))
    y = x * 2.0
    axpby_(y, x, 1.0, 1.0)                   # grad mode on: Tensor.axpby_ itself
    np.testing.assert_array_equal(cluster.gather(y).numpy(), np.full((4, 3), 3.0, np.float32))


def test_memoized_outputs_follow_a_replaced_placement(cluster):
    x = cluster.shard(np.ones((5, 3), np.float32))
    assert (x * 2.0).store.placement.sizes == (3, 2)
    x.store.placement = Shard(0, (1, 4))     # as Recovery does when it re-splits a shard
    try:
        assert (x * 2.0).store.placement.sizes == (1, 4)
        assert x.sum(0).store.shape == (3,)
    finally:
        cluster.recorder.take()              # recorded against a split the workers lack
        x.store.placement = Shard(0, (3, 2))
