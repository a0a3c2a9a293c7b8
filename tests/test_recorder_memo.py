"""The recorder works an op's output (placement, global shape, dtype) out once per
``op_key`` and reuses it (issue 13: a cached step records the same ops every time). The
property: what the memo gives is what the placement rule and shape inference give, for
any chain of ops on any split, and the values stay exact."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import distgrad as dg
from distgrad.placement import PlacementError

# Each: (name, on a distributed tensor, on the numpy array).
OPS = [
    ("exp", lambda x: x.exp(), np.exp),
    ("mul float", lambda x: x * 0.5, lambda a: a * np.float32(0.5)),
    ("add int", lambda x: x + 1, lambda a: a + 1),
    ("relu", lambda x: x.relu(), lambda a: np.maximum(a, 0)),
    ("sum rows", lambda x: x.sum(0, keepdim=True), lambda a: a.sum(0, keepdims=True)),
    ("sum cols", lambda x: x.sum(1, keepdim=True), lambda a: a.sum(1, keepdims=True)),
    ("axpby", lambda x: x.axpby(x, 2.0, -0.25), lambda a: a * np.float32(2.0) + a * np.float32(-0.25)),
]


@pytest.fixture(scope="module")
def cluster():
    c = dg.init(workers=3, backend="local")
    yield c
    c.shutdown()


def described(t):
    s = t.store
    p = s.placement
    return type(p), getattr(p, "dim", None), getattr(p, "sizes", None), s.shape, s.dtype


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 4), min_size=3, max_size=3).filter(lambda s: sum(s) > 0),
       cols=st.integers(1, 4), shard=st.booleans(),
       chain=st.lists(st.sampled_from(range(len(OPS))), min_size=1, max_size=5))
def test_memo_gives_what_inference_gives(cluster, sizes, cols, shard, chain):
    # float64: a sharded sum adds in another order than numpy's, and exp of a float32 sum
    # (CI drew sum rows then exp) turns that rounding into 1e-6 relative.
    a = np.arange(sum(sizes) * cols, dtype=np.float64).reshape(sum(sizes), cols) / 7
    x0 = cluster.shard(a, sizes=sizes) if shard else cluster.replicate(dg.tensor(a))

    def run():
        x, out = x0, []
        for i in chain:
            x = OPS[i][1](x)
            out.append(described(x))
        return x, out

    _, first = run()
    hit, second = run()                       # every op of the chain is a memo hit now
    cluster.recorder._out_cache.clear()
    _, fresh = run()                          # worked out again by the rule and inference
    assert first == second == fresh
    want = a
    for i in chain:
        want = OPS[i][2](want)
    np.testing.assert_allclose(cluster.gather(hit).numpy(), want, rtol=1e-6, atol=1e-6)


def test_float_attrs_are_this_calls(cluster):
    """A memo hit keys float attrs by kind only; the recorded values are each call's own."""
    a = np.ones((6, 2), np.float32)
    x = cluster.shard(a)
    for k in range(4):
        y = x.axpby(x, float(k), 0.5)
        np.testing.assert_array_equal(cluster.gather(y).numpy(), a * k + a * 0.5)


def test_a_failing_op_fails_every_time(cluster):
    """Nothing is memoized for an op its rule rejects: the error comes again."""
    x = cluster.shard(np.ones((6, 2), np.float32))
    for _ in range(2):
        with pytest.raises(PlacementError):
            x.max(0)


def test_live_table_forgets_dropped_values(cluster):
    x = cluster.shard(np.ones((6, 2), np.float32))
    y = x * 2.0
    vid = y.store.vid
    live = cluster.recorder.live
    assert live.get(vid) is y.store and vid in live
    assert any(s is y.store for s in live.values())
    del y
    assert live.get(vid) is None and vid not in live
    assert all(v != vid for v, _ in live.items())


def test_live_table_reads_survive_a_collection_that_frees_storages(cluster):
    """A collection that runs while the table is read (any allocation may start one) frees
    storages held only by reference cycles; their __del__ takes them out of the table, and
    the read must not fail with "dictionary changed size during iteration"."""
    import gc
    x = cluster.shard(np.ones((6, 2), np.float32))

    class Cycle:
        pass
    for t in [x * 3.0 for _ in range(200)]:
        o = Cycle()
        o.me, o.t = o, t                 # each storage reachable only through a cycle
    del t, o
    threshold = gc.get_threshold()
    gc.set_threshold(1)                  # a collection at nearly every allocation
    try:
        for _ in range(20):
            cluster.recorder.live.items()
    finally:
        gc.set_threshold(*threshold)
    assert x.store.vid in cluster.recorder.live
