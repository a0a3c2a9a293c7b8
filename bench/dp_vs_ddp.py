"""distgrad's data-parallel step against PyTorch DDP (gloo) at equal resources.

N Ray workers (1 CPU, 1 BLAS thread each) against N DDP processes of 1 thread each, on
the same model, data, global batch and optimizer, measured in one run in alternating
blocks; the ratio is the median of paired per-block ratios (samples/s of distgrad over
DDP's). Models: the MLP 784-1024-1024-10 (global batch 512, SGD), a LeNet-size CNN
(global batch 256, SGD momentum), and a wide MLP with 64 MB of gradients (batch 256).
The per-phase breakdown of distgrad's step comes from the workers' timeline; beside it,
the gloo all-reduce of the same gradient bytes timed alone in the DDP processes.

``--nodes K`` simulates K machines: a ``ray.cluster_utils.Cluster`` of K nodes on this
host (workers/K CPUs each), the workers spread over them, so distgrad all-reduces over
its TCP ring between nodes (shm inside a node that holds several workers); DDP's gloo
runs over loopback TCP (``GLOO_SOCKET_IFNAME=lo``; gloo has no shared-memory transport
for CPU tensors). Both transports are checked, not assumed: each worker reports its
communicator's topology, and the TCP connections between each side's processes are
counted; a run whose workers did not talk over TCP reports no ratio.

    python bench/dp_vs_ddp.py [--workers 2] [--models mlp,cnn,wide] [--quick] [--save]
    python bench/dp_vs_ddp.py --nodes 2 [--models mlp,cnn,wide] [--quick] [--save]
"""
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")      # one BLAS thread per process, on both sides

import numpy as np  # noqa: E402

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distgrad.bench._results import parser, publish, require_baseline  # noqa: E402

MODELS = {   # name: (layer spec, global batch, optimizer keywords)
    "mlp": (("mlp", [784, 1024, 1024, 10]), 512, {"lr": 0.01}),
    "cnn": (("cnn", None), 256, {"lr": 0.01, "momentum": 0.9}),
    "wide": (("mlp", [784, 4096, 3072, 10]), 256, {"lr": 0.01}),
}


def data(name, batch):
    rng = np.random.default_rng(0)
    shape = (batch, 1, 28, 28) if MODELS[name][0][0] == "cnn" else (batch, 784)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, batch)


def build(m, name):
    """The model in module ``m`` (distgrad or torch): both have the same nn API here."""
    kind, sizes = MODELS[name][0]
    nn = m.nn
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120),
                             nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# ---------------------------------------------------------------- DDP side

BLOCK_TIMEOUT_S = 600        # a block of steps on a loaded machine; past it DDP is hung


def _ddp_worker(rank, world, port, name, env, bucket_cap_mb, pin, conn):
    os.environ.update(env)            # before gloo makes its device (GLOO_SOCKET_IFNAME)
    if pin:                           # before torch and gloo start threads: they inherit it
        from distgrad.workers.cpu_pinning import cores_for, pin_process
        pin_process(cores_for(rank, world, 1, os.sched_getaffinity(0)))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        build(torch, name), **({"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb else {}))
    opt = torch.optim.SGD(model.parameters(), **MODELS[name][2])
    X, Y = data(name, MODELS[name][1])
    rows = np.array_split(np.arange(len(X)), world)[rank]
    x, y = torch.from_numpy(X[rows]), torch.from_numpy(Y[rows])
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        if isinstance(cmd, tuple):    # ("allreduce", reps): the gradient bytes, alone
            flat = torch.zeros(sum(p.numel() for p in model.parameters()))
            cap = int((bucket_cap_mb or 25) * 2**20) // 4     # DDP's bucket_cap_mb
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(cmd[1]):
                for lo in range(0, flat.numel(), cap):
                    dist.all_reduce(flat[lo:lo + cap])
            dist.barrier()
            conn.send(((time.perf_counter() - t0) / cmd[1], flat.numel() * 4))
            continue
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(cmd):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()               # the same loop as distgrad's, which reads it every step
        dist.barrier()
        conn.send(time.perf_counter() - t0)
    dist.destroy_process_group()


class DDPGang:
    """N DDP processes that run a block of steps on command (and wait in between).
    ``env``: variables set in each process before gloo starts; ``pin``: process r on core r."""

    def __init__(self, n, name, env=None, bucket_cap_mb=None, pin=False):
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns, self.procs = [], []
        for r in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_ddp_worker, daemon=True,
                            args=(r, n, port, name, dict(env or {}), bucket_cap_mb, pin, child))
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        try:
            for c in self.conns:
                if self._recv(c, 120, "start") != "ready":
                    raise RuntimeError("DDP (gloo) did not start")
        except BaseException:
            self.close()
            raise

    def _recv(self, conn, timeout, what):
        if not conn.poll(timeout):
            raise RuntimeError(f"DDP (gloo): no answer to {what} within {timeout} s: no "
                               "baseline, no ratio")
        return conn.recv()

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def block(self, steps):
        for c in self.conns:
            c.send(steps)
        return max(self._recv(c, BLOCK_TIMEOUT_S, f"{steps} steps") for c in self.conns)

    def allreduce(self, reps):
        """Seconds of one gloo all-reduce of the model's gradient bytes, and those bytes."""
        for c in self.conns:
            c.send(("allreduce", reps))
        got = [self._recv(c, BLOCK_TIMEOUT_S, "all-reduce") for c in self.conns]
        return max(t for t, _ in got), got[0][1]

    def close(self):
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)


# ---------------------------------------------------------------- distgrad side

class SimulatedNodes:
    """``k`` Ray nodes of ``cpus`` CPUs each on this host (a ``ray.cluster_utils.Cluster``;
    the head holds no CPU, so no worker lands on it), with this process connected."""

    def __init__(self, k, cpus):
        import ray
        from ray.cluster_utils import Cluster
        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(k):
                self.cluster.add_node(num_cpus=cpus)
            import distgrad       # the workers import distgrad from where this process does
            root = os.path.dirname(os.path.dirname(os.path.abspath(distgrad.__file__)))
            ray.init(address=self.cluster.address, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                         q for q in [root, os.environ.get("PYTHONPATH", "")] if q)}})
        except BaseException:
            self.close()
            raise

    def close(self):
        import ray
        ray.shutdown()
        self.cluster.shutdown()


def _topologies(cluster):
    """What each worker's communicator really uses ("shm", "tcp", "hierarchical"), asked
    of the communicator inside the worker (the lambda travels by value)."""
    import ray
    refs = [a.__ray_call__.remote(lambda actor: getattr(actor.comm, "topology", None) or type(
        actor.comm).__name__.replace("Communicator", "").lower()) for a in cluster.gang.actors]
    return ray.get(refs, timeout=60)


def _tcp_links(pids):
    """Established TCP connections with both ends among the processes ``pids``, and the
    local addresses they use: what the processes really talk over."""
    import ray  # noqa: F401  (Ray ships psutil in its thirdparty_files and puts it on the path)
    import psutil
    conns = {pid: [c for c in psutil.Process(pid).net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.raddr] for pid in pids}
    owner = {(c.laddr.ip, c.laddr.port): pid for pid, cs in conns.items() for c in cs}
    ends = [c for pid, cs in conns.items() for c in cs
            if owner.get((c.raddr.ip, c.raddr.port), pid) != pid]
    return len(ends) // 2, sorted({c.laddr.ip for c in ends})


def _breakdown(cluster, since, starts):
    """Worker 0's timeline after ``since``: seconds per step by phase, all-reduce buckets
    per step, and the median lag from the driver starting a step (``starts``, wall clock)
    to the worker decoding its program (recording, the Ray call, the input shards' trip)."""
    phases, buckets, lags = {}, 0, []
    steps = len(starts)
    for name, start, end, _thread in cluster.gang.spans()[0]:
        if start < since:
            continue
        key = "all-reduce buckets" if name.startswith("allreduce") else name
        buckets += key != name
        phases[key] = phases.get(key, 0.0) + (end - start) / steps
        if name == "decode":
            lags += [start - s for s in starts[-1::-1] if s <= start][:1]
    return phases, buckets / steps, statistics.median(lags) if lags else float("nan")


def _cpu_faults(pid):
    """(CPU seconds, minor page faults) process ``pid`` used so far (Linux ``/proc``; None
    elsewhere): per-step CPU shows whether a side's compute costs more, or only waits more."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def _per_step(before, after, steps):
    """'CPU x ms, y page faults' per step between two ``_cpu_faults`` readings."""
    if before is None or after is None:
        return "n/a"
    return (f"CPU {(after[0] - before[0]) / steps * 1e3:.1f} ms, "
            f"{(after[1] - before[1]) / steps:.0f} page faults")


def _collective_wait(cluster):
    """Seconds worker 0's thread has spent blocked in collectives so far (waiting for the
    other workers, or running a collective itself)."""
    import ray
    ref = cluster.gang.actors[0].__ray_call__.remote(
        lambda actor: actor.worker.comm.wait_s if actor.worker.comm is not None else 0.0)
    return ray.get(ref, timeout=60)


def _load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    ap = parser(__doc__)
    ap.add_argument("--workers", type=int, default=None,
                    help="workers on each side (default: 2, or one per node with --nodes)")
    ap.add_argument("--nodes", type=int, default=None,
                    help="simulate this many machines (a ray.cluster_utils.Cluster, TCP "
                         "between them)")
    ap.add_argument("--models", default="mlp,cnn,wide", help="comma-separated: mlp, cnn, wide")
    ap.add_argument("--rounds", type=int, default=None, help="alternating blocks per model")
    ap.add_argument("--data", choices=("driver", "resident"), default="driver",
                    help="driver: the driver shards the batch every step (cluster.shard); "
                         "resident: sharded once, the workers keep their rows, as each DDP "
                         "process holds its own")
    ap.add_argument("--bucket-cap-mb", type=float, default=None,
                    help="gradient bucket size on both sides (default: each side's own: 25 MB, "
                         "and DDP's 1 MB first bucket)")
    ap.add_argument("--pin", action="store_true",
                    help="pin each process of both sides to its own core (distgrad's "
                         "pin_cpus=True; DDP process r on core r)")
    args = ap.parse_args()
    nodes = args.nodes
    workers = args.workers or nodes or 2
    if nodes is not None and (nodes < 2 or workers % nodes):
        ap.error("--nodes needs at least 2 nodes and a worker count it divides")
    require_baseline("torch", "PyTorch DDP with gloo")
    import distgrad as dg
    import distgrad.nn.functional as F
    rounds = args.rounds or (3 if args.quick else 7)
    steps = 3 if args.quick else 8
    load_start = _load()
    if nodes:
        per = workers // nodes
        # one gloo device on the loopback interface: DDP's all-reduce is TCP through lo
        ddp_env = {"GLOO_SOCKET_IFNAME": "lo"}
        who = (f"{nodes} simulated nodes x {per} worker{'s' * (per > 1)}, TCP between nodes, vs "
               f"{workers} DDP processes x 1 thread, gloo over loopback TCP")
        expect = "tcp" if per == 1 else "hierarchical"
        init_kw = {"strategy": "STRICT_SPREAD" if per == 1 else "SPREAD"}
    else:
        ddp_env, expect, init_kw = {}, None, {}
        who = f"{workers} workers vs {workers} DDP processes x 1 thread"
    if args.data == "resident":
        who += ", batch resident on the workers"
    if args.bucket_cap_mb:
        init_kw["bucket_cap_mb"] = args.bucket_cap_mb
        who += f", {args.bucket_cap_mb:g} MB buckets on both sides"
    if args.pin:
        if workers > len(os.sched_getaffinity(0)):       # (simulated nodes share this host)
            ap.error("--pin needs a core for each worker")
        init_kw["pin_cpus"] = True
        who += ", each process pinned to its own core"
    lines = [f"| model ({who}) | distgrad samples/s | DDP samples/s | "
             "ratio (median of paired blocks) |",
             "|---|---|---|---|"]
    detail, transport = [], None
    with contextlib.ExitStack() as stack:
        if nodes:
            stack.callback(SimulatedNodes(nodes, per).close)
        for name in args.models.split(","):
            batch = MODELS[name][1]
            X, Y = data(name, batch)
            ddp = DDPGang(workers, name, ddp_env, args.bucket_cap_mb, args.pin)
            try:
                with dg.init(workers=workers, timeout_s=120, **init_kw) as cluster:
                    topo = _topologies(cluster)
                    where = len(set(cluster.gang.nodes))
                    if expect and (set(topo) != {expect} or where != nodes):
                        raise SystemExit(
                            f"dp_vs_ddp: the workers use {topo} on {where} Ray node(s), not "
                            f"'{expect}' on {nodes}: this is not the TCP setup asked for, no ratio")
                    if args.pin and None in cluster.gang.pinned:
                        raise SystemExit(f"dp_vs_ddp: --pin, but the workers' cores are "
                                         f"{cluster.gang.pinned}: not the setup asked for, no ratio")
                    dg.manual_seed(0)
                    model = cluster.replicate(build(dg, name))
                    opt = dg.optim.SGD(model.parameters(), **MODELS[name][2])
                    record, starts = [], []
                    held = (cluster.shard(X), cluster.shard(Y)) if args.data == "resident" else None

                    def block(n):
                        t0 = time.perf_counter()
                        for _ in range(n):
                            starts.append(time.time())
                            r0 = time.perf_counter()
                            xs, ys = held or (cluster.shard(X), cluster.shard(Y))
                            loss = F.cross_entropy(model(xs), ys)
                            opt.zero_grad()
                            loss.backward()
                            opt.step()
                            record.append(time.perf_counter() - r0)
                            loss.item()
                        return time.perf_counter() - t0
                    block(2)
                    ddp.block(2)                                   # warm-up
                    ours, theirs, since = [], [], None
                    usage = [_cpu_faults(cluster.gang.pid(0)), _cpu_faults(ddp.pids[0]),
                             _collective_wait(cluster)]
                    for _ in range(rounds):
                        since = time.time()
                        del starts[:]
                        ours.append(block(steps))
                        theirs.append(ddp.block(steps))
                    n = rounds * steps
                    usage = (_per_step(usage[0], _cpu_faults(cluster.gang.pid(0)), n),
                             _per_step(usage[1], _cpu_faults(ddp.pids[0]), n),
                             (_collective_wait(cluster) - usage[2]) / n)
                    phases, buckets, lag = _breakdown(cluster, since, starts)
                    links = _tcp_links([cluster.gang.pid(r) for r in range(workers)])
                    programs = " and ".join(sorted({
                        {"unix": "a Unix socket", "tcp": "TCP"}[ch.kind] if ch else "Ray calls"
                        for ch in cluster.gang.channels}))
                gloo_s, grad_bytes = ddp.allreduce(3 if args.quick else 5)
                ddp_links = _tcp_links(ddp.pids)
            finally:
                ddp.close()
            if nodes and (links[0] == 0 or ddp_links[0] == 0):
                raise SystemExit(f"dp_vs_ddp: no TCP connection seen between the distgrad workers "
                                 f"({links[0]}) or the DDP processes ({ddp_links[0]}): no ratio")
            transport = (f"distgrad: {'/'.join(sorted(set(topo)))} collective on {where} Ray "
                         f"node(s), {links[0]} TCP connections between the workers "
                         f"({', '.join(links[1]) or 'none'}), driver to workers over {programs}; "
                         f"DDP: gloo, {ddp_links[0]} TCP "
                         f"connections between its processes ({', '.join(ddp_links[1]) or 'none'})"
                         + (", GLOO_SOCKET_IFNAME=lo" if ddp_env else ""))
            ratios = [t / o for o, t in zip(ours, theirs)]
            sps = batch * steps / statistics.median(ours)
            ddp_sps = batch * steps / statistics.median(theirs)
            lines.append(f"| {name} (batch {batch}) | {sps:.0f} | {ddp_sps:.0f} | "
                         f"{statistics.median(ratios):.2f}x |")
            step_s = statistics.median(ours) / steps
            parts = ", ".join(f"{k} {v * 1e3:.1f}"
                              for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
            detail.append(f"- {name}: step {step_s * 1e3:.1f} ms; worker 0 per step (ms): {parts}; "
                          f"{buckets:g} all-reduce bucket(s) per step; driver recording "
                          f"{statistics.median(record) * 1e3:.2f} ms; driver step start to worker "
                          f"0 decode {lag * 1e3:.1f} ms; gloo all-reduce of the same "
                          f"{grad_bytes / 2**20:.1f} MB alone ({args.bucket_cap_mb or 25:g} MB "
                          f"buckets, no compute beside it) {gloo_s * 1e3:.1f} ms; per step: "
                          f"worker 0 {usage[0]}, its thread blocked in collectives "
                          f"{usage[2] * 1e3:.1f} ms; DDP process 0 {usage[1]}")
    text = lines + ["", "Breakdown (distgrad):"] + detail + [
        "", f"Transport (last model): {transport}.",
        f"Load average at the start: {load_start}; at the end: {_load()} "
        f"({os.cpu_count()} CPUs)."]
    name = "dp_vs_ddp" + (f"_{nodes}nodes" if nodes else "") + (
        "_resident" if args.data == "resident" else "") + (
        f"_bucket{args.bucket_cap_mb:g}mb" if args.bucket_cap_mb else "") + (
        "_pinned" if args.pin else "")
    publish(name, "\n".join(text), args.save)


if __name__ == "__main__":
    main()
