"""Worker-side data (issue 18): datasets the workers read themselves, in global batches.

Every source (arrays sent once, .npy files, a generator, a Ray Data stream) goes through
one ``source`` instruction; these tests check the promises: the rows never pass through
the driver, every row is read once per epoch, training equals single-process training on
the same rows, and (but for Ray Data) the batches do not depend on the worker count, even
across a resize or a killed worker.
"""
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import distgrad as dg
from distgrad import program as prog
from distgrad.errors import RecoveryError, ResizeError
from distgrad.utils.data.sources import DataError, Shuffle, _fill

from data_training import epochs_of, fit, local_batches, rows_dataset, write_npy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_gen():
    # Nested, so Ray sends it by value: workers cannot import this test module.
    def gen(i, rng):
        """A generated row: features from the row's own generator, label from its number."""
        x = rng.standard_normal(5)
        x[0] = i
        return x, np.int64(i % 3)
    return gen


_gen = _make_gen()


@pytest.fixture
def files(tmp_path):
    X, y = rows_dataset(203)
    return write_npy(str(tmp_path), X, y), X, y


# ---------------------------------------------------------------- the plan (driver only)

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2 ** 40), epoch=st.integers(0, 50))
def test_shuffle_is_a_permutation_computed_position_by_position(n, seed, epoch):
    perm = Shuffle(n, seed, epoch)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    half = n // 2                      # any slice of positions gives the same rows
    np.testing.assert_array_equal(Shuffle(n, seed, epoch)(np.arange(half, n)), perm[half:])


def test_shuffle_changes_with_the_epoch_and_the_seed():
    a, b, c = (Shuffle(1000, s, e)(np.arange(1000)) for s, e in [(0, 0), (0, 1), (1, 0)])
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9


@settings(max_examples=200, deadline=None)
@given(want=st.integers(1, 300), caps=st.lists(st.one_of(st.none(), st.integers(0, 100)),
                                               min_size=1, max_size=5))
def test_a_stream_batch_takes_what_each_worker_has_evenly(want, caps):
    give = _fill(want, caps)
    if all(c == 0 for c in caps):
        assert give is None
        return
    assert all(g >= 0 and (c is None or g <= c) for g, c in zip(give, caps))
    room = None if any(c is None for c in caps) else sum(caps)
    assert sum(give) == (want if room is None else min(want, room))


def test_the_source_instruction_is_validated():
    good = {"instrs": [["source", [0, 1], 7, 0, -1], ["source", [2], 7, 1, 2], ["fetch", 1]],
            "nslots": 3, "ext": [], "keep": []}
    assert prog.validate(good) is good
    for instrs, match in [([["source", [], 7, 0, -1]], "at least one column"),
                          ([["source", 0, 7, 0, -1]], "column slots must be a list"),
                          ([["source", [5], 7, 0, -1]], "out of range"),
                          ([["source", [0], -1, 0, -1]], "bad data source id"),
                          ([["source", [0], 7, "x", -1]], "bad input index"),
                          ([["source", [0], 7, 0, -2]], "bad input index"),
                          ([["source", [0], 7, 0]], "expected 5 fields")]:
        with pytest.raises(prog.ProgramError, match=match):
            prog.validate({"instrs": instrs, "nslots": 1, "ext": [], "keep": []})


# ---------------------------------------------------------------- every row once, any worker count

@pytest.mark.parametrize("kind", ["npy", "generator", "arrays"])
def test_every_row_once_per_epoch_and_the_same_batches_for_any_worker_count(files, kind):
    paths, X, y = files
    got = {}
    for workers in (1, 2, 3, 4):
        with dg.init(workers=workers, backend="local") as cluster:
            if kind == "npy":
                ds = cluster.shard_dataset(paths, batch_size=32, shuffle=True, seed=5)
            elif kind == "generator":
                ds = cluster.shard_from(_gen, rows=203, batch_size=32, shuffle=True, seed=5)
            else:
                ds = cluster.shard_dataset((X, y), batch_size=32, shuffle=True, seed=5)
            assert len(ds) == 7
            epochs = []
            for _ in range(2):
                batches = [(xb.numpy(), yb.numpy(), xb.placement.sizes) for xb, yb in ds]
                ids = np.concatenate([b[0][:, 0] for b in batches]).astype(int)
                assert sorted(ids) == list(range(203))
                for xb, yb, sizes in batches:
                    np.testing.assert_array_equal(yb, xb[:, 0].astype(int) % 3)
                    assert len(sizes) == workers and sum(sizes) == len(xb)
                epochs.append([sorted(b[0][:, 0].astype(int)) for b in batches])
            assert epochs[0] != epochs[1]                      # a new order every epoch
            got[workers] = epochs
            if kind != "generator":
                for xb, _, _ in batches:       # the rows themselves, as stored
                    np.testing.assert_array_equal(xb, X[xb[:, 0].astype(int)])
    assert got[1] == got[2] == got[3] == got[4]


def test_generated_rows_do_not_depend_on_the_worker_that_computes_them():
    rows = {}
    for workers in (1, 3):
        with dg.init(workers=workers, backend="local") as cluster:
            ds = cluster.shard_from(_gen, rows=50, batch_size=50)
            xb, _ = next(iter(ds))
            rows[workers] = xb.numpy()
    np.testing.assert_array_equal(rows[1], rows[3])
    np.testing.assert_array_equal(rows[1][7], _gen(7, np.random.default_rng([0, 7]))[0])


def test_the_last_batch_keeps_the_remainder_or_is_dropped():
    with dg.init(workers=3, backend="local") as cluster:
        ds = cluster.shard_from(_gen, rows=10, batch_size=4)
        assert [xb.shape[0] for xb, _ in ds] == [4, 4, 2] and len(ds) == 3
        ds = cluster.shard_from(_gen, rows=10, batch_size=4, drop_last=True)
        assert [xb.shape[0] for xb, _ in ds] == [4, 4] and len(ds) == 2
        tiny = cluster.shard_from(_gen, rows=2, batch_size=4)     # fewer rows than workers
        (xb, _), = list(tiny)
        assert xb.placement.sizes == (1, 1, 0) and xb.numpy()[:, 0].tolist() == [0, 1]


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("kind", ["npy", "generator"])
def test_training_equals_one_process_on_the_same_rows_for_2_and_3_workers(files, kind):
    paths, X, y = files
    if kind == "generator":
        rows = [_gen(i, np.random.default_rng([3, i])) for i in range(203)]
        X, y = np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])
    params = {}
    for workers in (2, 3):
        with dg.init(workers=workers, backend="local") as cluster:
            ds = (cluster.shard_dataset(paths, batch_size=40, shuffle=True, seed=3) if kind == "npy"
                  else cluster.shard_from(_gen, rows=203, batch_size=40, shuffle=True, seed=3))
            params[workers] = fit(epochs_of(ds, 2), cluster)
    ref = fit(local_batches(ds, X, y, 2))
    for got in params.values():
        for p, q in zip(got, ref):
            np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)


def test_evaluate_returns_only_the_metric_over_every_row(files):
    paths, X, y = files
    W = np.random.default_rng(2).standard_normal((5, 3))
    expected = np.mean((X @ W).argmax(axis=1) == y)
    with dg.init(workers=3, backend="local") as cluster:
        val = cluster.shard_dataset(paths, batch_size=64, shuffle=True)
        Wd = cluster.replicate(dg.tensor(W))
        before = val.state_dict()
        acc = val.evaluate(lambda x, t: (x @ Wd).argmax(dim=1) == t)
        assert val.state_dict() == before                  # the training position did not move
        sent = sum(s["bytes_in"] for s in cluster.stats())
        assert abs(acc - expected) < 1e-12
        assert sent < 30_000                              # row numbers went out, no rows
        with pytest.raises(ValueError, match="one value per row"):
            val.evaluate(lambda x, t: (x @ Wd).sum())


def test_a_rolled_back_step_reads_its_batch_again():
    """A step that fails on a worker is rolled back everywhere; the next batch the loop
    gets is that same batch again, so no row is skipped."""
    with dg.init(workers=2, backend="local") as cluster:
        ds = cluster.shard_from(_gen, rows=20, batch_size=8)
        it = iter(ds)
        xb, yb = next(it)
        first = xb.numpy()[:, 0].tolist()
        xb2, yb2 = next(it)
        bad = (xb2[:, 0] * 0 + 7).long()                    # class 7 of 3: fails on the workers
        with pytest.raises(dg.distributed.RemoteError):
            dg.nn.functional.cross_entropy(xb2[:, :3], bad).item()
        xb3, _ = next(it)
        assert xb3.numpy()[:, 0].tolist() == list(range(8, 16)) and first == list(range(8))


def test_the_position_is_saved_and_resumed(files):
    paths, X, y = files
    with dg.init(workers=2, backend="local") as cluster:
        ds = cluster.shard_dataset(paths, batch_size=32, shuffle=True, seed=9)
        full = [xb.numpy()[:, 0].tolist() for _ in range(2) for xb, _ in ds]
        ds2 = cluster.shard_dataset(paths, batch_size=32, shuffle=True, seed=9)
        it = iter(ds2)
        head = [next(it)[0].numpy()[:, 0].tolist() for _ in range(3)]
        state = ds2.state_dict()
        assert state["epoch"] == 0 and state["step"] == 3
        ds3 = cluster.shard_dataset(paths, batch_size=32, shuffle=True, seed=9)
        ds3.load_state_dict(state)
        rest = [xb.numpy()[:, 0].tolist() for xb, _ in ds3] + [xb.numpy()[:, 0].tolist() for xb, _ in ds3]
    assert head + rest == full


def test_timeline_shows_a_data_span_per_worker(tmp_path):
    import json
    with dg.init(workers=2, backend="local") as cluster:
        for xb, _ in cluster.shard_from(_gen, rows=40, batch_size=20):
            xb.sum().item()
        cluster.timeline(str(tmp_path / "t.json"))
    events = json.load(open(tmp_path / "t.json"))["traceEvents"]
    assert {e["pid"] for e in events if e.get("name") == "data"} == {1, 2}


def test_workers_drop_a_source_the_driver_no_longer_uses():
    with dg.init(workers=2, backend="local") as cluster:
        ds = cluster.shard_from(_gen, rows=10, batch_size=5)
        next(iter(ds))[0].sum().item()
        assert all(len(w.sources) == 1 for w in cluster.gang.workers)
        del ds
        gc.collect()
        cluster.replicate(dg.ones(1)).sum().item()          # the next program carries the drop
        assert all(len(w.sources) == 0 for w in cluster.gang.workers)


# ---------------------------------------------------------------- bad input: one clear error, early

def test_bad_files_fail_before_training_naming_the_file_and_the_worker(tmp_path, files):
    paths, X, y = files
    with dg.init(workers=2, backend="local") as cluster:
        with pytest.raises(DataError, match=r"worker 0: column 'x': no such file or directory: .*nope"):
            cluster.shard_dataset({"x": str(tmp_path / "nope"), "y": paths["y"]}, batch_size=8)
        odd = tmp_path / "odd"
        odd.mkdir()
        np.save(odd / "a.npy", X[:10])
        np.save(odd / "b.npy", X[10:20, :4])
        with pytest.raises(DataError, match=r"worker 0: column 'x': shard .*b\.npy has rows of shape \(4,\)"):
            cluster.shard_dataset({"x": str(odd), "y": paths["y"]}, batch_size=8)
        np.save(odd / "b.npy", X[10:20].astype(np.float32))
        with pytest.raises(DataError, match=r"b\.npy has rows of shape \(5,\) and dtype float32"):
            cluster.shard_dataset({"x": str(odd)}, batch_size=8)
        np.save(tmp_path / "short.npy", y[:50])
        with pytest.raises(DataError, match="different numbers of rows"):
            cluster.shard_dataset({"x": paths["x"], "y": str(tmp_path / "short.npy")}, batch_size=8)
        with pytest.raises(DataError, match=r"column 'y' holds int64, but float32 is expected"):
            cluster.shard_dataset(paths, batch_size=8, dtypes={"y": "float32"})
        with pytest.raises(DataError, match=r"columns \['label'\] are not in the dataset"):
            cluster.shard_dataset(paths, batch_size=8, columns=["x", "label"])
        (tmp_path / "notes.txt").write_text("hello")
        with pytest.raises(DataError, match="is not a .npy file"):
            cluster.shard_dataset(str(tmp_path / "notes.txt"), batch_size=8)
        # The cluster is unharmed: a good dataset trains.
        ds = cluster.shard_dataset(paths, batch_size=64)
        assert sum(xb.shape[0] for xb, _ in ds) == 203


def test_a_file_another_worker_cannot_read_is_named_with_its_rank(files, monkeypatch, tmp_path):
    """Worker 1 stands for a node whose copy of the files is missing, then different."""
    paths, X, y = files
    from distgrad.workers import sources as wsources
    real = wsources.NpyTable.__init__
    np.save(tmp_path / "other.npy", X[:, :4])
    node_1 = {"x": paths["x"] + ".gone"}

    def on_node_1(self, spec, rank):
        if rank == 1:
            spec = {"columns": [[n, [node_1.get(n, p) for p in ps]] for n, ps in spec["columns"]]}
        real(self, spec, rank)
    monkeypatch.setattr(wsources.NpyTable, "__init__", on_node_1)
    with dg.init(workers=2, backend="local") as cluster:
        with pytest.raises(DataError, match=r"^worker 1: column 'x': no such file .*x\.gone"):
            cluster.shard_dataset(paths, batch_size=8)
        node_1["x"] = str(tmp_path / "other.npy")
        with pytest.raises(DataError, match=r"^worker 1 sees the dataset as x: float64 rows of shape "
                                            r"\(4,\).*but worker 0 as x: float64 rows of shape \(5,\)"):
            cluster.shard_dataset(paths, batch_size=8)


def test_a_bad_generator_is_named_with_the_row_and_the_worker():
    def flaky(i, rng):
        if i == 13:
            raise KeyError("no row 13")
        return rng.standard_normal(3 if i != 17 else 4)
    with dg.init(workers=2, backend="local") as cluster:
        ds = cluster.shard_from(flaky, rows=20, batch_size=20)
        with pytest.raises(dg.distributed.RemoteError, match=r"worker 1: .*the function raised for "
                                                             r"row 13: KeyError"):
            next(iter(ds))[0].numpy()
        with pytest.raises(DataError, match="worker 0: shard_from: the function raised for row 0"):
            cluster.shard_from(lambda i, rng: 1 / 0, rows=5, batch_size=5)
        with pytest.raises(ValueError, match="rows must be a positive int"):
            cluster.shard_from(flaky, rows=0, batch_size=5)
        ds = cluster.shard_from(lambda i, rng: rng.standard_normal(3 if i != 17 else 4),
                                rows=20, batch_size=20)
        with pytest.raises(dg.distributed.RemoteError, match=r"row 17 is .*\(4,\).*but row 0 was"):
            next(iter(ds))[0].numpy()


def test_without_ray_data_a_parquet_path_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray.data", None)       # as if pandas/pyarrow were missing
    with dg.init(workers=2, backend="local") as cluster:
        with pytest.raises(ImportError, match=r"Ray Data is not installed .*pip install 'ray\[data\]'"):
            cluster.shard_dataset(str(tmp_path / "train.parquet"), batch_size=8)


# ---------------------------------------------------------------- on Ray workers

@pytest.mark.ray
def test_ray_workers_resize_mid_epoch_and_keep_the_position(ray_session, files):
    """3 workers, then 2 in the middle of the first epoch, then 3 again: every row of each
    epoch once, and the parameters of one process on the same batches."""
    paths, X, y = files
    seen = []
    mod = os.path.join(os.path.dirname(paths["y"]), "driver_only_rows.py")
    with open(mod, "w") as f:
        f.write("def row(i, rng):\n    return rng.standard_normal(2)\n")
    sys.path.insert(0, os.path.dirname(mod))
    try:
        from driver_only_rows import row             # importable here, not on the workers
    finally:
        sys.path.pop(0)
    with dg.init(workers=3, backend="ray", address="auto") as cluster:
        with pytest.raises(DataError, match=r"worker 0: the object sent with the data source could "
                                            r"not be loaded there \(.*driver_only_rows"):
            cluster.shard_from(row, rows=10, batch_size=5)
        ds = cluster.shard_dataset(paths, batch_size=40, shuffle=True, seed=4)
        gen = cluster.shard_from(_gen, rows=30, batch_size=30)

        def resize(i):
            if i == 3:
                cluster.resize(2)
            if i == 8:
                cluster.resize(3)
                assert next(iter(gen))[0].placement.sizes == (10, 10, 10)   # reopened on the new worker
        got = fit(epochs_of(ds, 2), cluster, seen=seen, on_step=resize)
        assert cluster.world_size == 3
    assert sorted(seen[:203]) == list(range(203)) and sorted(seen[203:]) == list(range(203))
    ref = fit(local_batches(ds, X, y, 2))
    for p, q in zip(got, ref):
        np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)


def _kill_later(pid, delay):
    def kill():
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t = threading.Thread(target=kill)
    t.start()
    return t


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["npy", "arrays"])
def test_a_worker_killed_mid_epoch_still_sees_each_row_once(ray_session, files, kind):
    paths, X, y = files
    seen, killers = [], []
    with dg.init(workers=2, backend="ray", address="auto", timeout_s=10) as cluster:
        ds = (cluster.shard_dataset(paths, batch_size=32, shuffle=True, seed=1) if kind == "npy"
              else cluster.shard_dataset((X, y), batch_size=32, shuffle=True, seed=1))
        got = fit(epochs_of(ds, 1), cluster, seen=seen,
                  on_step=lambda i: killers.append(_kill_later(cluster.gang.pid(1), 0.0))
                  if i == 3 else None)
        for k in killers:
            k.join()
        assert len(cluster.recoveries) >= 1
    assert sorted(seen) == list(range(203))
    ref = fit(local_batches(ds, X, y, 1)) if kind == "npy" else None
    if ref is not None:
        for p, q in zip(got, ref):
            np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from /proc")
def test_driver_memory_does_not_grow_with_the_dataset(ray_session, tmp_path):
    """A 384 MB dataset on disk streamed through 2 Ray workers: the driver's RSS (sampled
    every 5 ms) grows by less than 1/8 of it."""
    rows, d = 98_304, 1024
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(rows, d))
    for a in range(0, rows, 8192):
        x[a:a + 8192] = np.random.default_rng(a).standard_normal((8192, d), np.float32)
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.arange(rows) % 10)
    size = rows * d * 4
    with dg.init(workers=2, backend="ray", address="auto") as cluster:
        model = cluster.replicate(dg.nn.Linear(d, 10))
        opt = dg.optim.SGD(model.parameters(), lr=0.01)
        ds = cluster.shard_dataset({"x": str(tmp_path / "x.npy"), "y": str(tmp_path / "y.npy")},
                                   batch_size=4096, shuffle=True)
        it = iter(ds)
        for _ in range(2):                     # warm: programs cached, buffers allocated
            xb, yb = next(it)
            loss = dg.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step(); loss.item()
        gc.collect()
        base, peak, done = _rss(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.005)
        t = threading.Thread(target=sample)
        t.start()
        steps = 0
        for xb, yb in it:
            loss = dg.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step(); loss.item()
            steps += 1
        done.set()
        t.join()
    assert steps == len(ds) - 2
    assert peak[0] - base < size / 8, f"driver RSS grew by {(peak[0] - base) / 2**20:.0f} MB"


# ---------------------------------------------------------------- Ray Data

def _ray_dataset(n=203):
    pytest.importorskip("pandas")
    import ray.data
    X, y = rows_dataset(n)
    return ray.data.from_items([{"x": X[i], "y": y[i], "name": f"r{i}"} for i in range(n)],
                               override_num_blocks=7), X, y


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_dataset_streams_every_row_once_and_trains_as_one_process(ray_session):
    ds, X, y = _ray_dataset()
    with dg.init(workers=2, backend="ray", address="auto") as cluster:
        train = cluster.shard_dataset(ds, batch_size=32, shuffle=True, columns=["x", "y"])
        assert train.columns == ["x", "y"] and len(train) == 7
        seen = []
        got = fit(epochs_of(train, 2), cluster, seen=seen)
        sizes = []
        for xb, yb in train:
            sizes.append(sum(xb.placement.sizes))
            np.testing.assert_array_equal(yb.numpy(), xb.numpy()[:, 0].astype(int) % 3)
        acc = train.evaluate(lambda x, t: x[:, 0] * 0 + 1)
    assert sorted(seen[:203]) == list(range(203)) and sorted(seen[203:]) == list(range(203))
    assert sizes == [32] * 6 + [11] and acc == 1.0
    batches = [seen[a:min(a + 32, e + 203)] for e in (0, 203) for a in range(e, e + 203, 32)]
    ref = fit([(dg.tensor(X[b]), dg.tensor(y[b])) for b in batches])
    for p, q in zip(got, ref):
        np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_and_parquet_bad_input_is_named_before_training(ray_session, tmp_path):
    ds, X, y = _ray_dataset(40)
    import pyarrow as pa
    import pyarrow.parquet as pq
    with dg.init(workers=2, backend="ray", address="auto") as cluster:
        with pytest.raises(DataError, match=r"columns \['label'\] are not in the Ray dataset"):
            cluster.shard_dataset(ds, batch_size=8, columns=["x", "label"])
        with pytest.raises(DataError, match="column 'name' has type string"):
            cluster.shard_dataset(ds, batch_size=8)
        with pytest.raises(DataError, match=r"column 'y' holds int64, but float64 is expected"):
            cluster.shard_dataset(ds, batch_size=8, columns=["x", "y"], dtypes={"y": "float64"})
        table = pa.table({"a": np.arange(30, dtype=np.float32), "b": np.arange(30) % 2})
        pq.write_table(table.slice(0, 17), tmp_path / "p0.parquet")
        pq.write_table(table.slice(17), tmp_path / "p1.parquet")
        pds = cluster.shard_dataset(str(tmp_path), batch_size=8, shuffle=False)
        got = sorted(int(v) for a, _b in pds for v in a.numpy())
        assert got == list(range(30)) and pds.columns == ["a", "b"]
        with pytest.raises(ResizeError, match="resize between epochs"):
            it = iter(pds)
            next(it)
            cluster.resize(1)
        del it


@pytest.mark.ray
def test_a_worker_lost_mid_stream_is_one_clear_error(ray_session):
    ds, X, y = _ray_dataset(120)
    with dg.init(workers=2, backend="ray", address="auto", timeout_s=10) as cluster:
        train = cluster.shard_dataset(ds, batch_size=16, columns=["x", "y"])
        W = cluster.replicate(dg.tensor(np.ones((5, 1))))
        it = iter(train)
        xb, _ = next(it)
        (xb @ W).sum().item()
        xb, _ = next(it)
        pid = cluster.gang.pid(1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RecoveryError, match="lost their split of the Ray Data stream"):
            (xb @ W).sum().item()
        # The cluster recovered; the next epoch streams every row again.
        seen = sorted(int(v) for xb, _ in train for v in xb.numpy()[:, 0])
        assert seen == list(range(120))


@pytest.mark.ray
@pytest.mark.slow
def test_two_nodes_read_their_own_rows_exactly():
    """ray.cluster_utils.Cluster with 2 worker nodes, in its own process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "data_two_nodes.py")],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = dict(line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines["nodes"] == "2"
    assert lines["npy_rows_once"] == "True" and float(lines["npy_maxdiff"]) < 1e-10
    assert lines["stream_rows_once"] == "True"
