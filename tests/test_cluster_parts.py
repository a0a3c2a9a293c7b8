"""The parts ``Cluster`` delegates to, each tested alone where it can be: shard sizing,
the Chrome trace writer, and the one-active-cluster accessor ``current_cluster``."""
import json
import types

import numpy as np
import pytest

import distgrad as dg
from distgrad import distributed
from distgrad.scheduler.sizing import Sizing, resplit
from distgrad.scheduler.timeline import write_trace


def _sizing(world):
    return Sizing(types.SimpleNamespace(world_size=world))


def test_sizing_splits_evenly_by_default_and_keeps_every_row_in_order():
    a = np.arange(22).reshape(11, 2)
    sizes, pieces = _sizing(3).split(a, 0, None)
    assert sizes == (4, 4, 3)
    np.testing.assert_array_equal(np.concatenate(pieces), a)
    assert all(p.flags.c_contiguous for p in pieces)


def test_auto_sizes_are_even_until_every_worker_is_measured_then_follow_speed():
    sizing = _sizing(2)
    assert sizing.split(np.zeros((10, 1)), 0, "auto")[0] == (5, 5)
    # Worker 1 is three times as fast: rows split 1:3, the remainder to the largest fraction.
    sizing.speed = {0: 1.0, 1: 3.0}
    assert sizing.auto_sizes(10) == (3, 7)
    assert sum(sizing.auto_sizes(101)) == 101
    sizing.reset()
    assert sizing.auto_sizes(10) is None
    with pytest.raises(ValueError, match="sizes must be a list of 2 numbers or 'auto'"):
        sizing.split(np.zeros((4, 1)), 0, "fast")


def test_resplit_gives_the_same_rows_to_a_new_number_of_workers():
    a = np.arange(30).reshape(3, 10)
    pieces = resplit([a[:, :7], a[:, 7:]], 1, 3)
    assert [p.shape[1] for p in pieces] == [4, 3, 3]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), a)


def test_write_trace_has_a_track_per_worker_and_the_driver_waits(tmp_path):
    path = str(tmp_path / "trace.json")
    spans = [[("forward", 1.0, 1.5, "main")], [("allreduce", 1.2, 1.3, "comm")]]
    assert write_trace(path, [(0.9, 1.6)], spans, 2) == path
    events = json.load(open(path))["traceEvents"]
    names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {"driver", "worker 0", "worker 1"}
    work = sorted((e["pid"], e["name"], e["dur"]) for e in events if e["ph"] == "X")
    assert work == [(0, "driver wait", pytest.approx(7e5)), (1, "forward", pytest.approx(5e5)),
                    (2, "allreduce", pytest.approx(1e5))]
    assert not (tmp_path / "trace.json.tmp").exists()


def test_current_cluster_is_the_active_one_and_none_after_shutdown():
    leaked = distributed.current_cluster()
    if leaked is not None:
        # An earlier test's cluster is still open (active_cluster's lives until exit):
        # it is the current one, and init may not make a second.
        assert dg.nn.parallel.active_cluster() is leaked and not leaked.closed
        return
    with dg.init(workers=2, backend="local") as cluster:
        assert distributed.current_cluster() is cluster
        assert dg.nn.parallel.active_cluster() is cluster
    assert distributed.current_cluster() is None
