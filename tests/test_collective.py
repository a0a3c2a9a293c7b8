"""Collective backends without Ray: in-process threads, shared memory across
spawned processes, TCP ring on loopback.

Each backend runs one battery of cases (every collective, world sizes 1-4,
sizes from 1 element to a few MB incl. sizes not divisible by the world size,
float32/float64/int64/float16, every reduce op). Every rank checks its result
bit for bit against a rank-ordered numpy reference and reports a digest, so
the test also checks that every rank holds the same bits.
"""
import functools
import hashlib
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback

import numpy as np
import pytest

from distgrad.workers.collective import (CollectiveAbortedError, CollectiveMismatchError,
                                         CollectiveTimeoutError,
                                         create_communicator, split_ranges)
from distgrad.workers.collective.base import normalize_op, reduce_in_order
from distgrad.workers.collective.inprocess import InProcessGroup
from distgrad.workers.collective.rendezvous import DictStore, FileStore
from distgrad.workers.collective.hierarchical import HierarchicalCommunicator
from distgrad.workers.collective.shm import ShmCommunicator
from distgrad.workers.collective.shm_segment import cleanup_stale_segments, list_segments
from distgrad.workers.collective.tcp import TcpCommunicator

DTYPES = [np.float32, np.float64, np.int64, np.float16]
OPS = ["sum", "prod", "min", "max"]
SIZES = [1, 3, 1000, 65537, 400_001]      # 400_001 float64 = 3.2 MB, several shm chunks
UFUNC = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}


def _data(case, rank, shape, dtype):
    """Deterministic input of ``rank`` for ``case``; any rank can rebuild any other's."""
    rng = np.random.default_rng([case, rank])
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-4, 5, size=shape).astype(dtype)
    # in [0.5, 1.5): products over 4 ranks stay finite even in float16
    return rng.uniform(0.5, 1.5, size=shape).astype(dtype)


class RankOrder:
    """Reference of the shm and in-process backends: ((x0 op x1) op x2) ... in rank order."""

    def reduce(self, xs, op):
        return functools.reduce(UFUNC[op], xs)

    def reducescatter(self, xs, op):
        return self.reduce(xs, op)


class RingOrder(RankOrder):
    """Reference of the tcp ring: segment j of the flat array (numpy.array_split into
    N parts) is reduced in the order j, j+1, ..., j-1 (mod N)."""

    def _ring(self, xs, op, segs, start):
        n = len(xs)
        flat = [np.ascontiguousarray(x).reshape(-1) for x in xs]
        out = np.empty_like(flat[0])
        for j, (s, e) in enumerate(segs):
            out[s:e] = functools.reduce(UFUNC[op], [flat[(start(j) + k) % n][s:e]
                                                    for k in range(n)])
        return out.reshape(xs[0].shape)

    def reduce(self, xs, op):
        return self._ring(xs, op, split_ranges(xs[0].size, len(xs)), lambda j: j)

    def reducescatter(self, xs, op):
        # rank r's rows (array_split along axis 0) are ring segment r + 1
        n, shape = len(xs), xs[0].shape
        row = int(np.prod(shape[1:], dtype=np.int64))
        segs = [(a * row, b * row) for a, b in split_ranges(shape[0], n)]
        return self._ring(xs, op, segs, lambda j: j + 1)


class HierOrder(RankOrder):
    """Reference of the hierarchical backend: rank order inside each node, then the
    ring over the node partials (nodes ordered by their lowest rank)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def reduce(self, xs, op):
        order = list(dict.fromkeys(self.nodes))
        parts = [functools.reduce(UFUNC[op], [x for x, nd in zip(xs, self.nodes) if nd == o])
                 for o in order]
        return RingOrder().reduce(parts, op) if len(parts) > 1 else parts[0]

    def reducescatter(self, xs, op):
        return self.reduce(xs, op)


def _reference(case, ws, shape, dtype, op, order=RankOrder(), kind="reduce"):
    """The expected reduction of every rank's input for ``case``, in ``order``."""
    xs = [_data(case, k, shape, dtype) for k in range(ws)]
    return getattr(order, kind)(xs, op)


def _digest(a):
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def run_battery(comm, big=True, order=RankOrder()):
    """Run every collective on ``comm``; return ({case: digest}, [error strings]).

    ``order``: the backend's documented reduction order (the reference)."""
    r, ws = comm.rank, comm.world_size
    digests, errors = {}, []
    case = 0

    def check(name, got, want, same_on_all_ranks=True):
        try:
            np.testing.assert_array_equal(got, want, err_msg=name)
            assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
            if same_on_all_ranks:
                digests[name] = _digest(got)
        except AssertionError as e:
            errors.append(f"rank {r}: {name}: {str(e)[:400]}")

    sizes = SIZES if big else SIZES[:3]
    for dtype in DTYPES:
        for op in OPS:
            for n in sizes:
                case += 1
                name = f"allreduce {np.dtype(dtype).name} {op} n={n}"
                x = _data(case, r, (n,), dtype)
                out = comm.allreduce(x, op=op)
                assert out is x
                check(name, x, _reference(case, ws, (n,), dtype, op, order))
    # non-contiguous array, 0-d array, empty array, Ray-style op object
    case += 1
    base = _data(case, r, (6, 10), np.float64)
    view = base[:, ::2]
    comm.allreduce(view, "SUM")
    want = [_data(case, k, (6, 10), np.float64)[:, ::2] for k in range(ws)]
    check("allreduce non-contiguous", view, order.reduce(want, "sum"))
    check("allreduce non-contiguous untouched", base[:, 1::2],
          _data(case, r, (6, 10), np.float64)[:, 1::2], False)
    case += 1
    x0 = np.array(float(r + 1))
    comm.allreduce(x0, "max")
    check("allreduce 0-d", x0, np.array(float(ws)))
    e = np.empty((0, 3), np.float32)
    comm.allreduce(e)
    check("allreduce empty", e, np.empty((0, 3), np.float32))

    # reducescatter: rows split like numpy.array_split, uneven allowed
    for rows in ([1, ws, 7, 1001] + ([70_003] if big else [])):
        for dtype, op in ((np.float32, "sum"), (np.int64, "max"), (np.float16, "prod")):
            case += 1
            x = _data(case, r, (rows, 3), dtype)
            keep = x.copy()
            got = comm.reducescatter(x, op)
            full = _reference(case, ws, (rows, 3), dtype, op, order, "reducescatter")
            check(f"reducescatter rows={rows} {np.dtype(dtype).name} {op}", got,
                  np.array_split(full, ws, axis=0)[r], False)
            check(f"reducescatter input unchanged rows={rows}", x, keep, False)

    # allgather: each rank may pass a different number of rows
    for n in ([1, 5, 3000] + ([300_001] if big else [])):
        case += 1
        x = _data(case, r, (n + r, 2), np.float64)
        got = comm.allgather(x)
        assert len(got) == ws
        for k in range(ws):
            check(f"allgather n={n} from {k}", got[k], _data(case, k, (n + k, 2), np.float64))
        stacked = comm.allgather_stacked(_data(case, r, (n,), np.int64))
        check(f"allgather_stacked n={n}", stacked,
              np.stack([_data(case, k, (n,), np.int64) for k in range(ws)]))

    # broadcast and reduce from every root
    for root in range(ws):
        for n in ([2, 70_001] + ([600_001] if big else [])):
            case += 1
            x = _data(case, r, (n,), np.float32)
            comm.broadcast(x, root=root)
            check(f"broadcast root={root} n={n}", x, _data(case, root, (n,), np.float32))
            case += 1
            x = _data(case, r, (n,), np.float64)
            comm.reduce(x, root=root, op="sum")
            want = (_reference(case, ws, (n,), np.float64, "sum", order) if r == root
                    else _data(case, r, (n,), np.float64))
            check(f"reduce root={root} n={n}", x, want, False)

    comm.barrier()

    # point to point: even ranks send first, odd receive first (no deadlock for big messages)
    if ws > 1:
        for n in ([3, 2000] + ([500_001] if big else [])):
            case += 1
            nxt, prv = (r + 1) % ws, (r - 1) % ws
            mine = _data(case, r, (n,), np.float32)
            if r % 2 == 0:
                comm.send(mine, nxt)
                got = comm.recv(None, prv)
            else:
                got = comm.recv((n,), prv, dtype=np.float32)
                comm.send(mine, nxt)
            check(f"sendrecv n={n}", got, _data(case, prv, (n,), np.float32), False)
            if ws == 2:
                buf = np.empty(n, np.float32)
                if r == 0:
                    comm.send(mine, 1)
                else:
                    out = comm.recv(buf, 0)
                    assert out is buf
                    check(f"recv into buffer n={n}", buf, _data(case, 0, (n,), np.float32),
                          False)
    comm.barrier()
    return digests, errors


def _assert_battery(results, ws):
    """results: list (per rank) of (digests, errors)."""
    errors = [e for _, errs in results for e in errs]
    assert not errors, "\n".join(errors[:20])
    d0 = results[0][0]
    assert len(d0) >= 48          # the battery really ran
    for k in range(1, ws):
        diff = [name for name in d0 if results[k][0].get(name) != d0[name]]
        assert not diff, f"rank {k} holds different bits than rank 0 for {diff[:5]}"


def _run_threads(ws, fn, timeout=120):
    """Run fn(rank) in ws threads; return results in rank order, re-raising the first error."""
    results, excs = [None] * ws, [None] * ws

    def target(r):
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            excs[r] = e

    ts = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(ws)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
        assert not t.is_alive(), "thread rank hung"
    return results, excs


# -- helpers ---------------------------------------------------------------------

def test_helpers():
    assert normalize_op("PRODUCT") == "prod"
    with pytest.raises(ValueError, match="unknown reduce op"):
        normalize_op("mean")
    assert split_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    for n in (0, 1, 7, 64):
        for p in (1, 3, 4):
            assert [b - a for a, b in split_ranges(n, p)] == \
                [len(c) for c in np.array_split(np.arange(n), p)]
    a, b, c = np.float32(1e8), np.float32(1.0), np.float32(-1e8)
    out = reduce_in_order([np.array([a]), np.array([b]), np.array([c])], "sum",
                          np.empty(1, np.float32))
    assert out[0] == np.float32((a + b) + c)    # 0.0: order (x0+x1)+x2, not x0+(x1+x2)


# -- in-process ------------------------------------------------------------------

@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_inprocess_battery(ws):
    group = InProcessGroup(ws, "inproc-battery", timeout_s=30)

    def fn(r):
        with group.communicator(r) as comm:
            return run_battery(comm, big=ws <= 2)

    results, excs = _run_threads(ws, fn)
    assert not any(excs), excs
    _assert_battery(results, ws)


def test_inprocess_timeout_names_missing_rank():
    group = InProcessGroup(3, "inproc-timeout", timeout_s=0.5)
    comms = [group.communicator(r) for r in range(3)]

    def fn(r):
        if r == 2:
            return None               # never arrives
        t0 = time.monotonic()
        try:
            comms[r].allreduce(np.ones(4))
        except CollectiveTimeoutError as e:
            return e, time.monotonic() - t0
        return "no error", 0

    results, excs = _run_threads(3, fn)
    assert not any(excs)
    for r in (0, 1):
        err, dt = results[r]
        assert isinstance(err, CollectiveTimeoutError), err
        assert err.missing_ranks == [2]
        assert "inproc-timeout" in str(err) and "allreduce" in str(err) and "rank 2" in str(err)
        assert dt < 0.5 + 5
    # the group is broken from now on, also for the late rank
    with pytest.raises(CollectiveTimeoutError, match="rank 2"):
        comms[2].allreduce(np.ones(4))


def test_inprocess_mismatch_and_errors():
    group = InProcessGroup(2, "inproc-mismatch", timeout_s=5)

    def fn(r):
        comm = group.communicator(r)
        with pytest.raises(CollectiveMismatchError, match="disagree"):
            comm.allreduce(np.ones(3 + r))
        comm.barrier()            # still usable after a mismatch
        with pytest.raises(ValueError):
            comm.broadcast(np.ones(2), root=5)
        with pytest.raises(ValueError):
            comm.send(np.ones(2), r)
        return True

    results, excs = _run_threads(2, fn)
    assert not any(excs), excs
    with pytest.raises(ValueError, match="already has"):
        group.communicator(0)


def test_create_communicator_factory():
    comm = create_communicator("inprocess", rank=0, world_size=1)
    assert comm.allreduce(np.arange(3.0)).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="unknown collective kind"):
        create_communicator("mpi")


# -- shared memory, processes ---------------------------------------------------------

def _make(rank, ws, name, kw):
    """Build the communicator named by kw["kind"] (default shm) in a child process."""
    kind = kw.pop("kind", "shm")
    timeout_s = kw.pop("timeout_s", 30)
    kw.setdefault("init_timeout_s", 60)     # spawned processes start at different times
    if kind == "shm":
        return ShmCommunicator(rank, ws, name, timeout_s=timeout_s, **kw), RankOrder()
    store = FileStore(kw.pop("store_dir"))
    if kind == "tcp":
        return TcpCommunicator(rank, ws, store, name, timeout_s=timeout_s, **kw), RingOrder()
    nodes = kw.pop("nodes")
    comm = HierarchicalCommunicator(rank, ws, store, node_id=nodes[rank], group_name=name,
                                    timeout_s=timeout_s, **kw)
    return comm, HierOrder(nodes)


def _shm_child(rank, ws, name, q, mode, kw):
    try:
        big = kw.pop("big", True)
        comm, order = _make(rank, ws, name, kw)
        if mode == "battery":
            q.put((rank, run_battery(comm, big=big, order=order)))
        elif mode == "bucket":
            res = []
            for rep in range(2):
                comm.reset_buckets()
                for i, (n, dt, op) in enumerate([(1, np.float32, "sum"), (1001, np.float64, "max"),
                                                 (1_000_003, np.float32, "sum"),
                                                 (70_001, np.float16, "prod")]):
                    case = 1000 * rep + i
                    b = comm.bucket((n,), dt)
                    b.input[...] = _data(case, rank, (n,), dt)
                    out = comm.allreduce_bucket(b, op)
                    want = RankOrder().reduce([_data(case, k, (n,), dt) for k in range(ws)], op)
                    res.append((n, bool(np.array_equal(out, want)) and out.dtype == want.dtype,
                                _digest(out)))
            with pytest.raises(ValueError, match="does not fit"):
                comm.bucket((1 << 30,), np.float32)
            q.put((rank, res))
        elif mode == "timeout":
            t0 = time.monotonic()
            try:
                comm.allreduce(np.ones(1000))
                q.put((rank, ("no error", 0.0)))
            except CollectiveTimeoutError as e:
                q.put((rank, (str(e), time.monotonic() - t0, e.missing_ranks)))
        elif mode == "die":
            if rank == 1:
                os._exit(3)           # dies without closing anything
            t0 = time.monotonic()
            try:
                comm.allreduce(np.ones(10_000_000 // 8))
                q.put((rank, ("no error", 0.0, [])))
            except CollectiveTimeoutError as e:
                q.put((rank, (str(e), time.monotonic() - t0, e.missing_ranks)))
        elif mode == "leave":           # rank 1's step failed: it leaves, the others wait on it
            if rank == 1:
                comm.abort("its step failed")
                q.put((rank, ("left", 0.0, [])))
            else:
                try:
                    comm.allreduce(np.ones(1000))
                    q.put((rank, ("no error", 0.0, [])))
                except CollectiveTimeoutError as e:
                    q.put((rank, (type(e).__name__, str(e), e.missing_ranks)))
        elif mode == "mismatch":
            try:
                comm.allreduce(np.ones(100 + rank * 1000, np.float32))
                q.put((rank, "no error"))
            except CollectiveMismatchError as e:
                comm.barrier()        # group still usable
                q.put((rank, str(e)))
        comm.close()
    except BaseException:  # noqa: BLE001  (reported to the parent)
        q.put((rank, ("exception", traceback.format_exc())))


def _shm_idle_child(rank, ws, name, q, ev, kw):
    comm, _ = _make(rank, ws, name, kw)
    q.put((rank, "idle"))
    ev.wait(60)
    comm.close()


def _spawn(ws, name, mode, kw=None, idle_rank=None, timeout=90):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ev = ctx.Event()
    procs = []
    for r in range(ws):
        if r == idle_rank:
            p = ctx.Process(target=_shm_idle_child, args=(r, ws, name, q, ev, dict(kw or {})))
        else:
            p = ctx.Process(target=_shm_child, args=(r, ws, name, q, mode, dict(kw or {})))
        p.start()
        procs.append(p)
    try:
        expect = ws - (1 if mode == "die" else 0)
        out = {}
        deadline = time.monotonic() + timeout
        while len(out) < expect:
            rank, res = q.get(timeout=max(1, deadline - time.monotonic()))
            if isinstance(res, tuple) and res and res[0] == "exception":
                raise AssertionError(f"rank {rank} failed:\n{res[1]}")
            out[rank] = res
        return out
    finally:
        ev.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()


def _our_segments(name):
    return [s for s in list_segments() if s.startswith(name) or
            s.startswith(f"distgrad_tmp_{os.getpid()}_")]


@pytest.mark.parametrize("ws", [2, 3, 4])
def test_shm_battery(ws):
    name = f"distgrad_t_battery{ws}_{os.getpid()}"
    out = _spawn(ws, name, "battery")
    _assert_battery([out[r] for r in range(ws)], ws)
    assert not _our_segments(name)


def test_shm_world_size_one_and_threads():
    # world size 1 is a no-op group; ranks may also be threads of one process
    with ShmCommunicator(0, 1, f"distgrad_t_ws1_{os.getpid()}") as c:
        x = np.arange(5.0)
        assert c.allreduce(x) is x and x.tolist() == [0, 1, 2, 3, 4]
        assert c.reducescatter(np.ones((3, 2))).shape == (3, 2)
        assert [a.tolist() for a in c.allgather(np.ones(2))] == [[1.0, 1.0]]
        c.barrier()
    name = f"distgrad_t_threads_{os.getpid()}"
    res, excs = _run_threads(2, lambda r: ShmCommunicator(r, 2, name, timeout_s=10)
                             .allreduce(np.full(100_000, r + 1.0)))
    assert not any(excs), excs
    assert all((x == 3.0).all() for x in res)
    assert not _our_segments(name)


def test_shm_send_of_many_dimensions_arrives_whole_or_is_refused():
    """A channel header holds at most 12 shape words before the receiver's acknowledgement
    counter. A 13-dimensional message used to overwrite that counter with its last
    dimension, so the sender stopped waiting and later chunks overwrote earlier ones
    before the receiver read them (wrong data, no error). Now: 12 dimensions arrive bit
    for bit over many chunks, 13 are refused before anything is sent, and the channel
    stays usable."""
    name = f"distgrad_t_ndim_{os.getpid()}"
    ok = np.arange(3000.0).reshape((1,) * 11 + (3000,))       # 24 KB: 6 chunks of 4 KB
    deep = ok.reshape((1,) * 12 + (3000,))

    def rank(r):
        with ShmCommunicator(r, 2, name, timeout_s=10, p2p_bytes=4096) as c:
            if r == 0:
                c.send(ok, 1)
                with pytest.raises(ValueError, match="at most 12 dimensions"):
                    c.send(deep, 1)
                c.send(np.full(3, 7.0), 1)
                return None
            time.sleep(0.3)                  # the sender runs ahead of the receiver
            return c.recv(None, 0), c.recv(None, 0)
    res, excs = _run_threads(2, rank)
    assert not any(excs), excs
    got, after = res[1]
    assert got.shape == ok.shape and np.array_equal(got, ok)
    assert after.tolist() == [7.0, 7.0, 7.0]
    assert not _our_segments(name)


def test_shm_mismatch_raises_on_every_rank():
    name = f"distgrad_t_mismatch_{os.getpid()}"
    out = _spawn(2, name, "mismatch")
    for r in range(2):
        assert "disagree" in out[r] and "rank 0" in out[r] and "rank 1" in out[r], out[r]


def test_shm_timeout_names_missing_rank():
    name = f"distgrad_t_timeout_{os.getpid()}"
    timeout_s = 1.5
    out = _spawn(3, name, "timeout", kw={"timeout_s": timeout_s}, idle_rank=2)
    assert out[2] == "idle"
    for r in (0, 1):
        msg, dt, missing = out[r]
        assert missing == [2], msg
        assert "rank 2 did not arrive" in msg and name in msg and "allreduce" in msg, msg
        assert dt < timeout_s + 5, dt


def test_shm_dead_peer_detected_before_timeout():
    name = f"distgrad_t_die_{os.getpid()}"
    out = _spawn(3, name, "die", kw={"timeout_s": 60})
    for r in (0, 2):
        msg, dt, missing = out[r]
        assert 1 in missing and "rank 1" in msg, msg
        assert dt < 30, dt                    # well within the 60 s timeout
    assert not _our_segments(name)


def test_shm_attach_timeout_names_missing_ranks():
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeoutError, match=r"ranks 1, 2 did not arrive"):
        ShmCommunicator(0, 3, f"distgrad_t_noshow_{os.getpid()}", timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    assert not _our_segments(f"distgrad_t_noshow_{os.getpid()}")


def test_shm_no_leak_over_100_cycles():
    name = f"distgrad_t_leak_{os.getpid()}"

    def cycle(r):
        for i in range(100):
            c = ShmCommunicator(r, 2, f"{name}_{i}", timeout_s=10, slot_bytes=64 << 10,
                                p2p_bytes=4096)
            if i % 10 == 0:
                x = np.full(10, r + 1.0)
                c.allreduce(x)
                assert (x == 3.0).all()
            c.close()
        return True

    res, excs = _run_threads(2, cycle)
    assert not any(excs), excs
    assert not _our_segments(name)


def _create_then_hang(name, q):
    q.put(os.getpid())
    ShmCommunicator(0, 2, name, timeout_s=60)      # waits for rank 1 forever


def test_shm_crash_during_rendezvous_is_cleaned_up():
    name = f"distgrad_t_crash_{os.getpid()}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_create_then_hang, args=(name, q))
    p.start()
    q.get(timeout=60)
    deadline = time.monotonic() + 30
    while name not in list_segments() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert name in list_segments()
    os.kill(p.pid, signal.SIGKILL)                  # no atexit, no finalizer
    p.join()
    assert name in list_segments()                  # the crash left the name behind...
    assert name in cleanup_stale_segments()         # ...and the next creator removes it
    assert name not in list_segments()


# -- tcp ring and hierarchical, processes on loopback -----------------------------------------

@pytest.mark.parametrize("ws", [2, 3])
def test_tcp_battery(ws, tmp_path):
    name = f"t_tcp{ws}_{os.getpid()}"
    out = _spawn(ws, name, "battery", kw={"kind": "tcp", "store_dir": str(tmp_path),
                                          "big": ws == 2})
    _assert_battery([out[r] for r in range(ws)], ws)
    assert not os.listdir(tmp_path), "rendezvous keys left behind"


@pytest.mark.parametrize("nodes", [("a", "a", "b", "b"), ("a", "b", "a"), ("a", "a", "a")])
def test_hierarchical_battery(nodes, tmp_path):
    ws = len(nodes)
    name = f"t_hier{ws}_{os.getpid()}"
    out = _spawn(ws, name, "battery", kw={"kind": "hier", "store_dir": str(tmp_path),
                                          "nodes": nodes, "big": False})
    _assert_battery([out[r] for r in range(ws)], ws)
    assert not os.listdir(tmp_path), "rendezvous keys left behind"


def test_tcp_timeout_names_missing_rank(tmp_path):
    name = f"t_tcp_timeout_{os.getpid()}"
    timeout_s = 3.0
    out = _spawn(3, name, "timeout", kw={"kind": "tcp", "store_dir": str(tmp_path),
                                         "timeout_s": timeout_s}, idle_rank=2)
    for r in (0, 1):
        msg, dt, missing = out[r]
        assert missing == [2], msg      # rank 1 waits on rank 0 in the ring, yet names rank 2
        assert "rank 2 did not arrive" in msg and name in msg, msg
        assert dt < timeout_s + 5, dt


def test_tcp_dead_peer(tmp_path):
    name = f"t_tcp_die_{os.getpid()}"
    out = _spawn(3, name, "die", kw={"kind": "tcp", "store_dir": str(tmp_path),
                                     "timeout_s": 60})
    for r in (0, 2):
        msg, dt, missing = out[r]
        assert missing == [1], msg
        assert dt < 30, dt


def test_tcp_threads_and_mismatch():
    store = DictStore()

    def fn(r):
        with TcpCommunicator(r, 2, store, "t_tcp_threads", timeout_s=10) as c:
            x = np.full(300_000, r + 1.0)
            c.allreduce(x)
            assert (x == 3.0).all()
            with pytest.raises(CollectiveMismatchError):
                c.allreduce(np.ones(10 + r))
        return True

    res, excs = _run_threads(2, fn)
    assert not any(excs), excs


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_shm_zero_copy_buckets(ws):
    name = f"distgrad_t_bucket{ws}_{os.getpid()}"
    out = _spawn(ws, name, "bucket", kw={"arena_bytes": 8 << 20})
    for r in range(ws):
        assert len(out[r]) == 8 and all(ok for _, ok, _ in out[r]), out[r]
        assert [d for *_, d in out[r]] == [d for *_, d in out[0]]
    assert not _our_segments(name)


def test_gradient_buckets_refuse_layouts_that_differ_between_ranks():
    """A column-major gradient goes into a bucket without a transposed copy; if one rank
    holds it row-major, the bucket's signature element says so and the sum is refused
    (never elements of different positions added together)."""
    import threading
    from types import SimpleNamespace
    from distgrad.workers.bucketing import Bucketer, OrderedComm
    from distgrad.workers.collective.base import CollectiveMismatchError
    from distgrad.workers.collective.inprocess import InProcessGroup

    def run(layouts):
        group = InProcessGroup(2, timeout_s=10)
        out, errors = [None, None], [None, None]

        def rank(r):
            comm = OrderedComm(group.communicator(r), 10)
            g = np.arange(6.0).reshape(2, 3) * (r + 1)
            g = np.asfortranarray(g) if layouts[r] == "F" else np.ascontiguousarray(g)
            leaf = SimpleNamespace(grad=SimpleNamespace(store=SimpleNamespace(array=g)))
            b = Bucketer(comm, 1 << 20, {id(leaf)})
            try:
                b.add(leaf)
                b.finish()
                out[r] = g
            except CollectiveMismatchError as e:
                errors[r] = e
            comm.close()
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out, errors
    out, errors = run(["F", "F"])
    assert errors == [None, None]
    for g in out:
        np.testing.assert_array_equal(g, np.arange(6.0).reshape(2, 3) * 3)
    _, errors = run(["F", "C"])
    assert all(isinstance(e, CollectiveMismatchError) for e in errors)


@pytest.mark.parametrize("kind", ["shm", "tcp", "hierarchical"])
def test_a_rank_that_leaves_fails_its_peers_at_once(kind, tmp_path):
    # The group's timeout (300 s) is far beyond the wait for the results (120 s): peers
    # must fail because rank 1 left, not because their wait ran out.
    name = f"t_leave_{kind}_{os.getpid()}"
    kw = {"timeout_s": 300}
    if kind != "shm":
        kw.update(kind=kind, store_dir=str(tmp_path))
    if kind == "hierarchical":
        kw["nodes"] = ("a", "a", "b")
    out = _spawn(3, name, "leave", kw=kw, timeout=120)
    for r in (0, 2):
        cls, msg, missing = out[r]
        # Across nodes, the other node sees rank 1's leader (rank 0) leave the leaders' ring.
        assert missing == [1] or (kind == "hierarchical" and r == 2 and missing == [0]), msg
        if kind == "shm":
            assert cls == "CollectiveAbortedError" and "rank 1 left the step" in msg, msg


def test_inprocess_rank_that_leaves_fails_its_peers_at_once():
    group = InProcessGroup(3, "t_leave", timeout_s=300)

    def fn(r):
        comm = group.communicator(r)
        if r == 1:
            comm.abort("its step failed")
            return "left"
        comm.allreduce(np.ones(10))

    _, excs = _run_threads(3, fn, timeout=60)
    for r in (0, 2):
        assert isinstance(excs[r], CollectiveAbortedError), excs[r]
        assert excs[r].missing_ranks == [1] and "rank 1 left the step" in str(excs[r])


def test_tcp_socket_buffers_are_fixed_only_where_the_system_allows_their_size(monkeypatch):
    # A fixed SO_SNDBUF/SO_RCVBUF disables Linux's autotuning: with the common 208 KiB cap
    # a fixed "4 MB" buffer would be silently small for good, so it is left alone there.
    import socket
    from types import SimpleNamespace
    from distgrad.workers.collective import tcp_links
    real_cap = tcp_links._sysctl_net_core("wmem_max")

    def tuned_sizes(system_max):
        monkeypatch.setattr(tcp_links, "_sysctl_net_core", lambda name: system_max)
        with socket.create_server(("127.0.0.1", 0)) as server, \
                socket.create_connection(server.getsockname()) as sock:
            before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            tcp_links.TcpLinks._tune(SimpleNamespace(_io_timeout=5.0), sock)
            return before, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    before, after = tuned_sizes(212992)
    assert after == before                       # autotuning kept
    if not real_cap:
        pytest.skip("no /proc/sys/net/core/wmem_max here")
    _, after = tuned_sizes(64 << 20)
    # fixed: Linux reports twice the request, itself capped by the real system maximum
    assert after == 2 * min(tcp_links._SOCK_BUF, real_cap)
