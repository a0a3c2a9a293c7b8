"""The recorder's shortcut for a cached step (issue 13) records what the general path
records: op outputs memoized by interned signatures follow a value's placement when it is
replaced (a resize re-splits a shard). (The optimizers' updates: test_optimizer_foreach.)"""
import numpy as np
import pytest

import distgrad as dg
from distgrad.placement import Shard


@pytest.fixture(scope="module")
def cluster():
    c = dg.init(workers=2, backend="local")
    yield c
    c.shutdown()


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
