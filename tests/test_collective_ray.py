"""distgrad's collective backend through ray.util.collective, on a real local Ray
instance (shared memory between actors of one node) and on a two-node
``ray.cluster_utils.Cluster`` (TCP ring / hierarchical between "nodes")."""
import functools
import multiprocessing as mp
import sys
import time
import traceback

import numpy as np
import pytest

ray = pytest.importorskip("ray")
col = pytest.importorskip("ray.util.collective")

pytestmark = pytest.mark.ray

# The actor class below lives in this test module, which Ray workers cannot import.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

UFUNC = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}
RAY_OPS = {"sum": "SUM", "prod": "PRODUCT", "min": "MIN", "max": "MAX"}


def _data(case, rank, shape, dtype):
    rng = np.random.default_rng([case, rank])
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-4, 5, size=shape).astype(dtype)
    return rng.uniform(0.5, 1.5, size=shape).astype(dtype)


def _ring_ref(xs, op):
    """Two-rank or one-rank-per-node reference (ring order; equals rank order for 2)."""
    n = len(xs)
    flat = [x.reshape(-1) for x in xs]
    out = np.empty_like(flat[0])
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(flat[0].size), n)])
    for j in range(n):
        s, e = bounds[j], bounds[j + 1]
        out[s:e] = functools.reduce(UFUNC[op], [flat[(j + k) % n][s:e] for k in range(n)])
    return out.reshape(xs[0].shape)


def _rank_ref(xs, op):
    return functools.reduce(UFUNC[op], xs)


def _pairs_ref(xs, op):
    """2 nodes x 2 ranks, hierarchical: node sums in rank order, then the 2-ring."""
    return UFUNC[op](_rank_ref(xs[:2], op), _rank_ref(xs[2:], op))


class ColWorker:
    """A plain Ray user's actor: registers the backend at start, then uses col.*."""

    def __init__(self, rank, timeout_s=None):
        from distgrad.workers.collective import ray_backend
        ray_backend.register()
        if timeout_s is not None:
            ray_backend.set_default_timeout(timeout_s)
        self.rank = rank

    def node(self):
        return ray.get_runtime_context().get_node_id()

    def init(self, ws, group):
        col.init_collective_group(ws, self.rank, backend="distgrad", group_name=group)
        from ray.util.collective.collective import get_group_handle
        return get_group_handle(group).communicator.topology

    def battery(self, ws, group, sizes, ref):
        """Every collective through col.*; returns [(name, ok, digest)]."""
        from ray.util.collective.types import ReduceOp
        r = self.rank
        refs = {"rank": _rank_ref, "ring": _ring_ref, "pairs": _pairs_ref}
        out = []

        def check(name, got, want, shared=True):
            ok = got.dtype == want.dtype and np.array_equal(got, want)
            out.append((name, bool(ok), got.tobytes()[:64].hex() if shared else ""))

        case = 0
        for dtype in (np.float32, np.float64, np.int64, np.float16):
            for op in ("sum", "prod", "min", "max"):
                for n in sizes:
                    case += 1
                    x = _data(case, r, (n,), dtype)
                    col.allreduce(x, group, getattr(ReduceOp, RAY_OPS[op]))
                    xs = [_data(case, k, (n,), dtype) for k in range(ws)]
                    check(f"allreduce {np.dtype(dtype).name} {op} {n}", x, refs[ref](xs, op))
        for root in range(ws):
            case += 1
            x = _data(case, r, (1001,), np.float32)
            col.broadcast(x, root, group)
            check(f"broadcast {root}", x, _data(case, root, (1001,), np.float32))
            case += 1
            x = _data(case, r, (1001,), np.float64)
            col.reduce(x, root, group, ReduceOp.MAX)
            want = (np.maximum.reduce([_data(case, k, (1001,), np.float64) for k in range(ws)])
                    if r == root else _data(case, r, (1001,), np.float64))
            check(f"reduce {root}", x, want, shared=False)
        case += 1
        outs = [np.empty((5, 2), np.float64) for _ in range(ws)]
        col.allgather(outs, _data(case, r, (5, 2), np.float64), group)
        for k in range(ws):
            check(f"allgather {k}", outs[k], _data(case, k, (5, 2), np.float64))
        case += 1
        ins = [_data(case, r * ws + j, (7,), np.float32) for j in range(ws)]
        res = np.empty(7, np.float32)
        col.reducescatter(res, ins, group)
        xs = [_data(case, k * ws + r, (7,), np.float32) for k in range(ws)]
        check("reducescatter", res, refs[ref](xs, "sum"), shared=False)
        col.barrier(group)
        case += 1
        if ws > 1:
            if r == 0:
                col.send(_data(case, 0, (300_001,), np.float32), 1, group)
            elif r == 1:
                buf = np.empty(300_001, np.float32)
                col.recv(buf, 0, group)
                check("send/recv", buf, _data(case, 0, (300_001,), np.float32), shared=False)
        col.barrier(group)
        return out

    def allreduce_once(self, group, n):
        x = np.full(n, float(self.rank + 1))
        t0 = time.monotonic()
        try:
            col.allreduce(x, group)
        except Exception as e:  # noqa: BLE001  (returned to the test)
            return type(e).__name__, str(e), time.monotonic() - t0
        return "ok", float(x[0]), time.monotonic() - t0

    def destroy(self, group):
        col.destroy_collective_group(group)
        return True


def _check_battery(results, ws):
    bad = [(r, name) for r, res in enumerate(results) for name, ok, _ in res if not ok]
    assert not bad, bad[:10]
    assert len(results[0]) > 30
    for r in range(1, ws):
        d0 = {n: d for n, _, d in results[0] if d}
        dr = {n: d for n, _, d in results[r] if d}
        assert d0 == dr, f"rank {r} holds different bits than rank 0"


@pytest.mark.parametrize("ws", [2, 4])
def test_ray_collective_backend(ray_session, ws):
    Actor = ray.remote(num_cpus=0)(ColWorker)
    actors = [Actor.remote(r) for r in range(ws)]
    group = f"dg_ray_{ws}_{time.time_ns()}"
    topo = ray.get([a.init.remote(ws, group) for a in actors], timeout=120)
    assert set(topo) == {"shm"}                       # one node: shared memory
    sizes = [1, 1001, 300_001] if ws == 2 else [1, 1001]
    res = ray.get([a.battery.remote(ws, group, sizes, "rank") for a in actors], timeout=300)
    _check_battery(res, ws)
    assert all(ray.get([a.destroy.remote(group) for a in actors], timeout=60))
    for a in actors:
        ray.kill(a)


def test_ray_declarative_group_and_timeout(ray_session):
    """create_collective_group from the driver (the driver registers too), then a
    rank that never calls: the others fail naming it, within the timeout."""
    from distgrad.workers.collective import ray_backend
    ray_backend.register()
    Actor = ray.remote(num_cpus=0)(ColWorker)
    actors = [Actor.remote(r, timeout_s=3.0) for r in range(3)]
    group = f"dg_decl_{time.time_ns()}"
    col.create_collective_group(actors, 3, [0, 1, 2], backend="distgrad", group_name=group)
    # the group is built lazily inside the actors on first use
    got = ray.get([a.allreduce_once.remote(group, 1000) for a in actors], timeout=120)
    assert [g[:2] for g in got] == [("ok", 6.0)] * 3
    got = ray.get([a.allreduce_once.remote(group, 10) for a in actors[:2]], timeout=120)
    for kind, msg, dt in got:
        assert kind == "CollectiveTimeoutError", msg
        assert "rank 2 did not arrive" in msg and group in msg, msg
        assert dt < 3.0 + 10, dt
    for a in actors:
        ray.kill(a)
    try:
        ray.kill(ray.get_actor("info_" + group))     # Ray's detached group-info actor
    except ValueError:
        pass


# -- two "nodes": ray.cluster_utils.Cluster in a child process -----------------------------------

def _cluster_main(q):
    try:
        import ray
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"node_a": 4}, "include_dashboard": False})
        cluster.add_node(num_cpus=2, resources={"node_b": 4})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        try:
            Actor = ray.remote(num_cpus=0)(ColWorker)
            out = {}
            for ws, places in ((2, ["node_a", "node_b"]),
                               (4, ["node_a", "node_a", "node_b", "node_b"])):
                actors = [Actor.options(resources={p: 1}).remote(r) for r, p in enumerate(places)]
                nodes = ray.get([a.node.remote() for a in actors], timeout=120)
                group = f"dg_cluster_{ws}"
                topo = ray.get([a.init.remote(ws, group) for a in actors], timeout=120)
                res = ray.get([a.battery.remote(ws, group, [1, 1001, 100_003],
                                                "ring" if ws == 2 else "pairs")
                               for a in actors], timeout=300)
                out[ws] = (len(set(nodes)), topo, res)
                ray.get([a.destroy.remote(group) for a in actors], timeout=60)
                for a in actors:
                    ray.kill(a)
            q.put(("ok", out))
        finally:
            ray.shutdown()
            cluster.shutdown()
    except BaseException:  # noqa: BLE001  (reported to the test)
        q.put(("error", traceback.format_exc()))


@pytest.mark.slow
def test_two_node_cluster_tcp_and_hierarchical():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_cluster_main, args=(q,))
    p.start()
    try:
        status, out = q.get(timeout=400)
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
    assert status == "ok", out
    n_nodes, topo, res = out[2]
    assert n_nodes == 2 and set(topo) == {"tcp"}
    _check_battery(res, 2)
    n_nodes, topo, res = out[4]
    assert n_nodes == 2 and set(topo) == {"hierarchical"}
    _check_battery(res, 4)
